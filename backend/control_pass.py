"""ControlNet units in generation, applied as sd-webui-controlnet applies them.

For each pass (the first pass, the hires pass) `prepare` loads each unit's model and readies its input at the
pass's size (`ActiveControl`): a control map for ControlNets and T2I-Adapters, the image's tokens for
IP-Adapters. Sampling runs inside `applied(model, controls)` (offloaded models on the device, IP-Adapters'
attention installed), and every UNet call of the guidance asks `residuals` for what the acting units add:
residuals to the UNet's skip connections and middle block (ControlNets), features inside its down blocks
(T2I-Adapters, computed once per pass), attention over image tokens (IP-Adapters):

- a unit acts while sampling step / steps lies within [guidance_start, guidance_end] (A1111's
  `state.sampling_step` as its `on_cfg_denoiser` callback sees it, kept here in `SamplingProgress`);
- "Balanced" scales every residual by the weight; "My prompt is more important" (and the hires pass for canny
  and mlsd) by weight x 0.825^(12 - i), deep ones most (an adapter's four features: x 0.25, 0.62, 0.825, 1);
  "ControlNet is more important" gives the negative prompt's rows none;
- a unit's mask confines it to the masked area;
- a union ControlNet is told its control type (`union_control_type`, else the module's);
- `inpaint_only` puts the control image's unmasked pixels back into each decoded image (`restore_inpaint`);
- `tile_colorfix(+sharp)` also recolours every UNet prediction of the pass after the call (`color_fixed`).

The UNet's weights are never touched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from backend import adapter_files
from backend.control_units import CONTROL_MODES, UNION_CONTROL_TYPES, ControlError, ControlUnit, union_type_index
from backend.controlnet_library import ControlNetCache
from backend.errors import EaselError

SOFT_BASE = 0.825  # lllyasviel's guess-mode decay: 0.825^12 < 0.01
SOFT_ADAPTER = (0.25, 0.62, 0.825, 1.0)  # sd-webui-controlnet's soft weights for a T2I-Adapter's features
_SOFT_IN_HIRES = ("canny", "mlsd")  # sd-webui-controlnet softens these in the hires pass
# The IP-Adapter preprocessors (sd-webui-controlnet's names): the image encoder each picks; "auto": the adapter's
IP_ADAPTER_MODULES = {"ip-adapter-auto": None, "ip-adapter_clip_h": "ViT-H", "ip-adapter_clip_g": "ViT-bigG"}
RESTORE_SPREAD = 7  # inpaint_only's blend: the mask dilated, then box-blurred, by 7 pixels (sd-webui-controlnet)


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
    """A unit ready for one pass: its model (`kind` "controlnet", "union", "t2i_adapter" or "ip_adapter"), its
    control map (1, C, H, W) in [0, 1] on the model's device (None for an IP-Adapter, which has `ip`, its
    image's tokens), its mask at the latents' size (or None), a union ControlNet's control type index, and
    inpaint_only's (pixels, blend mask) for `restore_inpaint`."""

    unit: ControlUnit
    net: torch.nn.Module
    hint: torch.Tensor | None
    mask: torch.Tensor | None
    soft: bool
    kind: str = "controlnet"
    union_type: int | None = None
    ip: object | None = None  # ip_adapter_attention.IPAdapterUnit
    restore: tuple[torch.Tensor, torch.Tensor] | None = None
    colorfix: object | None = None  # tile_colorfix.ColorFix
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
    """One UNet call's additions: ControlNets' residuals (`down`, `mid`), T2I-Adapters' features (`intrablock`),
    IP-Adapters' image tokens (`attention`: the UNet's `cross_attention_kwargs`)."""

    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    intrablock: list[torch.Tensor] | None = None
    attention: dict | None = None

    def unet_kwargs(self) -> dict:
        """The UNet2DConditionModel keyword arguments (a fresh features list each call: the UNet pops it)."""
        kwargs = {}
        if self.down is not None:
            kwargs.update(down_block_additional_residuals=self.down, mid_block_additional_residual=self.mid)
        if self.intrablock is not None:
            kwargs["down_intrablock_additional_residuals"] = list(self.intrablock)
        if self.attention:
            kwargs["cross_attention_kwargs"] = self.attention
        return kwargs


