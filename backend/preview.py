"""Cheap live previews: latents -> RGB by a fixed linear map (A1111's "Approx cheap"), no VAE run."""

from __future__ import annotations

import torch
from PIL import Image

# Least-squares fits of latent channels to RGB for the SD 1.x/2.x and SDXL VAEs.
_COEFFICIENTS = {
    "sd": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
             (-0.3730, -0.2499, -0.2088)),
}


def cheap_preview(latent: torch.Tensor, family: str) -> Image.Image | None:
    """(4, h, w) latent -> small RGB image; None for latents of other channel counts."""
    if latent.shape[0] != 4:
        return None
    coefficients = torch.tensor(_COEFFICIENTS["sdxl" if family == "sdxl" else "sd"], dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", latent.float().cpu(), coefficients)
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")
