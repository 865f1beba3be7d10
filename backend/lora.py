"""Applying LoRAs to a loaded model: pairing a file's layers with the model's modules, and merging
their updates over the base weights as an overlay that `restore()` undoes bit for bit."""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field

import torch

from backend import devices
from backend.lora_files import LayerUpdate, LoraError, LoraFile

logger = logging.getLogger(__name__)

FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


# -- naming: file layer names -> the model's modules ---------------------------------------------------
@dataclass(frozen=True)
class Target:
    component: str  # "unet" or "te"
    module: torch.nn.Module


def _module_names(model) -> dict[str, Target]:
    """Every name a LoRA file may use for a module of this model (diffusers-layout kohya names,
    LDM-layout kohya names, diffusers/peft names)."""
    from backend import ldm_layout

    names: dict[str, Target] = {}
    unet = model.unet
    layers = unet.config.layers_per_block
    layers = layers if isinstance(layers, int) else layers[0]
    modules = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    ldm = ldm_layout.unet_to_ldm({f"{n}.weight": n for n in modules}, layers)
    for ldm_key, name in ldm.items():
        target = Target("unet", modules[name])
        ldm_name = ldm_key.removeprefix("model.diffusion_model.").removesuffix(".weight")
        names["lora_unet_" + ldm_name.replace(".", "_")] = target
        names["lora_unet_" + name.replace(".", "_")] = target
        names["unet." + name] = target
    for encoder, (kohya, diffusers) in zip(model.text_encoders, model.engine.text_encoder_prefixes()):
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                # Files name CLIP's modules "text_model.encoder...", as transformers 4 nests them.
                name = "text_model." + name.removeprefix("text_model.")
                names[kohya + name.replace(".", "_")] = Target("te", module)
                names[diffusers + name] = Target("te", module)
    return names


_names_by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def module_names(model) -> dict[str, Target]:
    """`_module_names`, remembered per UNet (the map is the same for as long as the model lives)."""
    names = _names_by_model.get(model.unet)
    if names is None:
        names = _names_by_model[model.unet] = _module_names(model)
    return names


@dataclass
class Matched:
    """A LoRA resolved against one model: (module, update) pairs per component."""

    unet: list[tuple[torch.nn.Module, LayerUpdate]] = field(default_factory=list)
    te: list[tuple[torch.nn.Module, LayerUpdate]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def match(lora: LoraFile, model) -> Matched:
    """Pair the file's layers with the model's modules; LoraError when it was made for another base."""
    names = module_names(model)
    matched = Matched()
    wrong_shape = []
    for layer, update in lora.layers.items():
        target = names.get(layer)
        if target is None:
            matched.unmatched.append(layer)
            continue
        if not update.fits(target.module.weight.shape):
            wrong_shape.append(layer)
            continue
        getattr(matched, target.component).append((target.module, update))
    model_label = FAMILY_LABELS.get(model.family, model.family)
    base = FAMILY_LABELS.get(lora.base or "", "another base model")
    if wrong_shape or not (matched.unet or matched.te):
        raise LoraError(f"LoRA '{lora.name}' was made for {base}, not for this {model_label} checkpoint: skipped")
    if matched.unmatched:
        logger.warning("LoRA %s: %d of its layers have no counterpart in this model (e.g. %s)",
                       lora.name, len(matched.unmatched), matched.unmatched[0])
    return matched


# -- applying ----------------------------------------------------------------------------------------
# A1111 takes any float; far past this a LoRA only adds noise, and near float's limit it overflows.
MAX_STRENGTH = 100.0


@dataclass(frozen=True)
class Activation:
    """One LoRA as asked for in a prompt: `<lora:name:te:unet>`; LoraError for a strength that is not
    a finite number within +-MAX_STRENGTH."""

    name: str
    te: float = 1.0
    unet: float = 1.0

    def __post_init__(self) -> None:
        for strength in (self.te, self.unet):
            if not (math.isfinite(strength) and -MAX_STRENGTH <= strength <= MAX_STRENGTH):
                raise LoraError(f"LoRA strength for '{self.name}' must be a finite number between "
                                f"-{MAX_STRENGTH:g} and {MAX_STRENGTH:g}, not {strength:g}")


def _offloaded_weights(module: torch.nn.Module):
    """Under accelerate's sequential offload (--lowvram) a module's weight lives in its hook's
    weights map (the parameter itself is a placeholder): that map, or None."""
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    return weights if weights is not None and getattr(hook, "offload", False) else None


class LoraOverlay:
    """The LoRAs applied to one model right now, as overlays on immutable base weights.

    Applying a LoRA to a layer swaps in a new tensor, base + update, and keeps the base tensor itself
    (no copy); removing swaps the base tensor back, so the weights are bit-identical afterwards and
    restoring costs nothing. Only the merged tensors of the layers in use are extra memory. Merging
    costs nothing per denoising step, where unfused adapters would add two small matmuls per layer at
    every step (`bench/lora.py` measures both).
    """

    def __init__(self, model):
        self.model = model
        self._base: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}  # id(module) -> (module, base weight)
        self.applied: tuple = ()

    @torch.no_grad()
    def apply(self, loras: list[tuple[LoraFile, Matched, Activation]]) -> None:
        """Make exactly these LoRAs active (nothing to do when they already are)."""
        key = tuple((str(lora.path), id(lora), a.te, a.unet) for lora, _, a in loras)
        if key == self.applied:
            return
        self.restore()
        try:
            for _lora, matched, activation in loras:
                for component, strength in (("te", activation.te), ("unet", activation.unet)):
                    if strength == 0:
                        continue
                    for module, update in getattr(matched, component):
                        self._add(module, update, strength)
        except Exception:
            self.restore()
            raise
        self.applied = key

    def _add(self, module: torch.nn.Module, update: LayerUpdate, strength: float) -> None:
        offloaded = _offloaded_weights(module)
        current = offloaded["weight"] if offloaded is not None else module.weight.data
        if id(module) in self._base:  # a second LoRA on this layer: add to the merged tensor
            update.add_to(current, strength, in_place=True)
            return
        merged = update.add_to(current, strength)
        self._base[id(module)] = (module, current)
        self._set(module, merged)

    @staticmethod
    def _set(module: torch.nn.Module, weight: torch.Tensor) -> None:
        offloaded = _offloaded_weights(module)
        if offloaded is not None:
            offloaded.dataset[offloaded.prefix + "weight"] = weight
        else:
            module.weight.data = weight

    @torch.no_grad()
    def restore(self) -> None:
        """Swap every base weight back, bit for bit."""
        self.applied = ()
        if not self._base:
            return
        for module, base in self._base.values():
            self._set(module, base)
        self._base.clear()
        devices.empty_cache()  # the merged tensors are freed: hand their memory back
