"""ControlNet units in generation, applied as sd-webui-controlnet applies them.

A `ControlUnit` is what a user asks for (sd-webui-controlnet's unit fields). For each pass (the first
pass, the hires pass) `prepare` loads its model and turns its image into the control map at the pass's
size (`ActiveControl`). During sampling, every UNet call of the guidance asks `residuals` for the sum of
the active units' residuals, which the UNet adds to its skip connections and middle block (ControlNets)
or inside its down blocks (T2I-Adapters' features, computed once per pass from the control map alone):

- a unit acts while sampling step / steps lies within [guidance_start, guidance_end] (A1111's
  `state.sampling_step` as its `on_cfg_denoiser` callback sees it, kept here in `SamplingProgress`);
- "Balanced" scales every residual by the weight; "My prompt is more important" (and the hires pass for canny
  and mlsd) by weight x 0.825^(12 - i), deep ones most (an adapter's four features: x 0.25, 0.62, 0.825, 1);
  "ControlNet is more important" gives the negative prompt's rows none;
- a unit's mask confines its residuals to the masked area;
- a union ControlNet is told its control type (`union_control_type`, else the module's).

The UNet's weights are never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from backend import adapter_files
from backend.controlnet_library import ControlNetCache
from backend.errors import EaselError, InputError

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
HR_OPTIONS = ("Both", "Low res only", "High res only")
SOFT_BASE = 0.825  # lllyasviel's guess-mode decay: 0.825^12 < 0.01
SOFT_ADAPTER = (0.25, 0.62, 0.825, 1.0)  # sd-webui-controlnet's soft weights for a T2I-Adapter's features
# xinsir's union ControlNet's control types in its order, as sd-webui-controlnet names them (ProMax adds the
# last two), and the words (xinsir's, and preprocessors') that choose each.
UNION_CONTROL_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint")
_UNION_WORDS = (("openpose", "pose"), ("depth",), ("softedge", "hed", "pidi", "scribble", "teed"),
                ("canny", "lineart", "mlsd"), ("normal",), ("seg", "segment"), ("tile", "blur"), ("inpaint", "repaint"))
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
    union_control_type: str = "Unknown"  # a union ControlNet's type (UNION_CONTROL_TYPES); "Unknown": the module's

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
    """A unit ready for one pass: its model (`kind` "controlnet", "union" or "t2i_adapter"), its control map
    (1, C, H, W) in [0, 1] on the model's device, its mask at the latents' size (or None), and a union
    ControlNet's control type index."""

    unit: ControlUnit
    net: torch.nn.Module
    hint: torch.Tensor
    mask: torch.Tensor | None
    soft: bool
    kind: str = "controlnet"
    union_type: int | None = None
    _features: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def acts_at(self, progress: SamplingProgress) -> bool:
        fraction = progress.fraction
        return self.unit.guidance_start <= fraction <= self.unit.guidance_end and self.unit.weight > 0

    def scales(self, count: int) -> list[float]:
        if self.soft and self.kind == "t2i_adapter":
            return [self.unit.weight * s for s in SOFT_ADAPTER][:count]
        if self.soft:
            return [self.unit.weight * SOFT_BASE ** float(12 - i) for i in range(13)][:count]
        return [self.unit.weight] * count

    def adapter_features(self) -> list[torch.Tensor]:
        """A T2I-Adapter's features, computed the first time (they depend on the control map alone)."""
        if self._features is None:
            self._features = list(self.net(self.hint))
        return self._features

    def controlnet_outputs(self, sample: torch.Tensor, t, context, added: dict | None) -> list[torch.Tensor]:
        """A ControlNet's down residuals and, last, its middle one for this call (an inpainting model's 9
        input channels cut to the 4 of the latents)."""
        rows = sample.shape[0]
        inputs = {"controlnet_cond": self.hint.expand(rows, -1, -1, -1).to(sample.dtype)}
        if self.kind == "union":  # one control image, its type as xinsir's one-hot vector
            types = torch.zeros(rows, self.net.config.num_control_type, dtype=sample.dtype, device=sample.device)
            types[:, self.union_type] = 1
            inputs = dict(controlnet_cond=[inputs["controlnet_cond"]], control_type=types,
                          control_type_idx=[self.union_type])
        down, mid = self.net(sample[:, :4], t, encoder_hidden_states=context, added_cond_kwargs=added,
                             return_dict=False, **inputs)
        return [*down, mid]


