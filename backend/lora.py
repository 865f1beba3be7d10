"""Applying LoRAs to a loaded model: pairing a file's layers with the model's modules, and merging
their updates over the base weights as an overlay that `restore()` undoes bit for bit."""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from backend import devices, fp8_storage
from backend.lora_files import LayerUpdate, LoraError, LoraFile, Ranges

logger = logging.getLogger(__name__)

# The families a LoRA file may have been made for (`LoraFile.base`), as users say them.
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux": "FLUX.1", "sd3": "SD 3"}
FLOW_FAMILIES = ("flux", "sd3")


# -- naming: file layer names -> the model's modules ---------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A module a file's layer updates. `rows`: only these rows of the layer's update, in this order (a fused
    original-layout layer split over several diffusers modules); None: all of it."""

    component: str  # "unet" or "te"
    module: torch.nn.Module
    rows: Ranges | None = None


def _module_names(model) -> dict[str, Target | tuple[Target, ...]]:
    """Every name a LoRA file may use for a module of this model (diffusers-layout kohya names,
    LDM-layout kohya names, diffusers/peft names); FLUX.1 and SD 3.x: `flow_lora.module_names`."""
    if model.engine.prediction == "flow":
        from backend import flow_lora

        return flow_lora.module_names(model)
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


def module_names(model) -> dict[str, Target | tuple[Target, ...]]:
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
    """Pair the file's layers with the model's modules; LoraError when it was made for another base.

    A layer with several targets (a fused original-layout layer) is checked whole, then each module gets
    its rows' share of the update."""
    names = module_names(model)
    base = lora.base
    if base is not None and base != model.family and (base in FLOW_FAMILIES or model.family in FLOW_FAMILIES):
        # Families share text encoders (FLUX's CLIP-L is SDXL's first): a partial match would apply.
        raise _refusal(lora, model, base)
    matched = Matched()
    wrong_shape = []
    for layer, update in lora.layers.items():
        targets = names.get(layer)
        if targets is None:
            matched.unmatched.append(layer)
            continue
        targets = targets if isinstance(targets, tuple) else (targets,)
        if not update.fits(_layer_shape(targets)):
            wrong_shape.append(layer)
            continue
        for target in targets:
            share = update if target.rows is None else update.take_rows(target.rows)
            getattr(matched, target.component).append((target.module, share))
    if wrong_shape or not (matched.unet or matched.te):
        raise _refusal(lora, model, base, wrong_shape, matched.unmatched)
    if matched.unmatched:
        logger.warning("LoRA %s: %d of its layers have no counterpart in this model (e.g. %s)",
                       lora.name, len(matched.unmatched), matched.unmatched[0])
    return matched


def _layer_shape(targets: tuple[Target, ...]) -> torch.Size:
    """The shape of the weight a file's layer updates: its one module's, or the rows of all its shares."""
    shape = targets[0].module.weight.shape
    if targets[0].rows is None:
        return shape
    return torch.Size((sum(stop - start for t in targets for start, stop in t.rows), *shape[1:]))


def _refusal(lora: LoraFile, model, base: str | None, wrong_shape: Sequence[str] = (),
             unmatched: Sequence[str] = ()) -> LoraError:
    label = model.engine.label  # the model's own name for its family ("FLUX.1")
    if base == model.family and wrong_shape:
        return LoraError(f"LoRA '{lora.name}' was made for a {label} model of another size (layer "
                         f"{wrong_shape[0]} does not fit this checkpoint's): skipped")
    if base == model.family:
        return LoraError(f"LoRA '{lora.name}' names no layer of this {label} checkpoint (e.g. {unmatched[0]}); "
                         "its layout is not one Easel reads: skipped")
    made_for = FAMILY_LABELS.get(base or "", "another base model")
    return LoraError(f"LoRA '{lora.name}' was made for {made_for}, not for this {label} checkpoint: skipped")


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
        if fp8_storage.is_fp8(module) and _offloaded_weights(module) is None:
            # fp8 storage: merge in the compute precision, store the result in fp8 (the base is kept as is)
            merged = update.add_to(fp8_storage.weight_for_update(module), strength)
            self._base.setdefault(id(module), (module, module.weight.data))
            fp8_storage.set_weight(module, merged)
            return
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
