"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, 4-channel latents, 512 px."""

from __future__ import annotations

from backend.families.unet import UNetFamily

# Least-squares fit of the SD 1.x/2.x VAE's latent channels to RGB.
SD_PREVIEW_FACTORS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


class SD1(UNetFamily):
    name, label, native_size = "sd1", "SD 1.x", 512
    preview_factors = SD_PREVIEW_FACTORS


FAMILY = SD1()
