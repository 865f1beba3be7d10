"""Cheap live previews: latents -> RGB by the family's fixed linear map (A1111's "Approx cheap"), no VAE run."""

from __future__ import annotations

import torch
from PIL import Image

from backend.families import Family


def cheap_preview(latent: torch.Tensor, family: Family) -> Image.Image | None:
    """(C, h, w) latent -> small RGB image; None when the family has no map for latents of this many channels."""
    if not family.preview_factors or latent.shape[0] != len(family.preview_factors):
        return None
    factors = torch.tensor(family.preview_factors, dtype=torch.float32)
    bias = torch.tensor(family.preview_bias, dtype=torch.float32)[:, None, None]
    rgb = torch.einsum("chw,cr->rhw", latent.float().cpu(), factors) + bias
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")
