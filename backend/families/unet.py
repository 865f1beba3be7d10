"""What the Stable Diffusion UNet families (SD 1.x, SD 2.x, SDXL) share: detection from the UNet and text
encoder keys (`backend.model_detection`) and loading through `backend.checkpoints`."""

from __future__ import annotations

from pathlib import Path

import torch

from backend import checkpoints, model_detection
from backend.families.base import Family, Shapes
from backend.model_detection import CheckpointFormatError


class UNetFamily(Family):
    prediction = "unet"

    def claims(self, shapes: Shapes) -> bool:
        try:
            return model_detection.detect_family(shapes) == self.name
        except CheckpointFormatError:
            return False

    def load(self, path: Path, cache_dir: Path, dtype: torch.dtype, parts=None) -> checkpoints.Components:
        return checkpoints.load_single_file(path, cache_dir, dtype)

    def clip_output(self, encoder, out, clip_skip: int):
        """(context, pooled or None) of one CLIP encoder's output, at A1111's "Clip skip" (1: the last layer)."""
        state = out.hidden_states[-clip_skip]
        return (encoder.final_layer_norm(state) if clip_skip > 1 else out.last_hidden_state), None
