"""Control maps fitted to a generation as sd-webui-controlnet fits them: resize modes and pixel perfect,
`fit_map` (resizing that keeps binary maps binary and thin lines thin), and `map_to_tensor`, which reads a
fitted map as the ControlNet's `controlnet_cond`; `prepare_control_mask` fits a unit's mask the same way."""

from __future__ import annotations

import numbers

import cv2
import numpy as np
import torch
from PIL import Image

from backend.errors import InputError

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
_RESIZE_NAMES = {**{name.lower(): name for name in RESIZE_MODES},
                 "inner fit (scale to fit)": "Crop and Resize", "scale to fit (inner fit)": "Crop and Resize",
                 "outer fit (shrink to fit)": "Resize and Fill", "envelope (outer fit)": "Resize and Fill"}


# ---- images as arrays ------------------------------------------------------------------------------------

def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def rgb_array(image: Image.Image, what: str) -> np.ndarray:
    """(H, W, 3) uint8; transparency is composited over white, as sd-webui-controlnet reads images."""
    if not isinstance(image, Image.Image):
        raise InputError(f"the {what} must be an image, not {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:] / 255.0
        return (rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.array(image.convert("RGB"))


# ---- resize modes, pixel perfect -------------------------------------------------------------------------

def resize_mode_name(value) -> str:
    """"Just Resize", "Crop and Resize" or "Resize and Fill" from a name (any case), an old name or an
    index 0-2 (3, A1111's "Just resize (latent upscale)", is "Just Resize")."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value <= 3:
        return RESIZE_MODES[0 if value == 3 else int(value)]
    if isinstance(value, str) and value.strip().lower() in _RESIZE_NAMES:
        return _RESIZE_NAMES[value.strip().lower()]
    raise InputError(f"resize_mode must be one of {', '.join(RESIZE_MODES)} (or 0-2), not {value!r}")


def pixel_perfect_resolution(image_size: tuple[int, int], target_size: tuple[int, int], resize_mode) -> int:
    """The processor resolution at which the map's short side already has its final size: the image's
    short side times the fit's scale (the smaller one for "Resize and Fill", else the larger), rounded
    half to even. Sizes are (width, height)."""
    (raw_width, raw_height), (width, height) = image_size, target_size
    scales = (float(height) / raw_height, float(width) / raw_width)
    scale = min(scales) if resize_mode_name(resize_mode) == "Resize and Fill" else max(scales)
    return int(np.round(scale * float(min(raw_height, raw_width))))


def latent_aligned(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) rounded down to multiples of 8, the size the latent decodes to."""
    width, height = (int(v) // 8 * 8 for v in size)
    if width < 8 or height < 8:
        raise InputError(f"the control image size must be at least 8x8, not {size[0]}x{size[1]}")
    return width, height


# ---- fitting a detected map to the generation size -----------------------------------------------------

_LINES = [np.array(k, np.uint8) for k in (
    [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
# Hit-or-miss elements (1: set, -1: clear, 0: either): classic thinning's edge and corner shapes in four
# quarter turns, and the spur shapes that find a line's loose ends.
_THINNING = [np.ascontiguousarray(np.rot90(np.array(e, np.int32), turn)) for turn in range(4) for e in (
    [[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])]
_SPURS = [np.ascontiguousarray(np.rot90(np.array(e, np.int32), turn)) for turn in range(4) for e in (
    [[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])]


def _thin_lines(binary: np.ndarray, prune: bool) -> np.ndarray:
    """One-pixel-wide lines: sweeps of the thinning elements (each clearing what it matches, in turn)
    until nothing changes, at most 32; `prune` then trims the loose ends once."""
    def sweep(elements: list[np.ndarray]) -> bool:
        changed = False
        for element in elements:
            hits = cv2.morphologyEx(binary, cv2.MORPH_HITMISS, element) > 127
            binary[hits] = 0
            changed |= bool(hits.any())
        return changed

    for _ in range(32):
        if not sweep(_THINNING):
            break
    if prune:
        sweep(_SPURS)
    return binary


def _rebinarize(before: np.ndarray, resized: np.ndarray, enlarged: bool) -> np.ndarray:
    """A binary map stays binary after resizing; a map of one-pixel edges stays one pixel wide."""
    ones = np.ones((3, 3), np.uint8)
    opened = cv2.dilate(cv2.erode(before, ones), ones)  # what survives an opening is not a thin line
    thin = np.count_nonzero(opened < before) * 2 > np.count_nonzero(before > 127)
    grey = np.mean(resized.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if thin:
        keep = np.zeros(grey.shape, bool)
        for line in _LINES:  # a pixel survives when it is the top of some 3-pixel line through it
            keep |= cv2.dilate(grey, line) == grey
        grey = np.where(keep, grey, 0).astype(np.uint8)
    grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
    return grey_to_rgb(_thin_lines(grey, prune=enlarged) if thin else grey)


def _colour_count(image: np.ndarray) -> int:
    """Distinct RGB colours of a uint8 map: each pixel packed into one integer (np.unique over rows
    sorts rows lexicographically, 15x slower)."""
    if image.dtype != np.uint8:
        return len(np.unique(image.reshape(-1, 3), axis=0))
    pixels = image.reshape(-1, 3).astype(np.uint32)
    return len(np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2]))


def _resize_map(detected: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes a map as sd-webui-controlnet does: maps of 3-199 colours (segmentations) by nearest
    neighbour, others by area when shrinking and cubic when enlarging; binary maps are re-thresholded
    and thin edges re-thinned. A fourth channel (an inpaint mask) follows and is thresholded at 127."""
    image, mask = (detected[:, :, :3], detected[:, :, 3]) if detected.shape[2] == 4 else (detected, None)
    if image.shape[:2] != (size[1], size[0]):
        old_area, new_area = image.shape[0] * image.shape[1], size[0] * size[1]
        colours = _colour_count(image)
        binary = colours == 2 and image.min() < 16 and image.max() > 240
        if 2 < colours < 200:
            interpolation = cv2.INTER_NEAREST
        else:
            interpolation = cv2.INTER_AREA if new_area < old_area else cv2.INTER_CUBIC
        resized = cv2.resize(image, size, interpolation=interpolation)
        mask = None if mask is None else cv2.resize(mask, size, interpolation=interpolation)
        image = _rebinarize(image, resized, new_area > old_area) if binary else resized
    if mask is None:
        return image
    return np.concatenate([image, np.where(mask > 127, 255, 0).astype(np.uint8)[:, :, None]], axis=2)


def fit_map(detected: np.ndarray, size: tuple[int, int], resize_mode="Crop and Resize") -> np.ndarray:
    """A detected map (H, W, 3 or 4) at the generation size (width, height), aligned down to multiples
    of 8: "Just Resize" stretches; "Crop and Resize" covers and crops the centre; "Resize and Fill" fits
    inside and fills the rest with the median border colour (for an inpaint map the fill is masked)."""
    mode, (width, height) = resize_mode_name(resize_mode), latent_aligned(size)
    if detected.shape[2] == 4:  # inpaint maps are resized unrounded and unclipped, as sd-webui-controlnet does
        detected = detected.astype(np.float32)
    if mode == "Just Resize":
        return _resize_map(detected, (width, height))
    old_height, old_width = detected.shape[:2]
    scales = (height / old_height, width / old_width)
    scale = min(scales) if mode == "Resize and Fill" else max(scales)
    inner = _resize_map(detected, (int(np.round(old_width * scale)), int(np.round(old_height * scale))))
    inner_height, inner_width = inner.shape[:2]
    if mode == "Crop and Resize":
        top, left = max(0, (inner_height - height) // 2), max(0, (inner_width - width) // 2)
        return np.ascontiguousarray(inner[top:top + height, left:left + width])
    border = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]])
    fill = np.median(border, axis=0).astype(inner.dtype)
    if fill.shape[0] == 4:
        fill[3] = 255  # outpainting: the new area is masked
    canvas = np.tile(fill, (height, width, 1))
    top, left = max(0, (height - inner_height) // 2), max(0, (width - inner_width) // 2)
    canvas[top:top + inner_height, left:left + inner_width] = inner
    return canvas


def map_to_tensor(fitted: np.ndarray) -> torch.Tensor:
    """A fitted map -> the ControlNet's (3, H, W) float input in [0, 1]. An inpaint map's masked pixels
    are -1 on every channel (the ControlNet inpaint protocol)."""
    x = torch.from_numpy(np.ascontiguousarray(fitted)).float().div(255.0).permute(2, 0, 1).contiguous()
    if x.shape[0] == 4:
        masked = (x[3:] > 0.5).float()
        x = x[:3] * (1.0 - masked) - masked
    return x


def prepare_control_mask(mask: Image.Image, size: tuple[int, int], resize_mode="Crop and Resize") -> torch.Tensor:
    """A unit's mask (first channel, white: masked) fitted as an inpaint mask is: (1, H, W) of 0 or 1;
    "Resize and Fill"'s new area counts as masked."""
    alpha = rgb_array(mask, "ControlNet mask")[:, :, :1]
    fitted = fit_map(np.concatenate([np.zeros_like(alpha).repeat(3, axis=2), alpha], axis=2), size, resize_mode)
    return torch.from_numpy(fitted[:, :, 3] > 127).float()[None]
