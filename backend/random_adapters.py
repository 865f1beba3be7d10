"""Random-weight T2I-Adapters that fit `random_models.build(family, tiny=True)`'s UNets, for tests, and writers
for the formats users download: TencentARC's original layout (`t2iadapter_*_sd14v1.pth` / `.safetensors`,
optionally under `adapter.`) and diffusers folders. The original layout is written here, independently of
the reader in `adapter_files`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from backend import random_controlnets, random_models

# Released adapters, shrunk: the SD 1.x full adapter (pixel unshuffle 8), SDXL's (16), and the light one.
_TYPES = {"sd1": ("full_adapter", 8), "sdxl": ("full_adapter_xl", 16), "light": ("light_adapter", 8)}


def build(family: str, seed: int = 0, in_channels: int = 3):
    """A tiny diffusers `T2IAdapter` with random weights: "sd1" and "sdxl" give one feature per level of that
    family's tiny UNet; "light" is the light adapter (its features repeat the last level, so it fits no tiny
    UNet: for reading tests). `in_channels` 1: a grey-input adapter (canny, sketch)."""
    from diffusers import T2IAdapter

    adapter_type, factor = _TYPES[family]
    levels = random_models.configs("sdxl" if family == "sdxl" else "sd1", tiny=True)["unet"]["block_out_channels"]
    channels = list(levels) if family != "light" else list(levels[:-1])
    torch.manual_seed(seed)
    adapter = T2IAdapter(in_channels=in_channels, channels=channels, num_res_blocks=2, downscale_factor=factor,
                         adapter_type=adapter_type)
    with torch.no_grad():  # PyTorch's default init: perturb so that no weight is left at a trivial value
        for param in adapter.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return adapter.eval()


def tencentarc_state_dict(adapter, prefix: bool = False) -> dict[str, torch.Tensor]:
    """A diffusers `T2IAdapter`'s weights in TencentARC's layout: `Adapter` numbers its residual blocks through
    all levels (`body.{level * blocks + j}.block1`, the level's `in_conv` on its first block);
    `Adapter_light` nests them as `body.{level}.body.{j}`. Under `adapter.` with `prefix`."""
    config = adapter.config
    blocks, light = config.num_res_blocks, config.adapter_type == "light_adapter"
    out = {}
    for key, value in adapter.state_dict().items():
        parts = key.split(".")  # adapter . conv_in | body . level . (resnets . j . blockK | in_conv | out_conv) . kind
        if parts[1] == "conv_in":
            name = ".".join(parts[1:])
        elif parts[3] == "resnets":
            level, index = int(parts[2]), int(parts[4])
            block = f"body.{level}.body.{index}" if light else f"body.{level * blocks + index}"
            name = ".".join([block, *parts[5:]])
        elif parts[3] in ("in_conv", "out_conv"):
            level = int(parts[2])
            block = f"body.{level}" if light else f"body.{level * blocks}"
            name = ".".join([block, *parts[3:]])
        else:
            raise ValueError(f"no original-layout name for {key}")
        out[("adapter." if prefix else "") + name] = value.detach().contiguous().clone()
    return out


def save_tencentarc(adapter, path: Path, dtype=None, prefix: bool = False) -> Path:
    """Write `.safetensors`, or a pickled state dict (`.pth`) as TencentARC's releases are."""
    return random_controlnets.write_state_dict(tencentarc_state_dict(adapter, prefix), path, dtype)


save_diffusers = random_controlnets.save_diffusers  # the same folder layout