def residuals(controls: list[ActiveControl], progress: SamplingProgress, sample: torch.Tensor, t,
              context: torch.Tensor, added: dict | None, uncond_rows: slice | None) -> UNetResiduals | None:
    """The summed residuals of the units acting now for one UNet call (None when none acts): `sample` is the
    call's UNet input, `uncond_rows` the negative prompt's rows in it."""
    found = UNetResiduals()
    ip_units = [c.ip for c in controls if c.kind == "ip_adapter"]  # in `applied`'s order
    if ip_units:
        from backend.ip_adapter_attention import IPAdapterPatch

        found.attention = IPAdapterPatch(ip_units).unet_kwargs(sample, uncond_rows, progress.fraction).get(
            "cross_attention_kwargs")
    for control in controls:
        if control.kind == "ip_adapter" or not control.acts_at(progress):
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
    return None if found.down is None and found.intrablock is None and not found.attention else found


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
            init_image: Image.Image | None, hires_pass: bool, seed: int = 0,
            warnings: list[str] | None = None) -> tuple[list[ActiveControl], dict[str, str]]:
    """The units that run in this pass, ready at `size` (width, height), and the models' titles by the name
    asked for. A unit without an image uses the img2img init image. Out-of-range preprocessor values fall
    back to the module's defaults, as sd-webui-controlnet does; `seed` seeds a random preprocessor. With
    `warnings` and other units to run, a unit whose model file is damaged or made for another base is left
    out with a warning; alone, it is an error naming the unit."""
    active, titles = [], {}
    for index, unit in enumerate(units):
        if not unit.runs_in(hires_pass):
            continue
        image = unit.image if unit.image is not None else init_image
        if image is None:
            raise ControlError(f"{unit.name(index)} has no image: give it one (in img2img it may use the init image)")
        try:
            control, titles[unit.model] = _ready(unit, cache, model, size, image, hires_pass, seed)
        except EaselError as error:  # which unit, and why: a missing model, a damaged file, a bad value
            message = f"{unit.name(index)}: {error}"
            if warnings is None or len(units) == 1 or not _model_file_error(error):
                raise type(error)(message) from None
            if message + "; it was left out" not in warnings:
                warnings.append(message + "; it was left out")
            continue
        active.append(control)
    return active, titles


def _model_file_error(error: EaselError) -> bool:
    from backend.controlnet_files import ControlNetBaseError
    from backend.errors import ModelFileError
    from backend.ip_adapter import IPAdapterBaseError, IPAdapterEncoderError

    return isinstance(error, (ModelFileError, ControlNetBaseError, IPAdapterBaseError, IPAdapterEncoderError))


def _ready(unit: ControlUnit, cache: ControlNetCache, model, size: tuple[int, int], image: Image.Image,
           hires_pass: bool, seed: int) -> tuple[ActiveControl, str]:
    net, title = cache.load(unit.model, model)
    kind, mask = _kind(net), _latent_mask(unit, model, size)
    if kind == "ip_adapter":
        return ActiveControl(unit, net, None, mask, False, kind, ip=_ip_unit(unit, net, title, cache, model, image,
                                                                             mask)), title
    union_type = _union_type(unit, net, title) if kind == "union" else None
    hint = _control_map(unit, net, kind, title, image, model, size, seed, cache.annotator_weights(unit.module))
    soft = unit.control_mode == CONTROL_MODES[1] or (hires_pass and any(k in unit.module for k in _SOFT_IN_HIRES))
    restore = _inpaint_restore(hint) if unit.module == "inpaint_only" and kind != "t2i_adapter" else None
    return ActiveControl(unit, net, hint, mask, soft, kind, union_type, restore=restore,
                         colorfix=_color_fix(unit, hint, model, size, hires_pass)), title


