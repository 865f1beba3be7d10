"""The VAE boundary: pixels -> scaled latents and back, a few images at a time within a batch (one image of 512x512
or more: the peak is one image's), in tiles when the image is large or memory ran out, with NaN checks that name
the remedy."""

from __future__ import annotations

import logging

import torch

from backend import images, memory_fallback, vae_tiling
from backend.errors import EaselError
from backend.sd_model import StableDiffusionModel

logger = logging.getLogger(__name__)

AUTO_TILE_PIXELS = 2048 * 2048
GROUP_PIXELS = 512 * 512  # images of a batch go through the VAE together up to this many pixels


def _groups(batch: torch.Tensor, pixels_each: int) -> tuple[torch.Tensor, ...]:
    """The batch in groups of up to GROUP_PIXELS pixels (at least one image each)."""
    return batch.split(max(1, GROUP_PIXELS // pixels_each))


class NonFiniteOutputError(EaselError, RuntimeError):
    """The model produced NaN/inf; the message gives the usual remedy."""


def _run(model: StableDiffusionModel, plain, tiled, pixel_hw, warnings: list[str] | None, what: str):
    """`plain()`, or `tiled()` as the model's tiling mode says: always, for a large image, or after running out
    of memory in `plain()` (not with "Never")."""
    mode = model.vae_tiling
    large = pixel_hw[0] * pixel_hw[1] > AUTO_TILE_PIXELS
    if mode == "Never" or (mode == "Automatic" and not large):
        try:
            return plain()
        except Exception as error:  # noqa: BLE001 - only out of memory is handled here
            if mode == "Never" or not memory_fallback.is_out_of_memory(error):
                raise
        memory_fallback.free_memory()
        message = f"out of memory while {what} a {pixel_hw[1]}x{pixel_hw[0]} image: done in tiles instead"
        logger.warning(message)
        if warnings is not None:
            warnings.append(message)
    return tiled()


@torch.no_grad()
def encode(model: StableDiffusionModel, pixels: torch.Tensor, warnings: list[str] | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (the distribution's mode: deterministic)."""
    shift = model.vae.config.get("shift_factor") or 0.0
    with model.use(model.vae):
        encoded = [_encode_one(model, group.to(model.device, model.vae_dtype), warnings)
                   for group in _groups(pixels, pixels.shape[-2] * pixels.shape[-1])]
    return ((torch.cat(encoded) - shift) * model.vae.config.scaling_factor).to(model.dtype)


def _encode_one(model: StableDiffusionModel, one: torch.Tensor, warnings: list[str] | None) -> torch.Tensor:
    return _run(model, lambda: model.vae.encode(one).latent_dist.mode(),
                lambda: vae_tiling.encode_tiled(model.vae, one), tuple(one.shape[-2:]), warnings, "encoding")


@torch.no_grad()
def decode(model: StableDiffusionModel, latents: torch.Tensor, warnings: list[str] | None = None) -> list:
    """Scaled latents -> PIL images; a half-precision VAE that overflows is retried in fp32."""
    if not torch.isfinite(latents).all():
        raise NonFiniteOutputError(
            "the UNet produced NaN/inf values; run with --no-half (or --precision full), "
            "or lower the CFG scale if it is very high"
        )
    scaled = latents / model.vae.config.scaling_factor + (model.vae.config.get("shift_factor") or 0.0)
    f = model.vae_scale_factor
    with model.use(model.vae):
        pixels = [_decode_one(model, group, warnings)
                  for group in _groups(scaled, scaled.shape[-2] * scaled.shape[-1] * f * f)]
    return [images.to_pil(p) for group in pixels for p in group]


def _decode_one(model: StableDiffusionModel, latent: torch.Tensor, warnings: list[str] | None) -> torch.Tensor:
    f = model.vae_scale_factor
    pixel_hw = (latent.shape[-2] * f, latent.shape[-1] * f)

    def attempt(dtype):
        one = latent.to(model.device, dtype)
        return _run(model, lambda: model.vae.decode(one).sample, lambda: vae_tiling.decode_tiled(model.vae, one),
                    pixel_hw, warnings, "decoding")

    pixels = attempt(model.vae_dtype)
    if not torch.isfinite(pixels).all() and model.vae_dtype != torch.float32:
        logger.warning("The VAE produced NaNs in half precision; retrying in full precision")
        model.upcast_vae()
        pixels = attempt(torch.float32)
    if not torch.isfinite(pixels).all():
        raise NonFiniteOutputError("the VAE produced NaN/inf values; run with --no-half-vae, or choose another VAE")
    return pixels
