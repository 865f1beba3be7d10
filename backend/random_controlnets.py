"""Random-weight ControlNets that fit `random_models.build(family, tiny=True)`'s UNets, for tests, and
writers for the formats users download: lllyasviel's original layout (`.safetensors` / `.pth`) and
diffusers folders. The original layout is written here, independently of the reader in `controlnet_files`.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch

from backend import ldm_layout, random_models

# The parts a ControlNet shares with its UNet's encoder; everything else is ControlNet-only.
_UNET_PARTS = ("time_embedding.", "add_embedding.", "conv_in.", "down_blocks.", "mid_block.")
# Layers initialised to zero in a new ControlNet: random here, or every residual would be zero.
_ZERO_INITIALISED = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.",
                     "spatial_ch_projs.")


def build(family: str, seed: int = 0, union: bool = False):
    """A tiny diffusers ControlNet (`ControlNetUnionModel` with `union`, SDXL only) with random weights,
    made from the tiny UNet of the same family and seed, so it runs beside that UNet."""
    from diffusers import ControlNetModel, ControlNetUnionModel

    unet = random_models.build(family, tiny=True, seed=seed)["unet"]
    torch.manual_seed(seed + 1)
    if union:
        if family != "sdxl":
            raise ValueError("union ControlNets exist for SDXL only")
        config = dict(ControlNetModel.from_unet(unet).config)
        width = unet.config.block_out_channels[0]  # the union's task transformer runs at the first level's width
        config.update(num_trans_channel=width, num_proj_channel=width, num_trans_head=8)
        accepted = inspect.signature(ControlNetUnionModel.__init__).parameters
        model = ControlNetUnionModel.from_config({k: v for k, v in config.items() if k in accepted})
    else:
        model = ControlNetModel.from_unet(unet)
    return _randomized(model)


def for_unet(unet, seed: int = 0, hint_channels: tuple[int, ...] = (16, 32, 96, 256)):
    """A ControlNet made from `unet` (any size: the default model's too) with its zero layers randomized;
    its hint encoder downsamples 2^(len(hint_channels) - 1) times (8 as released; the VAE's factor fits)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return _randomized(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels))


def _randomized(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(_ZERO_INITIALISED):
                param.normal_(0.0, 0.1)
            else:
                param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def lllyasviel_state_dict(model, prefix: bool = True) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet's weights in lllyasviel's original layout (`input_blocks`, `zero_convs`,
    `input_hint_block`, `middle_block_out`), under `control_model.` when `prefix`."""
    state = model.state_dict()
    if "task_embedding" in state:
        raise ValueError("union ControlNets are published in the diffusers layout only; use save_diffusers")
    unet_part = {k: v for k, v in state.items() if k.startswith(_UNET_PARTS)}
    out = {k.removeprefix("model.diffusion_model."): v
           for k, v in ldm_layout.unet_to_ldm(unet_part, model.config.layers_per_block).items()}
    # The hint encoder is one Sequential of convolutions with SiLUs between them: every other index.
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    hint = {"conv_in": 0, "conv_out": 2 * (len(blocks) + 1)}
    hint.update({f"blocks.{i}": 2 * (i + 1) for i in blocks})
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("controlnet_cond_embedding."):
            layer = ".".join(parts[1:-1])
            out[f"input_hint_block.{hint[layer]}.{parts[-1]}"] = value
        elif key.startswith("controlnet_down_blocks."):
            out[f"zero_convs.{parts[1]}.0.{parts[-1]}"] = value
        elif key.startswith("controlnet_mid_block."):
            out[f"middle_block_out.0.{parts[-1]}"] = value
    missing = [k for k in state if not k.startswith(_UNET_PARTS) and not k.startswith(
        ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block."))]
    if missing:
        raise ValueError(f"no original-layout name for {missing[0]}")
    return {("control_model." if prefix else "") + k: v.detach().contiguous().clone() for k, v in out.items()}


def save_lllyasviel(model, path: Path, dtype=None, prefix: bool = True) -> Path:
    """Write `.safetensors`, or a pickled state dict (`.pth`/`.pt`/`.ckpt`) as lllyasviel's releases are."""
    return write_state_dict(lllyasviel_state_dict(model, prefix), path, dtype)


def write_state_dict(state: dict[str, torch.Tensor], path: Path, dtype=None) -> Path:
    """`state` as `.safetensors`, or pickled (`.pth`, `.pt`, `.ckpt`, `.bin`) by the suffix of `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def save_diffusers(model, folder: Path, dtype=None) -> Path:
    """Write a diffusers folder (a ControlNet's, an adapter's): `config.json` and
    `diffusion_pytorch_model.safetensors`."""
    folder = Path(folder)
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(folder)
    return folder
