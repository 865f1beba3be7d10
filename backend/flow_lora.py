"""LoRA layer names for the rectified-flow families (FLUX.1, SD 3.x): every name a LoRA file may use for a
transformer or text-encoder module, and the rows of each fused original-layout layer that each module takes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from backend.lora import Target
from backend.lora_files import Ranges

logger = logging.getLogger(__name__)

# Original-layout names (BFL's for FLUX.1, Stability's for SD 3.x) as files write them: kohya's underscored
# `lora_unet_*`, ComfyUI's and ai-toolkit's `diffusion_model.*`, some tools' `transformer.*`, or bare.
ORIGINAL_PREFIXES = ("diffusion_model.", "transformer.", "")
# diffusers' module names: peft's `transformer.*` or bare, OneTrainer's underscored `lora_transformer_*`.
DIFFUSERS_PREFIXES = ("transformer.", "")

# Each text encoder's layer-name prefixes, in the model's encoder order: kohya's (ending "_", with the
# module names underscored), diffusers' and ComfyUI's. sd-scripts writes T5 as `lora_te3_` for both families.
TEXT_ENCODER_PREFIXES = {
    "flux": (("lora_te1_", "lora_te_", "text_encoder.", "text_encoders.clip_l.transformer."),
             ("lora_te3_", "text_encoder_2.", "text_encoders.t5xxl.transformer.")),
    "sd3": (("lora_te1_", "text_encoder.", "text_encoders.clip_l.transformer."),
            ("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.transformer."),
            ("lora_te3_", "text_encoder_3.", "text_encoders.t5xxl.transformer.")),
}


def _converters() -> dict[str, Callable[[Mapping, Mapping], dict]]:
    """Each family's diffusers -> original-layout checkpoint converter."""
    from backend import flux_layout, sd3_layout

    return {"flux": flux_layout.from_diffusers, "sd3": sd3_layout.from_diffusers}


def module_names(model) -> dict[str, Target | tuple[Target, ...]]:
    """Every name a LoRA file may use for a module of this FLUX.1 / SD 3.x model. An original-layout layer
    that diffusers splits (FLUX's qkv and linear1, SD 3's qkv) or reorders (the final adaLN's shift and scale
    halves) names several targets, each with the rows of the layer's update it takes."""
    unet = model.unet
    modules = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    names: dict[str, Target | tuple[Target, ...]] = {}
    for name, module in modules.items():
        target = Target("unet", module)
        for prefix in DIFFUSERS_PREFIXES:
            names[prefix + name] = target
        names["lora_transformer_" + name.replace(".", "_")] = target
    converter = _converters().get(model.family)
    if converter is None:
        logger.warning("LoRA: no original-layout names known for %s; diffusers names only", model.engine.label)
    else:
        for original, parts in original_rows(unet, converter).items():
            if not all(name in modules for name, _ in parts):
                continue  # a norm scale or embedding, not a layer LoRAs train
            targets = tuple(Target("unet", modules[name], rows) for name, rows in parts)
            if len(targets) == 1 and _whole(targets[0]):
                targets = Target("unet", targets[0].module)
            names["lora_unet_" + original.replace(".", "_")] = targets
            for prefix in ORIGINAL_PREFIXES:
                names[prefix + original] = targets
    names.update(text_encoder_names(model))
    return names


def _whole(target: Target) -> bool:
    return target.rows == ((0, target.module.weight.shape[0]),)


def original_rows(unet: torch.nn.Module, from_diffusers: Callable[[Mapping, Mapping], dict]
                  ) -> dict[str, tuple[tuple[str, Ranges], ...]]:
    """Original-layout layer -> ((diffusers module, the layer's rows it holds, in the module's row order), ...).

    The family's checkpoint converter is run on row numbers instead of weights: whatever it renames, fuses or
    swaps, each original tensor comes back holding the numbers of the diffusers rows it is made of. So this
    map can never disagree with how checkpoints are loaded.
    """
    # 1. Number every row of every diffusers tensor, one sequence across tensors.
    keys, starts, numbered, offset = [], [], {}, 0
    for key, value in unet.state_dict().items():
        rows = value.shape[0] if value.dim() else 1
        numbered[key] = torch.arange(offset, offset + rows)
        keys.append(key)
        starts.append(offset)
        offset += rows
    first_rows = torch.tensor(starts)
    layers = {}
    for key, numbers in from_diffusers(numbered, unet.config).items():
        if not key.endswith(".weight") or numbers.dim() != 1:
            continue
        # 2. Cut the original rows into runs of consecutive rows of one diffusers tensor.
        owners = torch.searchsorted(first_rows, numbers, right=True) - 1
        cuts = ((owners[1:] != owners[:-1]) | (numbers[1:] != numbers[:-1] + 1)).nonzero().flatten() + 1
        bounds = [0, *cuts.tolist(), len(numbers)]
        runs: dict[str, list[tuple[int, int, int]]] = {}  # module -> [(its first row, start, stop)]
        for start, stop in zip(bounds, bounds[1:]):
            owner = int(owners[start])
            module = keys[owner].removesuffix(".weight")
            runs.setdefault(module, []).append((int(numbers[start]) - starts[owner], start, stop))
        # 3. Each module takes its runs in its own row order.
        layers[key.removesuffix(".weight")] = tuple(
            (module, tuple((start, stop) for _, start, stop in sorted(found))) for module, found in runs.items()
        )
    return layers


def text_encoder_names(model) -> dict[str, Target]:
    """The text encoders' LoRA names: CLIP's modules as "text_model.encoder...", T5's as "encoder.block..."."""
    names: dict[str, Target] = {}
    for encoder, prefixes in zip(model.text_encoders, TEXT_ENCODER_PREFIXES.get(model.family, ())):
        if encoder is None:  # SD 3 without its T5
            continue
        clip = encoder.config.model_type.startswith("clip")
        for name, module in encoder.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if clip and name != "text_projection":
                name = "text_model." + name.removeprefix("text_model.")  # as transformers 4 nests CLIP
            for prefix in prefixes:
                names[prefix + (name.replace(".", "_") if prefix.endswith("_") else name)] = Target("te", module)
    return names