@dataclass
class UNetResiduals:
    """One UNet call's additions: ControlNets' residuals (`down`, `mid`), T2I-Adapters' features (`intrablock`)."""

    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    intrablock: list[torch.Tensor] | None = None

    def unet_kwargs(self) -> dict:
        """The UNet2DConditionModel keyword arguments (a fresh features list each call: the UNet pops it)."""
        kwargs = {}
        if self.down is not None:
            kwargs.update(down_block_additional_residuals=self.down, mid_block_additional_residual=self.mid)
        if self.intrablock is not None:
            kwargs["down_intrablock_additional_residuals"] = list(self.intrablock)
        return kwargs


def residuals(controls: list[ActiveControl], progress: SamplingProgress, sample: torch.Tensor, t,
              context: torch.Tensor, added: dict | None, uncond_rows: slice | None) -> UNetResiduals | None:
    """The summed residuals of the units acting now for one UNet call (None when none acts): `sample` is the
    call's UNet input, `uncond_rows` the negative prompt's rows in it."""
    found = UNetResiduals()
    for control in controls:
        if not control.acts_at(progress):
            continue
        rows = sample.shape[0]
        if control.kind == "t2i_adapter":
            features = [f.expand(rows, -1, -1, -1) for f in control.adapter_features()]
            outputs = _confined(control, features, uncond_rows, pooled=False)
            found.intrablock = outputs if found.intrablock is None else _added(found.intrablock, outputs)
            continue
        pooled = bool(getattr(getattr(control.net, "config", None), "global_pool_conditions", False))
        outputs = _confined(control, control.controlnet_outputs(sample, t, context, added), uncond_rows, pooled)
        total = outputs if found.down is None else _added([*found.down, found.mid], outputs)
        found.down, found.mid = total[:-1], total[-1]
    return None if found.down is None and found.intrablock is None else found


def _confined(control: ActiveControl, outputs: list[torch.Tensor], uncond_rows: slice | None,
              pooled: bool) -> list[torch.Tensor]:
    """A unit's outputs scaled by its weights, averaged when pooled (shuffle), kept from the negative rows
    ("ControlNet is more important", pooled) and confined to its mask."""
    outputs = [o * s for o, s in zip(outputs, control.scales(len(outputs)))]
    if pooled:
        outputs = [o.mean(dim=(2, 3), keepdim=True) for o in outputs]
    if (pooled or control.unit.control_mode == CONTROL_MODES[2]) and uncond_rows is not None:
        keep = torch.ones(outputs[0].shape[0], 1, 1, 1, dtype=outputs[0].dtype, device=outputs[0].device)
        keep[uncond_rows] = 0
        outputs = [o * keep for o in outputs]
    if control.mask is not None:
        outputs = [o * _resized(control.mask, o) for o in outputs]
    return outputs


