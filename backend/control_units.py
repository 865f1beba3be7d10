"""ControlNet units in generation, applied as sd-webui-controlnet applies them.

A `ControlUnit` is what a user asks for (sd-webui-controlnet's unit fields). For each pass (the first
pass, the hires pass) `prepare` loads its model and turns its image into the control map at the pass's
size (`ActiveControl`). During sampling, every UNet call of the guidance asks `residuals` for the sum of
the active units' residuals, which the UNet adds to its skip connections and middle block:

- a unit acts while sampling step / steps lies within [guidance_start, guidance_end] (A1111's
  `state.sampling_step` as its `on_cfg_denoiser` callback sees it, kept here in `SamplingProgress`);
- "Balanced" scales every residual by the weight; "My prompt is more important" scales them by
  weight x 0.825^(12 - i) (deep ones most), and so does the hires pass for canny and mlsd;
  "ControlNet is more important" gives the negative prompt's rows none;
- a unit's mask confines its residuals to the masked area.

The UNet's weights are never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from backend.errors import EaselError, InputError

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
HR_OPTIONS = ("Both", "Low res only", "High res only")
SOFT_BASE = 0.825  # lllyasviel's guess-mode decay: 0.825^12 < 0.01
_SOFT_IN_HIRES = ("canny", "mlsd")  # sd-webui-controlnet softens these in the hires pass


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

    def validate(self, index: int) -> None:
        where = f"ControlNet unit {index}"
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

    def runs_in(self, hires_pass: bool) -> bool:
        return self.hr_option == "Both" or (self.hr_option == "High res only") == hires_pass


@dataclass
class SamplingProgress:
    """The sampler's step as A1111's callbacks see it: `step` is the last finished step's index (0 before the
    first), `steps` A1111's count for the pass (txt2img: the steps; img2img: t_enc + 1)."""

    step: int = 0
    steps: int = 1

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.steps)


@dataclass
class ActiveControl:
    """A unit ready for one pass: its ControlNet, its control map (1, 3, H, W) in [0, 1] on the model's
    device, and its mask at the latents' size (or None)."""

    unit: ControlUnit
    net: torch.nn.Module
    hint: torch.Tensor
    mask: torch.Tensor | None
    soft: bool

    def acts_at(self, progress: SamplingProgress) -> bool:
        fraction = progress.fraction
        return self.unit.guidance_start <= fraction <= self.unit.guidance_end and self.unit.weight > 0

    def scales(self, count: int) -> list[float]:
        if self.soft:
            return [self.unit.weight * SOFT_BASE ** float(12 - i) for i in range(13)][:count]
        return [self.unit.weight] * count


