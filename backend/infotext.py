"""A1111's infotext ("parameters" PNG text chunk): format it exactly, and parse ours and A1111's.

Layout: the prompt (may span lines), a `Negative prompt:` line when there is one, then one line of
`Key: value` pairs in A1111's key order, each value JSON-quoted only if it holds `,`, `:` or a newline.
Parsing reads that line in one pass (time linear in its length) and refuses texts over MAX_INFOTEXT_CHARS.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from backend.errors import InputError

# A1111's order for the keys it knows; other keys follow in insertion order, then Version.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Distilled CFG Scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Seed resize from",
    "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Init image hash", "RNG", "Tiling",
)
NEGATIVE_PREFIX = "Negative prompt:"
# A1111's infotexts are a few KB. Easel's longest holds four prompts of request.MAX_PROMPT_CHARS
# (prompt, negative, and the hires pair) = 128 KiB; this leaves as much again for styles, wildcards and
# parameters. A text longer than this is not an infotext.
MAX_INFOTEXT_CHARS = 256 * 1024
# The pieces of a parameter (A1111 reads the same grammar with one regex): a key is a word character
# then word characters, spaces, `-` or `/`, up to a colon; a value is a JSON string followed by a comma
# or the end of the line, else anything up to the next comma.
_KEY_START = re.compile(r"\w")
_KEY_REST = re.compile(r"[\w \-/]*")
_SPACES = re.compile(r"\s*")
# The "unrolled loop" form: each character can match only one way, so a string that never closes
# fails after one pass instead of backtracking.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
# Whole numbers a request field can hold (seeds are unsigned 64-bit).
_INT_RANGE = (-(2**63), 2**64)

# Values a parsed infotext takes when the key is absent (A1111's defaults for old infotexts).
DEFAULTS = {"Clip skip": "1", "Schedule type": "Automatic", "RNG": "GPU", "Variation seed strength": "0"}


def quote(value: Any) -> str:
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


class InfotextError(InputError):
    """An infotext Easel will not read (too long to be one)."""


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(round(value, 6))
    return str(value)


def format_infotext(prompt: str, negative_prompt: str, parameters: Mapping[str, Any]) -> str:
    """The infotext for one image. Keys with a None or empty value are left out."""
    present = {k: v for k, v in parameters.items() if v is not None and v != ""}
    ordered = [k for k in KEY_ORDER if k in present]
    ordered += [k for k in present if k not in KEY_ORDER and k != "Version"]
    if "Version" in present:
        ordered.append("Version")
    line = ", ".join(f"{key}: {quote(format_value(present[key]))}" for key in ordered)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(line)
    return "\n".join(lines)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _read_value(line: str, start: int) -> tuple[str, int]:
    """(the raw value at `start`, where the next parameter may begin)."""
    quoted = _JSON_STRING.match(line, start)
    if quoted and quoted.end() - start > 2 and (quoted.end() == len(line) or line[quoted.end()] == ","):
        return quoted.group(), quoted.end() + 1
    comma = line.find(",", start)
    end = len(line) if comma < 0 else comma
    return line[start:end], end + 1


def parameter_pairs(line: str) -> list[tuple[str, str]]:
    """The `Key: value` pairs of a parameter line, values still quoted, read in one left-to-right pass.

    Text that is not a pair is skipped, as A1111's regex skips it; unlike that regex (which retries at
    every character and takes quadratic time on a long line without a colon) no character is read
    more than a few times.
    """
    pairs: list[tuple[str, str]] = []
    position = 0
    while (word := _KEY_START.search(line, position)) is not None:
        key_start = word.start()
        key_end = _KEY_REST.match(line, key_start + 1).end()
        # A key runs from its first word character to the colon; any later start in the same run
        # reaches the same end, so a run without a colon is skipped whole.
        if not line.startswith(":", key_end) or key_end - key_start < 2:
            position = key_end + 1
            continue
        value, position = _read_value(line, _SPACES.match(line, key_end + 1).end())
        pairs.append((line[key_start:key_end].strip(), value))
    return pairs


def parse_infotext(text: str) -> dict[str, str]:
    """Infotext -> {"Prompt", "Negative prompt", key: value, ...}, values as strings.

    A `WxH` value also yields "<key>-1"/"<key>-2" ("Size-1" is the width, as A1111 names them); a legacy joined sampler
    name ("DPM++ 2M Karras") is split into Sampler and Schedule type. A text longer than
    MAX_INFOTEXT_CHARS raises InfotextError.
    """
    from backend import samplers

    if len(text) > MAX_INFOTEXT_CHARS:
        raise InfotextError(f"this infotext is {len(text):,} characters long; Easel reads at most "
                            f"{MAX_INFOTEXT_CHARS:,} (A1111's are a few thousand), so these are not "
                            "generation parameters it can use")
    lines = text.strip().split("\n")
    result: dict[str, str] = {}
    *head, last = lines if lines else [""]
    found = parameter_pairs(last)
    if len(found) < 3:  # not a parameter line: everything is prompt text
        head, found = lines, []
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].lstrip()
        (negative if in_negative else prompt).append(line)
    result["Prompt"] = "\n".join(prompt)
    result["Negative prompt"] = "\n".join(negative)
    for key, value in found:
        value = _unquote(value)
        result[key] = value
        if size := _SIZE.match(value):
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
    if "Sampler" in result and "Schedule type" not in result:
        try:
            sampler, schedule = samplers.resolve(result["Sampler"])
        except samplers.SamplerError:
            pass
        else:
            if sampler.name != result["Sampler"]:
                result["Sampler"], result["Schedule type"] = sampler.name, schedule
    for key, value in DEFAULTS.items():
        result.setdefault(key, value)
    return result


def _whole_number(text: str) -> int:
    """A whole number from text, exact for "20" (seeds need all 64 bits), truncated for "20.5";
    ValueError for anything else, or beyond 64 bits ("inf", "nan", "1e400", 2^70)."""
    try:
        number = int(text)
    except ValueError:
        number = int(_finite_number(text))
    if not _INT_RANGE[0] <= number < _INT_RANGE[1]:
        raise ValueError(f"{text!r} does not fit in 64 bits")
    return number


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _true_or_false(text: str) -> bool:
    if text.strip() not in ("True", "False"):
        raise ValueError(f"{text!r} is not True or False")
    return text.strip() == "True"


# Infotext key -> (GenerationRequest field, converter raising ValueError on a value it cannot use)
_REQUEST_FIELDS = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", _whole_number),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule_type", str),
    "CFG scale": ("cfg_scale", _finite_number),
    "Distilled CFG Scale": ("distilled_cfg_scale", _finite_number),  # Forge's, for FLUX.1 dev
    "Shift": ("shift", _finite_number),  # Forge's, for flow models
    "Seed": ("seed", _whole_number),
    "Size-1": ("width", _whole_number),
    "Size-2": ("height", _whole_number),
    "Model": ("checkpoint", str),
    "VAE": ("vae", str),
    "Variation seed": ("subseed", _whole_number),
    "Variation seed strength": ("subseed_strength", _finite_number),
    "Denoising strength": ("denoising_strength", _finite_number),
    "Clip skip": ("clip_skip", _whole_number),
    "Emphasis": ("emphasis", str),
    "Pad conds": ("pad_cond_uncond", _true_or_false),
    "ENSD": ("eta_noise_seed_delta", _whole_number),
    "Old prompt editing timelines": ("use_old_scheduling", _true_or_false),
    "Face restoration": ("face_restorer", str),
    "Hires upscale": ("hr_scale", _finite_number),
    "Hires resize-1": ("hr_resize_x", _whole_number),
    "Hires resize-2": ("hr_resize_y", _whole_number),
    "Hires steps": ("hr_second_pass_steps", _whole_number),
    "Hires upscaler": ("hr_upscaler", str),
    "Hires sampler": ("hr_sampler", str),
    "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str),
}
_HIRES_KEYS = ("Hires upscale", "Hires upscaler", "Hires resize-1")


def request_fields(parameters: Mapping[str, str], device: str = "cpu") -> dict[str, Any]:
    """Parsed infotext -> keyword arguments for `GenerationRequest`.

    Values that cannot be used are skipped: unparseable, not finite ("inf", "nan", "1e400"), or
    whole numbers beyond 64 bits. `RNG` (absent: A1111's default, GPU) becomes the noise source that
    reproduces the image on `device`: GPU noise was an NVIDIA GPU's, which NV reproduces elsewhere.
    """
    fields: dict[str, Any] = {}
    for key, (name, convert) in _REQUEST_FIELDS.items():
        if key not in parameters:
            continue
        try:
            fields[name] = convert(parameters[key])
        except ValueError:
            continue
    if "Seed resize from" in parameters and (size := _SIZE.match(parameters["Seed resize from"])):
        try:
            fields["seed_resize_from_w"], fields["seed_resize_from_h"] = map(_whole_number, size.groups())
        except ValueError:
            pass
    fields["restore_faces"] = "Face restoration" in parameters
    source = str(parameters.get("RNG", "GPU")).strip().upper()
    if source in ("GPU", "CPU", "NV"):
        fields["randn_source"] = "NV" if source == "GPU" and not str(device).startswith("cuda") else source
    # A1111's paste: hires fix is on exactly when the infotext has its keys
    fields["enable_hr"] = "Denoising strength" in parameters and any(k in parameters for k in _HIRES_KEYS)
    return fields
