"""Cheap live previews: latents -> RGB by a fixed linear map (A1111's "Approx cheap"), no VAE decode. SD's maps
are the family's; for a VAE without one (FLUX.1's and SD 3's 16 channels) the map is fitted once from the VAE's
own encodings of flat colours."""

from __future__ import annotations

import itertools
import weakref

import torch
from PIL import Image

_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VAE -> (factors, bias)
LEVELS = (-0.8, 0.0, 0.8)  # per RGB channel: 27 flat colours to fit from


def latent_to_rgb(model) -> tuple[torch.Tensor, torch.Tensor]:
    """((channels, 3) factors, (3,) bias) turning the model's latents into RGB in [-1, 1]."""
    engine = model.engine
    if engine.preview_factors and len(engine.preview_factors) == model.vae.config.latent_channels:
        return torch.tensor(engine.preview_factors), torch.tensor(engine.preview_bias)
    if model.vae not in _FITTED:
        _FITTED[model.vae] = fit_factors(model)
    return _FITTED[model.vae]


@torch.no_grad()
def fit_factors(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares from the mean latent of each flat colour (as the VAE encodes it) to that colour."""
    from backend import vae_codec

    colours = torch.tensor(list(itertools.product(LEVELS, repeat=3)), dtype=torch.float32)
    side = 4 * model.vae_scale_factor
    pixels = colours[:, :, None, None].expand(-1, -1, side, side)
    latents = vae_codec.encode(model, pixels).float().mean(dim=(2, 3)).cpu()
    design = torch.cat([latents, torch.ones(len(colours), 1)], dim=1)
    solution = torch.linalg.lstsq(design, colours).solution
    return solution[:-1], solution[-1]


def cheap_preview(latent: torch.Tensor, model) -> Image.Image | None:
    """(C, h, w) latent -> small RGB image; None when the latent is not the model's (e.g. mid-hires)."""
    if latent.shape[0] != model.vae.config.latent_channels:
        return None
    factors, bias = latent_to_rgb(model)
    rgb = torch.einsum("chw,cr->rhw", latent.float().cpu(), factors.float()) + bias.float()[:, None, None]
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")
