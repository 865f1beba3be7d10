"""The VAE boundary: pixels -> scaled latents and back, with NaN checks that name the remedy."""

from __future__ import annotations

import logging

import torch

from backend import images
from backend.errors import EaselError
from backend.sd_model import StableDiffusionModel

logger = logging.getLogger(__name__)


class NonFiniteOutputError(EaselError, RuntimeError):
    """The model produced NaN/inf; the message gives the usual remedy."""


@torch.no_grad()
def encode(model: StableDiffusionModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (the distribution's mean: deterministic)."""
    with model.use(model.vae):
        dist = model.vae.encode(pixels.to(model.device, model.vae_dtype)).latent_dist
    shift = model.vae.config.get("shift_factor") or 0.0
    return ((dist.mode() - shift) * model.vae.config.scaling_factor).to(model.dtype)


@torch.no_grad()
def decode(model: StableDiffusionModel, latents: torch.Tensor) -> list:
    """Scaled latents -> PIL images; a half-precision VAE that overflows is retried in fp32."""
    if not torch.isfinite(latents).all():
        raise NonFiniteOutputError(
            "the UNet produced NaN/inf values; run with --no-half (or --precision full), "
            "or lower the CFG scale if it is very high"
        )
    scaled = latents / model.vae.config.scaling_factor + (model.vae.config.get("shift_factor") or 0.0)
    with model.use(model.vae):
        pixels = model.vae.decode(scaled.to(model.device, model.vae_dtype)).sample
        if not torch.isfinite(pixels).all() and model.vae_dtype != torch.float32:
            logger.warning("The VAE produced NaNs in half precision; retrying in full precision")
            model.upcast_vae()
            pixels = model.vae.decode(scaled.to(model.device, torch.float32)).sample
    if not torch.isfinite(pixels).all():
        raise NonFiniteOutputError("the VAE produced NaN/inf values; run with --no-half-vae, or choose another VAE")
    return [images.to_pil(p) for p in pixels]