def residuals(controls: list[ActiveControl], progress: SamplingProgress, sample: torch.Tensor, t,
              context: torch.Tensor, added: dict | None, uncond_rows: slice | None
              ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """The summed residuals of the units acting now for one UNet call (None when none acts): `sample` is the
    call's UNet input (an inpainting model's 9 channels are cut to 4 for the ControlNet), `uncond_rows` the
    negative prompt's rows in it."""
    total: list[torch.Tensor] | None = None
    for control in controls:
        if not control.acts_at(progress):
            continue
        rows = sample.shape[0]
        down, mid = control.net(sample[:, :4], t, encoder_hidden_states=context,
                                controlnet_cond=control.hint.expand(rows, -1, -1, -1).to(sample.dtype),
                                added_cond_kwargs=added, return_dict=False)
        outputs = [o * s for o, s in zip([*down, mid], control.scales(len(down) + 1))]
        config = getattr(control.net, "config", None)
        pooled = bool(getattr(config, "global_pool_conditions", False))  # shuffle: averaged, cond only
        if pooled:
            outputs = [o.mean(dim=(2, 3), keepdim=True) for o in outputs]
        if (pooled or control.unit.control_mode == CONTROL_MODES[2]) and uncond_rows is not None:
            keep = torch.ones(rows, 1, 1, 1, dtype=sample.dtype, device=sample.device)
            keep[uncond_rows] = 0
            outputs = [o * keep for o in outputs]
        if control.mask is not None:
            outputs = [o * _resized(control.mask, o) for o in outputs]
        total = outputs if total is None else [a + b for a, b in zip(total, outputs)]
    if total is None:
        return None
    return total[:-1], total[-1]


def _resized(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape[-2:] != like.shape[-2:]:
        mask = torch.nn.functional.interpolate(mask, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return mask.to(like.dtype)


# -- preparing a pass ---------------------------------------------------------------------------------
class ControlNetCache:
    """The ControlNets loaded for the active checkpoint: at most `size`, least recently used freed first,
    all freed when another checkpoint asks (they are converted for its family and precision)."""

    def __init__(self, library, size: int = 2):
        self.library, self.size = library, size
        self._owner = None
        self._nets: dict = {}

    def load(self, name: str, model) -> tuple[torch.nn.Module, str]:
        """(ControlNet, its title) for `name` as a client gives it, loaded for `model`."""
        from backend import controlnet_files  # diffusers' converters load only when a unit is used

        file = self.library.resolve(name)
        if file is None:
            raise ControlError(f"ControlNet model {name!r}: choose a model (available: "
                               f"{', '.join(self.library.titles()) or 'none'})")
        if self._owner != model.file.path:
            self.clear()
            self._owner = model.file.path
        if file.path not in self._nets:
            while len(self._nets) >= self.size:
                self._nets.pop(next(iter(self._nets)))
            self._nets[file.path] = controlnet_files.load_controlnet(
                file.path, model.family, model.dtype, model.device, unet_config=model.unet.config).eval()
        net = self._nets.pop(file.path)
        self._nets[file.path] = net  # most recently used last
        return net, file.title

    def clear(self) -> None:
        self._nets.clear()
        self._owner = None


def prepare(units: tuple[ControlUnit, ...], cache: ControlNetCache, model, size: tuple[int, int],
            init_image: Image.Image | None, hires_pass: bool, seed: int = 0) -> tuple[list[ActiveControl], dict[str, str]]:
    """The units that run in this pass, ready at `size` (width, height), and the models' titles by the name
    asked for. A unit without an image uses the img2img init image. Out-of-range preprocessor values fall
    back to the module's defaults, as sd-webui-controlnet does; `seed` seeds a random preprocessor."""
    from backend import control_preprocessors  # OpenCV loads only when a unit is used (request.py imports us)

    active, titles = [], {}
    f = model.vae_scale_factor
    for index, unit in enumerate(units):
        if not unit.runs_in(hires_pass):
            continue
        image = unit.image if unit.image is not None else init_image
        if image is None:
            raise ControlError(f"ControlNet unit {index} has no image: give it one (in img2img it may use the "
                               "init image)")
        try:
            net, titles[unit.model] = cache.load(unit.model, model)
            if type(net).__name__ == "ControlNetUnionModel":  # its control-type input is not wired yet
                raise ControlError(f"{titles[unit.model]} is a union ControlNet, which Easel reads but cannot apply "
                                   "yet; use a single-type ControlNet")
            hint = control_preprocessors.prepare_control_image(
                image, unit.module, _hint_size(net, size, f), unit.resize_mode, unit.processor_res, unit.threshold_a,
                unit.threshold_b, unit.pixel_perfect, seed=seed, strict=False)
        except EaselError as error:  # which unit, and why: a missing model, a damaged file, a bad value
            raise type(error)(f"ControlNet unit {index}: {error}") from None
        mask = None
        if unit.mask is not None:
            grey = torch.from_numpy(np.asarray(unit.mask.convert("L").resize((size[0] // f, size[1] // f),
                                                                             Image.BILINEAR), dtype=np.float32))
            mask = (grey / 255.0)[None, None].to(model.device)
        soft = unit.control_mode == CONTROL_MODES[1] or (hires_pass and any(k in unit.module for k in _SOFT_IN_HIRES))
        active.append(ActiveControl(unit, net, hint[None].to(model.device, model.dtype), mask, soft))
    return active, titles


def _hint_size(net, size: tuple[int, int], vae_factor: int) -> tuple[int, int]:
    """The control image's size: the latents' size times the ControlNet's own downscale (8 for every released
    one, so the generation's size with an SD VAE)."""
    factor = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
    return size[0] // vae_factor * factor, size[1] // vae_factor * factor


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
              "hr": "hr_option"}


def unit_from_spec(text: str, open_image) -> ControlUnit:
    """A unit from `key=value` pairs (model, module, image, mask, weight, start, end, mode, resize, res,
    threshold_a, threshold_b, pixel_perfect, hr); `open_image(path)` reads image and mask."""
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
    for key in ("image", "mask"):
        if key in values:
            fields[key] = open_image(values[key])
    return ControlUnit(**fields)
