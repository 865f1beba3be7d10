"""Extras: postprocessing of existing images (A1111's Extras tab and `extra-single-image` API).

In A1111's order: upscaler 1 by a factor or to a size (optionally covering the size and cropping to
it) with upscaler 2 blended over it by a visibility; then GFPGAN, then CodeFormer, each blended by its
visibility. The saved PNG keeps the source's `parameters` chunk and gets a `postprocessing` chunk
with A1111's keys (`Postprocess upscale by`, `Postprocess upscaler`, `GFPGAN visibility`, ...).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from backend import infotext, outputs
from backend.faces import FaceRestorationError, FaceRestorers
from backend.upscalers import NONE, UpscalerError, UpscalerLibrary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtrasRequest:
    upscaler: str = NONE
    scale: float = 2.0  # "Scale by"
    resize_to: tuple[int, int] | None = None  # "Scale to" (width, height), instead of `scale`
    crop: bool = True  # with `resize_to`: cover the size and crop the excess (A1111's "Crop to fit")
    upscaler_2: str = NONE
    upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = 0.0  # 0: off
    codeformer_visibility: float = 0.0  # 0: off
    codeformer_weight: float = 0.0  # 0: strongest (A1111's Extras default)
    save: bool = True
    output_dir: Path | None = None

    def validate(self, upscalers: UpscalerLibrary, faces: FaceRestorers | None = None) -> None:
        if self.resize_to is None and not 0 < self.scale <= 8:
            raise UpscalerError(f"scale must be above 0 and at most 8, not {self.scale}")
        if self.resize_to is not None and min(self.resize_to) < 1:
            raise UpscalerError(f"resize to must be a positive width and height, not {self.resize_to}")
        if not 0 <= self.upscaler_2_visibility <= 1:
            raise UpscalerError("upscaler 2 visibility must be between 0 and 1")
        for name in (self.upscaler, self.upscaler_2):
            if name != NONE:
                upscalers.find(name)  # fails with the list of names
        for name, value in (("GFPGAN visibility", self.gfpgan_visibility),
                            ("CodeFormer visibility", self.codeformer_visibility),
                            ("CodeFormer weight", self.codeformer_weight)):
            if not 0 <= value <= 1:
                raise FaceRestorationError(f"{name} must be between 0 and 1, not {value}")
        for name in self.face_restorers:
            if faces is None:
                raise FaceRestorationError("face restoration is not available here")
            faces.weights(name)  # fails with where to put the file

    @property
    def face_restorers(self) -> list[str]:
        return [name for name, visibility in (("GFPGAN", self.gfpgan_visibility),
                                              ("CodeFormer", self.codeformer_visibility)) if visibility > 0]


@dataclass
class ExtrasResult:
    image: Image.Image
    postprocessing: str  # A1111's "postprocessing" text
    path: Path | None = None
    notes: list[str] = field(default_factory=list)  # which face detector ran, how many faces


def _sizes(image: Image.Image, request: ExtrasRequest) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(size to upscale to, final crop size or None)."""
    if request.resize_to is None:
        return (max(1, round(image.width * request.scale)), max(1, round(image.height * request.scale))), None
    width, height = request.resize_to
    if not request.crop:
        return (width, height), None
    cover = max(width / image.width, height / image.height)
    return (math.ceil(image.width * cover), math.ceil(image.height * cover)), (width, height)


def _center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    left, top = (image.width - size[0]) // 2, (image.height - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


def postprocess(upscalers: UpscalerLibrary, image: Image.Image, request: ExtrasRequest,
                should_stop: Callable[[], bool] = lambda: False, faces: FaceRestorers | None = None) -> ExtrasResult:
    source = image.convert("RGB")
    size, crop = _sizes(source, request)
    params: dict[str, object] = {}
    result = source
    if request.upscaler != NONE or request.upscaler_2 != NONE:
        first = request.upscaler if request.upscaler != NONE else "Lanczos"
        result = upscalers.upscale(source, first, size=size, should_stop=should_stop)
        if request.upscaler_2 != NONE and request.upscaler_2_visibility > 0:
            second = upscalers.upscale(source, request.upscaler_2, size=size, should_stop=should_stop)
            result = Image.blend(result, second, request.upscaler_2_visibility)
        if crop is not None:
            result = _center_crop(result, crop)
        if request.resize_to is None:
            params["Postprocess upscale by"] = request.scale
        else:
            params["Postprocess upscale to"] = f"{request.resize_to[0]}x{request.resize_to[1]}"
            params["Postprocess crop to fit"] = request.crop
        params["Postprocess upscaler"] = request.upscaler
        if request.upscaler_2 != NONE and request.upscaler_2_visibility > 0:
            params["Postprocess upscaler 2"] = request.upscaler_2
            params["Postprocess upscaler 2 visibility"] = request.upscaler_2_visibility
    notes = []
    for name in request.face_restorers:
        visibility = request.gfpgan_visibility if name == "GFPGAN" else request.codeformer_visibility
        restoration = faces.restore(result, name, visibility, request.codeformer_weight, should_stop)
        result = restoration.image
        params[f"{name} visibility"] = visibility
        if name == "CodeFormer":
            params["CodeFormer weight"] = request.codeformer_weight
        notes.append(f"{name}: {restoration.found()}")
    text = ", ".join(f"{k}: {infotext.quote(infotext.format_value(v))}" for k, v in params.items())
    return ExtrasResult(result, text, notes=notes)


def run_extras(upscalers: UpscalerLibrary, images: list[Image.Image], request: ExtrasRequest, output_root: Path,
               should_stop: Callable[[], bool] = lambda: False, now: dt.datetime | None = None,
               faces: FaceRestorers | None = None) -> list[ExtrasResult]:
    """Postprocess each image; saved (when asked) to `output_dir` or `<outputs>/extras-images`."""
    request.validate(upscalers, faces)
    results = []
    for image in images:
        if should_stop():
            break
        result = postprocess(upscalers, image, request, should_stop, faces)
        if request.save:
            folder = request.output_dir or Path(output_root) / "extras-images"
            chunks = {"postprocessing": result.postprocessing} if result.postprocessing else {}
            try:
                result.path = outputs.save_image(result.image, folder, 0, outputs.read_infotext(image), now,
                                                 name="extras", chunks=chunks)
            except OSError as error:  # the image is still returned; the note says why it is not on disk
                logger.warning("could not save the Extras result in %s: %s", folder, error)
                result.notes.append(f"saving failed: {error.strerror or error}; the image is shown but not "
                                    f"saved in {folder}")
        results.append(result)
    return results