def _added(total: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [a + b for a, b in zip(total, outputs)]


def _resized(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape[-2:] != like.shape[-2:]:
        mask = torch.nn.functional.interpolate(mask, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return mask.to(like.dtype)


# -- preparing a pass ---------------------------------------------------------------------------------
def prepare(units: tuple[ControlUnit, ...], cache: ControlNetCache, model, size: tuple[int, int],
            init_image: Image.Image | None, hires_pass: bool, seed: int = 0) -> tuple[list[ActiveControl], dict[str, str]]:
    """The units that run in this pass, ready at `size` (width, height), and the models' titles by the name
    asked for. A unit without an image uses the img2img init image. Out-of-range preprocessor values fall
    back to the module's defaults, as sd-webui-controlnet does; `seed` seeds a random preprocessor."""
    active, titles = [], {}
    for index, unit in enumerate(units):
        if not unit.runs_in(hires_pass):
            continue
        image = unit.image if unit.image is not None else init_image
        if image is None:
            raise ControlError(f"ControlNet unit {index} has no image: give it one (in img2img it may use the "
                               "init image)")
        try:
            net, titles[unit.model] = cache.load(unit.model, model)
            kind = _kind(net)
            union_type = _union_type(unit, net, titles[unit.model]) if kind == "union" else None
            hint = _control_map(unit, net, kind, titles[unit.model], image, model, size, seed)
        except EaselError as error:  # which unit, and why: a missing model, a damaged file, a bad value
            raise type(error)(f"ControlNet unit {index}: {error}") from None
        soft = unit.control_mode == CONTROL_MODES[1] or (hires_pass and any(k in unit.module for k in _SOFT_IN_HIRES))
        active.append(ActiveControl(unit, net, hint, _latent_mask(unit, model, size), soft, kind, union_type))
    return active, titles


def _kind(net) -> str:
    from diffusers import ControlNetUnionModel, T2IAdapter

    return "t2i_adapter" if isinstance(net, T2IAdapter) else "union" if isinstance(net, ControlNetUnionModel) \
        else "controlnet"  # a wrapper of a ControlNet too


def _union_type(unit: ControlUnit, net, title: str) -> int:
    """The union ControlNet's control type: the unit's `union_control_type`, else its module's."""
    count = net.config.num_control_type
    known = ", ".join(UNION_CONTROL_TYPES[:count])
    index = union_type_index(unit.union_control_type)  # None: "Unknown" (`validate` refused other words)
    asked = f"union control type {unit.union_control_type!r}"
    if index is None:
        index = union_type_index(unit.module, module=True)
        if index is None:
            raise ControlError(f"{title} is a union ControlNet and module {unit.module!r} does not tell its control "
                               f"type: set the unit's union control type to one of: {known}")
        asked = f"module {unit.module!r} ({UNION_CONTROL_TYPES[index]})"
    if index >= count:
        raise ControlError(f"{title} knows {count} control types ({known}); {asked} is not one of them")
    return index


def _control_map(unit: ControlUnit, net, kind: str, title: str, image: Image.Image, model, size: tuple[int, int],
                 seed: int) -> torch.Tensor:
    """The model's input (1, C, H, W) on the model's device: the preprocessed map, in one grey channel for an
    adapter that takes one (canny, sketch)."""
    from backend import control_preprocessors  # OpenCV loads only when a unit is used (request.py imports us)

    f, adapter = model.vae_scale_factor, kind == "t2i_adapter"
    factor = adapter_files.hint_factor(net.config) if adapter else \
        2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
    # The latents' size times the model's own downscale (8 for every released one: the generation's size)
    hint_size = (size[0] // f * factor, size[1] // f * factor)
    if adapter and any(side % net.config.downscale_factor for side in hint_size):
        raise ControlError(f"{title} is a T2I-Adapter that needs a width and height in multiples of "
                           f"{f * net.config.downscale_factor // factor}, not {size[0]}x{size[1]}")
    hint = control_preprocessors.prepare_control_image(
        image, unit.module, hint_size, unit.resize_mode, unit.processor_res, unit.threshold_a, unit.threshold_b,
        unit.pixel_perfect, seed=seed, strict=False)
    if adapter and net.config.in_channels == 1:  # ITU-R 601 luma, as PIL's "L"
        hint = (hint * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(dim=0, keepdim=True)
    return hint[None].to(model.device, model.dtype)


def _latent_mask(unit: ControlUnit, model, size: tuple[int, int]) -> torch.Tensor | None:
    if unit.mask is None:
        return None
    f = model.vae_scale_factor
    grey = np.asarray(unit.mask.convert("L").resize((size[0] // f, size[1] // f), Image.BILINEAR), dtype=np.float32)
    return (torch.from_numpy(grey) / 255.0)[None, None].to(model.device)


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
    for key in ("image", "mask"):
        if key in values:
            fields[key] = open_image(values[key])
    return ControlUnit(**fields)