def _color_fix(unit: ControlUnit, hint: torch.Tensor, model, size: tuple[int, int], hires_pass: bool):
    """A tile_colorfix(+sharp) unit's `ColorFix` (else None): its control map encoded by the VAE at the latents'
    size (sd-webui-controlnet: the hint x 2 - 1, encoded once), its variation doubled in the hires pass."""
    from backend import control_preprocessors, k_sampling, vae_codec
    from backend.tile_colorfix import ColorFix

    module = control_preprocessors.get_module(unit.module).name
    if "colorfix" not in module or unit.weight <= 0:
        return None
    _, variation, sharpness = control_preprocessors.resolve_values(module, -1, unit.threshold_a, unit.threshold_b,
                                                                   strict=False)
    f = model.vae_scale_factor
    pixel_hw = (size[1] // f * f, size[0] // f * f)  # the latents' size, in pixels
    pixels = hint[:, :3].float().expand(-1, 3, -1, -1)  # a grey adapter's one channel as RGB
    if pixels.shape[-2:] != pixel_hw:  # a ControlNet whose hint is not the image's size
        pixels = torch.nn.functional.interpolate(pixels, size=pixel_hw, mode="bilinear", align_corners=False)
    return ColorFix(vae_codec.encode(model, pixels * 2 - 1), int(variation) * (2 if hires_pass else 1), unit.weight,
                    sharpness if "+sharp" in module else None, k_sampling.model_alphas_cumprod(model.scheduler_config),
                    model.scheduler_config.get("prediction_type", "epsilon"))


def color_fixed(controls: list[ActiveControl], prediction: torch.Tensor, sample: torch.Tensor, t,
                uncond_rows: slice | None) -> torch.Tensor:
    """One UNet call's prediction with each tile_colorfix unit's colour fix, confined to the unit's mask. As in
    sd-webui-controlnet, the fix runs at every call of the pass, on every row: the guidance range starts and
    stops the ControlNet, not the fix."""
    for control in controls:
        if control.colorfix is None:
            continue
        fixed = control.colorfix.apply(prediction, sample, t, uncond_rows)
        prediction = fixed if control.mask is None else prediction + (fixed - prediction) * _resized(control.mask, fixed)
    return prediction


def _ip_unit(unit: ControlUnit, adapter, title: str, cache: ControlNetCache, model, image: Image.Image, mask):
    """An IP-Adapter unit: the image through the CLIP vision encoder its preprocessor picks (or the adapter
    needs, for ip-adapter-auto and "none"), turned into the adapter's image tokens."""
    from backend import control_preprocessors
    from backend.ip_adapter_attention import prepare_unit

    module = control_preprocessors.get_module(unit.module).name  # older names too (ip-adapter_clip_sd15)
    if module not in IP_ADAPTER_MODULES and module != "none":
        raise ControlError(f"{title} is an IP-Adapter: choose the preprocessor ip-adapter-auto (or "
                           f"{', '.join(m for m in IP_ADAPTER_MODULES if m != 'ip-adapter-auto')}), not {unit.module!r}")
    wanted = IP_ADAPTER_MODULES.get(module)
    if wanted is not None and wanted != adapter.info.encoder:
        raise ControlError(f"{title} needs a {adapter.info.encoder} image encoder, but preprocessor {unit.module} "
                           f"picks {wanted}: choose ip-adapter-auto")
    encoder = cache.encoder(adapter.info, model)
    with model.use(encoder.model):
        encoding = encoder.encode(image)
    return prepare_unit(adapter, encoding, unit.weight, mask, unit.guidance_start, unit.guidance_end)


def _inpaint_restore(hint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """inpaint_only's blend: the control image's pixels (3, H, W) in [0, 1], and where the generation shows
    (1, H, W): the masked area (-1 in the map) dilated and box-blurred by `RESTORE_SPREAD` pixels."""
    import cv2

    pixels = hint[0].float().cpu()
    masked = (pixels < 0).all(dim=0).numpy().astype(np.float32)
    kernel = np.ones((RESTORE_SPREAD, RESTORE_SPREAD), np.uint8)
    spread = cv2.blur(cv2.dilate(masked, kernel), (RESTORE_SPREAD, RESTORE_SPREAD))
    return pixels.clamp(0, 1), torch.from_numpy(spread)[None]


def restore_inpaint(image: Image.Image, controls: list[ActiveControl]) -> Image.Image:
    """A decoded image with each inpaint_only unit's unmasked pixels put back, as sd-webui-controlnet's
    post-processing does (a map made for a ControlNet whose hint is not the image's size is resized to it)."""
    for control in controls:
        if control.restore is None:
            continue
        pixels, blend = control.restore
        if pixels.shape[-2:] != (image.height, image.width):
            pixels, blend = (torch.nn.functional.interpolate(x[None], size=(image.height, image.width), mode="bilinear",
                                                             align_corners=False)[0] for x in (pixels, blend))
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        y = (blend * x + (1 - blend) * pixels).clamp(0, 1)
        image = Image.fromarray((y.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8))
    return image


@contextlib.contextmanager
def applied(model, controls: list[ActiveControl]):
    """The block where a pass samples: the units' models on the compute device (--medvram keeps them on the
    CPU otherwise) and the IP-Adapters' attention installed in the UNet, removed after."""
    ip_units = [c.ip for c in controls if c.kind == "ip_adapter"]
    nets = [c.net for c in controls if c.kind != "ip_adapter"]
    with model.use(*nets), contextlib.ExitStack() as stack:
        if ip_units:
            from backend.ip_adapter_attention import applied as ip_applied

            stack.enter_context(ip_applied(model.unet, ip_units))
        yield


def _kind(net) -> str:
    from diffusers import ControlNetUnionModel, T2IAdapter

    from backend.ip_adapter import IPAdapter

    if isinstance(net, IPAdapter):
        return "ip_adapter"
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
                 seed: int, weights=None) -> torch.Tensor:
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
        unit.pixel_perfect, mask=unit.mask if control_preprocessors.get_module(unit.module).takes_mask else None,
        seed=seed, strict=False, weights=weights)
    if adapter and net.config.in_channels == 1:  # ITU-R 601 luma, as PIL's "L"
        hint = (hint * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(dim=0, keepdim=True)
    return hint[None].to(model.device, model.dtype)


def _latent_mask(unit: ControlUnit, model, size: tuple[int, int]) -> torch.Tensor | None:
    if unit.mask is None:
        return None
    f = model.vae_scale_factor
    grey = np.asarray(unit.mask.convert("L").resize((size[0] // f, size[1] // f), Image.BILINEAR), dtype=np.float32)
    return (torch.from_numpy(grey) / 255.0)[None, None].to(model.device)

