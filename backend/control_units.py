"""ControlNet units as users ask for them: sd-webui-controlnet's unit fields and their checks, its infotext
entries and the command line's `--controlnet` specs. How a unit acts in generation: `control_pass`.

A unit names a model from `models/ControlNet`: a ControlNet (lllyasviel's or diffusers', a union one), a
T2I-Adapter, or an IP-Adapter (with a CLIP vision encoder from `models/clip_vision`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image

from backend.errors import InputError

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
HR_OPTIONS = ("Both", "Low res only", "High res only")
# xinsir's union ControlNet's control types in its order, as sd-webui-controlnet names them (ProMax adds the
# last two), and the words (xinsir's, and preprocessors') that choose each.
UNION_CONTROL_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint")
_UNION_WORDS = (("openpose", "pose"), ("depth",), ("softedge", "hed", "pidi", "scribble", "teed"),
                ("canny", "lineart", "mlsd"), ("normal",), ("seg", "segment"), ("tile", "blur"), ("inpaint", "repaint"))


class ControlError(InputError):
    """A unit that cannot run: its model, its image or a value; the message names the unit."""


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit, with sd-webui-controlnet's fields and defaults. `image` None: the img2img init
    image. `processor_res`, `threshold_a`, `threshold_b` of -1: the preprocessor's defaults."""

    model: str
    module: str = "none"
    image: Image.Image | None = field(default=None, compare=False)
    mask: Image.Image | None = field(default=None, compare=False)
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    processor_res: int = -1
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    pixel_perfect: bool = False
    hr_option: str = "Both"
    union_control_type: str = "Unknown"  # a union ControlNet's type (UNION_CONTROL_TYPES); "Unknown": the module's
    # The unit's number as its client counts it (the UI's tab, the place in the API's args, disabled units
    # included); None: its place among the enabled units. Errors name the unit by it.
    position: int | None = field(default=None, compare=False)

    def name(self, index: int) -> str:
        return f"ControlNet unit {self.position if self.position is not None else index}"

    def validate(self, index: int) -> None:
        where = self.name(index)
        numbers = (self.weight, self.guidance_start, self.guidance_end, self.threshold_a, self.threshold_b)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise ControlError(f"{where}: weight, guidance and thresholds must be finite numbers")
        if not 0 <= self.weight <= 2:
            raise ControlError(f"{where}: weight must be between 0 and 2, not {self.weight}")
        if not 0 <= self.guidance_start <= self.guidance_end <= 1:
            raise ControlError(f"{where}: guidance start and end must satisfy 0 <= start <= end <= 1, not "
                               f"{self.guidance_start} and {self.guidance_end}")
        for name, value, choices in (("control mode", self.control_mode, CONTROL_MODES),
                                     ("resize mode", self.resize_mode, RESIZE_MODES),
                                     ("hires option", self.hr_option, HR_OPTIONS)):
            if value not in choices:
                raise ControlError(f"{where}: {name} must be one of: {', '.join(choices)}; not {value!r}")
        if not (self.processor_res == -1 or 64 <= self.processor_res <= 4096):
            raise ControlError(f"{where}: processor resolution must be -1 (the module's) or 64-4096")
        if str(self.union_control_type).strip().lower() not in ("", "unknown") \
                and union_type_index(self.union_control_type) is None:
            raise ControlError(f"{where}: union control type must be one of: {', '.join(UNION_CONTROL_TYPES)} "
                               f"(or Unknown: the module's); not {self.union_control_type!r}")

    def runs_in(self, hires_pass: bool) -> bool:
        return self.hr_option == "Both" or (self.hr_option == "High res only") == hires_pass


def union_type_index(text: str, module: bool = False) -> int | None:
    """The index of the union control type `text` names ("Hard Edge", any case, or one of xinsir's words:
    "canny", "scribble", ...) or, a `module`, whose word its name holds ("softedge_hed"); None for none."""
    word = str(text).strip().lower()
    for index, (name, words) in enumerate(zip(UNION_CONTROL_TYPES, _UNION_WORDS)):
        if word in (name.lower(), name.lower().replace(" ", "_"), name.lower().replace(" ", "")) or word in words \
                or module and any(w in word for w in words):
            return index
    return None


