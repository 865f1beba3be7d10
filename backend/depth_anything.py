"""Depth Anything V2 as sd-webui-controlnet's `depth_anything_v2` preprocessor runs it, through transformers'
`DepthAnythingForDepthEstimation`: the network's input (Depth Anything's own lower-bound size, resized and
normalised as transformers' DPT image processor does) and the relative inverse depth as a 0-255 map."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

INPUT_SIZE = 518  # the short side Depth Anything was trained at
PATCH_SIZE = 14  # DINOv2's patch: both sides are multiples of it
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def network_size(width: int, height: int, size: int = INPUT_SIZE, multiple: int = PATCH_SIZE) -> tuple[int, int]:
    """(width, height) the network sees: the image scaled, aspect kept, until both sides reach `size`, each
    side rounded to a multiple of `multiple` (half to even) and never below `size`. This is Depth Anything's
    `lower_bound` resize, which sd-webui-controlnet uses; transformers' processor scales "as little as
    possible" instead, which agrees whenever one side is at least `size` and the other about `size` or more."""
    scale = max(size / width, size / height)

    def side(length: int) -> int:
        scaled = length * scale
        rounded = int(np.round(scaled / multiple)) * multiple
        return rounded if rounded >= size else math.ceil(scaled / multiple) * multiple

    return side(width), side(height)


def network_input(image: np.ndarray) -> torch.Tensor:
    """(1, 3, h, w) float32 for an (H, W, 3) uint8 RGB image: resized to `network_size` bicubically with
    antialiasing in 8 bits (as transformers' DPT image processor resizes), scaled to 0-1, ImageNet-normalised."""
    height, width = image.shape[:2]
    new_width, new_height = network_size(width, height)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    if (new_height, new_width) != (height, width):
        pixels = F.interpolate(pixels, size=(new_height, new_width), mode="bicubic", align_corners=False,
                               antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


@torch.no_grad()
def predicted_depth(model: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    """The network's relative inverse depth (larger: nearer), (h, w) float32 on the CPU at its input size."""
    parameter = next(model.parameters())
    pixels = network_input(image).to(parameter.device, parameter.dtype)
    return model(pixel_values=pixels).predicted_depth[0].float().cpu()


def inverse_depth_map(depth: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 from a relative inverse depth: resized bilinearly to `size` (height, width), stretched to
    0-255 (the nearest white) and truncated, as sd-webui-controlnet writes it; a flat prediction is black."""
    depth = depth.float()
    if not bool(torch.isfinite(depth).all()) or float(depth.max() - depth.min()) <= 0:
        return np.zeros(size, np.uint8)  # checked before resizing: interpolation turns flat into float noise
    resized = F.interpolate(depth[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    low, high = resized.min(), resized.max()
    if float(high - low) <= 0:
        return np.zeros(size, np.uint8)
    return ((resized - low) / (high - low) * 255.0).numpy().astype(np.uint8)


def depth_map(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 depth map (near: white) of an (H, W, 3) uint8 RGB image."""
    return inverse_depth_map(predicted_depth(model, image), image.shape[:2])
