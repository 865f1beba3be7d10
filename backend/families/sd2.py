"""Stable Diffusion 2.x: OpenCLIP ViT-H's penultimate layer, 4-channel latents, 512 or 768 px (v models)."""

from __future__ import annotations

from backend.families.sd1 import SD_PREVIEW_FACTORS
from backend.families.unet import UNetFamily


class SD2(UNetFamily):
    name, label, native_size = "sd2", "SD 2.x", 512
    preview_factors = SD_PREVIEW_FACTORS


FAMILY = SD2()
