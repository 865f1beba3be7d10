"""img2img and inpainting inputs: the resized init image, the mask, and their latents.

"Only masked" inpainting crops the region around the mask, generates it at the requested size, and
`restore` pastes the result back into the full original.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from backend import images
from backend.control_units import ControlUnit
from backend.request import GenerationRequest


@dataclass
class InitSource:
    original: Image.Image  # the init image at the output size (or the full image for "Only masked")
    image: Image.Image  # what the VAE encodes, at width x height (after fill)
    mask: Image.Image | None  # blurred, at width x height; white = repaint
    overlay_mask: Image.Image | None  # blurred, at the original's size, for pasting back
    crop: tuple[int, int, int, int] | None  # "Only masked": the region of `original` that was generated
    latents: torch.Tensor | None = field(default=None, repr=False)  # `image` encoded, once for all batches

    def restore(self, generated: Image.Image) -> Image.Image:
        """Put a generated image back: paste the crop, keep everything outside the mask as it was."""
        if self.mask is None:
            return generated
        if self.crop is not None:
            x1, y1, x2, y2 = self.crop
            full = self.original.copy()
            full.paste(generated.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
            generated = full
        return images.overlay(self.original, generated, self.overlay_mask)

    def control_unit(self, unit: ControlUnit) -> ControlUnit:
        """A ControlNet unit seen as sd-webui-controlnet sees it when only the masked region is generated:
        its image (the init image when it has none) and its mask fitted to the whole init image with the
        unit's resize mode, cropped to the generated region, then fitted to the generation size."""
        if self.crop is None:
            return unit
        width, height = self.image.size

        def cropped(image: Image.Image, mode: str = "RGB") -> Image.Image:
            full = images.resize_image(image, *self.original.size, mode=unit.resize_mode.capitalize())
            return images.resize_image(full.crop(self.crop), width, height, "Resize and fill").convert(mode)

        image = cropped(unit.image if unit.image is not None else self.original)
        return replace(unit, image=image, mask=None if unit.mask is None else cropped(unit.mask, "L"))


def prepare(request: GenerationRequest, width: int, height: int) -> InitSource:
    original = images.resize_image(request.init_image, width, height, request.resize_mode)
    if request.mask is None:
        return InitSource(original, original, None, None, None)
    # Read the mask (alpha or grayscale) at its own size, then fit it exactly as the image was fitted.
    gray = images.prepare_mask(request.mask, request.invert_mask, 0)
    sharp = images.resize_image(gray.convert("RGB"), width, height, request.resize_mode).convert("L")
    blurred = images.prepare_mask(sharp, False, request.mask_blur)
    crop = None
    image, work_mask = original, blurred
    if request.inpaint_area == "Only masked":
        crop = images.masked_region(sharp, request.only_masked_padding, width, height)
        if crop is not None:
            image = original.crop(crop).resize((width, height), Image.LANCZOS)
            work_mask = blurred.crop(crop).resize((width, height), Image.LANCZOS)
    if request.masked_content == "fill":
        image = images.fill_masked(image, work_mask)
    return InitSource(original, image, work_mask, blurred, crop)


def latent_mask(mask: Image.Image, latent_shape: tuple[int, int], device, dtype) -> torch.Tensor:
    """(1, 1, h, w) mask in [0, 1] at latent resolution, 1 = repaint."""
    h, w = latent_shape
    small = mask.convert("L").resize((w, h), Image.BILINEAR)
    tensor = torch.from_numpy(np.array(small, dtype=np.float32) / 255.0)
    return tensor[None, None].to(device, dtype)