# -- infotext: sd-webui-controlnet's `ControlNet N: "Module: canny, Model: name [hash], Weight: 1.0, ..."` --
_INFOTEXT_FIELDS = (("Module", "module"), ("Model", "model"), ("Weight", "weight"), ("Resize Mode", "resize_mode"),
                    ("Processor Res", "processor_res"), ("Threshold A", "threshold_a"), ("Threshold B", "threshold_b"),
                    ("Guidance Start", "guidance_start"), ("Guidance End", "guidance_end"),
                    ("Pixel Perfect", "pixel_perfect"), ("Control Mode", "control_mode"), ("Hr Option", "hr_option"))


def infotext_parameters(units: tuple[ControlUnit, ...], titles: dict[str, str] | None = None) -> dict[str, str]:
    """One `ControlNet N` entry per unit, its fields as sd-webui-controlnet writes them (a -1, the
    preprocessor's default, left out). `titles`: the models' "name [hash]" titles by the name asked for."""
    from backend import control_preprocessors

    params = {}
    for index, unit in enumerate(units):
        values = {label: getattr(unit, name) for label, name in _INFOTEXT_FIELDS}
        values["Model"] = (titles or {}).get(unit.model, unit.model)
        spec = control_preprocessors.get_module(unit.module)
        resolved = control_preprocessors.resolve_values(unit.module, unit.processor_res, unit.threshold_a,
                                                        unit.threshold_b, strict=False)
        for label, slider, value in zip(("Processor Res", "Threshold A", "Threshold B"),
                                        (spec.resolution, spec.threshold_a, spec.threshold_b), resolved):
            values[label] = value if slider is not None else -1
        if union_type_index(unit.union_control_type) is not None:
            values["Union Control Type"] = unit.union_control_type
        params[f"ControlNet {index}"] = ", ".join(f"{label}: {value}" for label, value in values.items()
                                                  if value != -1 and not isinstance(value, Image.Image))
    return params


def units_from_infotext(parameters) -> list[dict]:
    """The `ControlNet N` entries of a parsed infotext as sd-webui-controlnet unit dicts (all but the image),
    in order; entries that do not parse are skipped."""
    units = []
    for key in sorted((k for k in parameters if k.startswith("ControlNet ") and k[11:].isdigit()),
                      key=lambda k: int(k[11:])):
        fields = {}
        for item in str(parameters[key]).split(","):
            label, sep, value = item.strip().partition(": ")
            if sep:
                fields["_".join(word.lower() for word in label.split(" "))] = _parse_value(value.strip())
        if fields.get("model"):
            units.append(fields)
    return units


def _parse_value(text: str):
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -- the command line's `--controlnet "model=NAME,module=canny,image=edges.png,weight=0.8,start=0,end=1"` --
_SPEC_KEYS = {"model": "model", "module": "module", "weight": "weight", "start": "guidance_start",
              "end": "guidance_end", "mode": "control_mode", "resize": "resize_mode", "res": "processor_res",
              "threshold_a": "threshold_a", "threshold_b": "threshold_b", "pixel_perfect": "pixel_perfect",
              "hr": "hr_option", "union": "union_control_type"}


def unit_from_spec(text: str, open_image) -> ControlUnit:
    """A unit from `key=value` pairs (model, module, image, mask, weight, start, end, mode, resize, res,
    threshold_a, threshold_b, pixel_perfect, hr, union); `open_image(path)` reads image and mask."""
    values: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or (key not in _SPEC_KEYS and key not in ("image", "mask")):
            raise ControlError(f"--controlnet {text!r}: expected key=value pairs with keys "
                               f"{', '.join([*_SPEC_KEYS, 'image', 'mask'])}")
        values[key] = value.strip()
    if "model" not in values:
        raise ControlError(f"--controlnet {text!r}: name the model (model=NAME)")
    fields = {_SPEC_KEYS[k]: _parse_value(v) for k, v in values.items() if k in _SPEC_KEYS}
    fields["model"], fields["module"] = values["model"], values.get("module", "none")
    for name in ("control_mode", "resize_mode", "hr_option"):
        choices = {"control_mode": CONTROL_MODES, "resize_mode": RESIZE_MODES, "hr_option": HR_OPTIONS}[name]
        if name in fields:
            value = fields[name]
            fields[name] = choices[value] if isinstance(value, int) and 0 <= value < len(choices) else \
                next((c for c in choices if c.lower() == str(value).lower()), str(value))
    if "pixel_perfect" in values:
        fields["pixel_perfect"] = values["pixel_perfect"].lower() in ("1", "true", "yes", "on")
    for key in ("image", "mask"):
        if key in values:
            fields[key] = open_image(values[key])
    return ControlUnit(**fields)
