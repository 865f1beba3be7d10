"""Image preparation for img2img and inpainting: resize modes, masks, "only masked" crops, fill, overlay.

Conversions between PIL images and [-1, 1] tensors live here too.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
INPAINT_AREAS = ("Whole picture", "Only masked")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float tensor in [-1, 1], computed as A1111 computes it."""
    array = 2.0 * (np.array(image.convert("RGB")).astype(np.float32) / 255.0) - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image, as A1111 converts: float32 in [0, 1], times 255,
    truncated to 8 bits (not rounded), so the same decoded tensor gives the same bytes (NaN: black)."""
    unit = ((tensor.float() + 1.0) / 2.0).clamp(0.0, 1.0).nan_to_num(0.0).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((np.float32(255.0) * unit).astype(np.uint8), "RGB")


def resize_image(image: Image.Image, width: int, height: int, mode: str = "Just resize") -> Image.Image:
    image = image.convert("RGB")
    if mode == "Just resize":
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "Crop and resize":
        return ImageOps.fit(image, (width, height), Image.LANCZOS)
    if mode != "Resize and fill":
        raise ValueError(f"unknown resize mode '{mode}'; use one of: {', '.join(RESIZE_MODES)}")
    # Fit inside, then stretch the outermost rows or columns into the empty bands.
    if ratio < src_ratio:
        fit_w, fit_h = width, max(1, round(width / src_ratio))
    else:
        fit_w, fit_h = max(1, round(height * src_ratio)), height
    fitted = image.resize((fit_w, fit_h), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    left, top = (width - fit_w) // 2, (height - fit_h) // 2
    canvas.paste(fitted, (left, top))
    if fit_h < height:
        canvas.paste(fitted.crop((0, 0, fit_w, 1)).resize((fit_w, top)), (left, 0))
        bottom = height - top - fit_h
        canvas.paste(fitted.crop((0, fit_h - 1, fit_w, fit_h)).resize((fit_w, bottom)), (left, top + fit_h))
    if fit_w < width:
        canvas.paste(fitted.crop((0, 0, 1, fit_h)).resize((left, fit_h)), (0, top))
        right = width - left - fit_w
        canvas.paste(fitted.crop((fit_w - 1, 0, fit_w, fit_h)).resize((right, fit_h)), (left + fit_w, top))
    return canvas


def prepare_mask(mask: Image.Image, invert: bool = False, blur: int = 0) -> Image.Image:
    """A grayscale mask, white = repaint; alpha masks (transparent = repaint) are accepted too."""
    if mask.mode in ("RGBA", "LA"):
        alpha = mask.getchannel("A")
        gray = ImageOps.invert(alpha) if alpha.getextrema() != (255, 255) else mask.convert("L")
    else:
        gray = mask.convert("L")
    if invert:
        gray = ImageOps.invert(gray)
    if blur > 0:
        gray = gray.filter(ImageFilter.GaussianBlur(blur))
    return gray


def masked_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box around the mask, padded, grown to the target aspect ratio and kept inside the image."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box[0] - padding, box[1] - padding, box[2] + padding, box[3] + padding
    box_w, box_h = x2 - x1, y2 - y1
    target = width / height
    if box_w / box_h < target:
        grow = round(box_h * target) - box_w
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
    else:
        grow = round(box_w / target) - box_h
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
    # Shift the box back inside the image, then clip what still sticks out.
    for low, high, limit in ((0, 2, mask.width), (1, 3, mask.height)):
        coords = [x1, y1, x2, y2]
        if coords[low] < 0:
            coords[high] -= coords[low]
            coords[low] = 0
        if coords[high] > limit:
            coords[low] -= coords[high] - limit
            coords[high] = limit
        x1, y1, x2, y2 = max(0, coords[0]), max(0, coords[1]), coords[2], coords[3]
    return x1, y1, min(x2, mask.width), min(y2, mask.height)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": replace the masked area with colours spread in from its surroundings.

    Normalised averages over growing windows: each pass fills the holes next to known pixels with
    the mean of the known pixels around them, so the masked content itself never leaks in.
    """
    pixels = to_tensor(image)[None]
    known = (torch.from_numpy(np.array(mask.convert("L"))) < 128).float()[None, None]
    filled = pixels * known
    size = 2
    while known.min() == 0 and size < 2 * max(image.size):
        pooled = torch.nn.functional.avg_pool2d(filled * known, size, ceil_mode=True)
        weight = torch.nn.functional.avg_pool2d(known, size, ceil_mode=True)
        grid = dict(size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        estimate = torch.nn.functional.interpolate(pooled / weight.clamp(min=1e-6), **grid)
        reach = torch.nn.functional.interpolate(weight, **grid) > 1e-6
        hole = (known == 0) & reach
        filled = torch.where(hole, estimate, filled)
        known = torch.where(hole, torch.ones_like(known), known)
        size *= 2
    # rounded, not truncated: the known pixels come back exactly as they were
    array = ((filled[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def overlay(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """Keep the original outside the (blurred) mask, so untouched pixels stay exactly as they were."""
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask.convert("L"))
