"""A1111's infotext ("parameters" PNG text chunk): format it exactly, and parse ours and A1111's.

Layout: the prompt (may span lines), a `Negative prompt:` line when there is one, then one line of
`Key: value` pairs in A1111's key order, each value JSON-quoted only if it holds `,`, `:` or a newline.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

# A1111's order for the keys it knows; other keys follow in insertion order, then Version.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Seed resize from",
    "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Init image hash", "RNG", "Tiling",
)
NEGATIVE_PREFIX = "Negative prompt:"
# key: up to the colon; value: a JSON string, or anything up to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")

# Values a parsed infotext takes when the key is absent (A1111's defaults for old infotexts).
DEFAULTS = {"Clip skip": "1", "Schedule type": "Automatic", "RNG": "GPU", "Variation seed strength": "0"}


def quote(value: Any) -> str:
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


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


def parse_infotext(text: str) -> dict[str, str]:
    """Infotext -> {"Prompt", "Negative prompt", key: value, ...}, values as strings.

    A `WxH` value also yields "<key>-1"/"<key>-2" ("Size-1" is the width, as A1111 names them); a legacy joined sampler
    name ("DPM++ 2M Karras") is split into Sampler and Schedule type.
    """
    from backend import samplers

    lines = text.strip().split("\n")
    result: dict[str, str] = {}
    *head, last = lines if lines else [""]
    found = _PARAM.findall(last)
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
        key, value = key.strip(), _unquote(value)
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


# Infotext key -> (GenerationRequest field, converter)
_REQUEST_FIELDS = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule_type", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size-1": ("width", int),
    "Size-2": ("height", int),
    "Model": ("checkpoint", str),
    "VAE": ("vae", str),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Denoising strength": ("denoising_strength", float),
    "Clip skip": ("clip_skip", int),
    "Emphasis": ("emphasis", str),
    "Face restoration": ("face_restorer", str),
    "Hires upscale": ("hr_scale", float),
    "Hires resize-1": ("hr_resize_x", int),
    "Hires resize-2": ("hr_resize_y", int),
    "Hires steps": ("hr_second_pass_steps", int),
    "Hires upscaler": ("hr_upscaler", str),
    "Hires sampler": ("hr_sampler", str),
    "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str),
}
_HIRES_KEYS = ("Hires upscale", "Hires upscaler", "Hires resize-1")


def request_fields(parameters: Mapping[str, str]) -> dict[str, Any]:
    """Parsed infotext -> keyword arguments for `GenerationRequest` (unparseable values skipped)."""
    fields: dict[str, Any] = {}
    for key, (name, convert) in _REQUEST_FIELDS.items():
        if key not in parameters:
            continue
        try:
            fields[name] = convert(float(parameters[key])) if convert is int else convert(parameters[key])
        except ValueError:
            continue
    if "Seed resize from" in parameters and (size := _SIZE.match(parameters["Seed resize from"])):
        fields["seed_resize_from_w"], fields["seed_resize_from_h"] = int(size.group(1)), int(size.group(2))
    fields["restore_faces"] = "Face restoration" in parameters
    # A1111's paste: hires fix is on exactly when the infotext has its keys
    fields["enable_hr"] = "Denoising strength" in parameters and any(k in parameters for k in _HIRES_KEYS)
    return fields
