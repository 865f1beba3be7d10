"""Upscalers: super-resolution models (ESRGAN, Real-ESRGAN, SwinIR and the rest that `spandrel` knows)
from `models/ESRGAN`, `models/RealESRGAN` and `models/SwinIR`, and the resamplers Lanczos and Nearest.

A1111's names: the standard files appear as "R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B", "ESRGAN_4x",
"SwinIR 4x", ...; any other file by its stem. Neural upscaling runs in overlapping tiles blended
linearly (so a 4K result fits in memory), applies the model as many times as the target scale needs,
then resizes to the exact target size; it stops between tiles when interrupted, and on a CUDA
out-of-memory error halves the tile and tries again.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend import downloads
from backend.errors import InputError
from backend.model_index import ModelFile, scan

logger = logging.getLogger(__name__)

UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors")
UPSCALER_FOLDERS = ("esrgan", "realesrgan", "swinir")
RESAMPLERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
NONE = "None"
# A1111's names for the standard files (by file stem).
KNOWN_NAMES = {
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
    "ESRGAN_4x": "ESRGAN_4x",
    "ESRGAN": "ESRGAN_4x",
    "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN": "SwinIR 4x",
    "SwinIR_4x": "SwinIR 4x",
}
# Standard models fetched on first use when downloads are allowed (A1111 does the same).
DOWNLOADABLE = {"R-ESRGAN 4x+": "RealESRGAN_x4plus.pth", "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B.pth"}
MAX_PASSES = 3  # model applications to reach a scale (A1111 stops at 3 too)
MIN_TILE = 32


class UpscalerError(InputError):
    pass


class Interrupted(Exception):
    """The job was interrupted between two tiles."""


@dataclass(frozen=True)
class UpscalerInfo:
    name: str  # what the UI and the infotext say
    file: ModelFile | None  # None for the resamplers


@dataclass(frozen=True)
class TileSettings:
    size: int = 192  # input pixels per tile side (A1111's default; 0: no tiling)
    overlap: int = 8  # input pixels shared by neighbouring tiles


def load_model(path: Path, device: torch.device | None = None):
    """A spandrel descriptor for an image super-resolution file; UpscalerError names the problem."""
    import spandrel

    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(f"{path.name}: unknown model architecture; Easel reads ESRGAN, Real-ESRGAN, "
                            "SwinIR, HAT, DAT and the other architectures the spandrel library knows") from None
    except Exception as error:  # truncated or foreign file
        raise UpscalerError(f"cannot read {path.name} ({error}); the file is damaged or not a model: "
                            "download it again") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        raise UpscalerError(f"{path.name} is a {descriptor.architecture.name} model for "
                            f"{getattr(descriptor, 'purpose', 'another task')}, not an upscaler")
    return descriptor.eval()


def _ramp(length: int, fade: int, start: bool, end: bool) -> torch.Tensor:
    """1 in the middle, rising linearly over `fade` pixels at a side shared with a neighbour."""
    weights = torch.ones(length)
    if fade > 0:
        ramp = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
        if start:
            weights[:fade] = ramp
        if end:
            weights[length - fade:] = ramp.flip(0)
    return weights


def _layout(length: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(tile starts, tile length) along one side: the fewest tiles of at most `tile` pixels that
    overlap by at least `overlap`, spread evenly so that little is computed twice."""
    if length <= tile:
        return [0], length
    count = math.ceil((length - overlap) / (tile - overlap))
    size = min(tile, math.ceil((length + (count - 1) * overlap) / count))
    return [round(i * (length - size) / (count - 1)) for i in range(count)], size


def tiled_apply(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scale: int,
                tile: TileSettings, should_stop: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """Run `model` (B,3,H,W -> B,3,H*s,W*s) over overlapping tiles, blending the overlaps linearly."""
    _, channels, height, width = image.shape
    if tile.size <= 0 or (height <= tile.size and width <= tile.size):
        return model(image)
    overlap = min(tile.overlap, tile.size // 2)
    out = torch.zeros(image.shape[0], channels, height * scale, width * scale, dtype=torch.float32,
                      device=image.device)
    total = torch.zeros(1, 1, height * scale, width * scale, dtype=torch.float32, device=image.device)
    (ys, tile_h), (xs, tile_w) = _layout(height, tile.size, overlap), _layout(width, tile.size, overlap)
    for y in ys:
        for x in xs:
            if should_stop():
                raise Interrupted
            result = model(image[:, :, y:y + tile_h, x:x + tile_w]).float()
            h, w = result.shape[2], result.shape[3]
            # Fade in over the overlap on each side that has a neighbour; weights are normalised below.
            weight = (_ramp(h, overlap * scale, y > 0, y + tile_h < height)[:, None]
                      * _ramp(w, overlap * scale, x > 0, x + tile_w < width)[None, :]).to(image.device)
            out[:, :, y * scale:y * scale + h, x * scale:x * scale + w] += result * weight
            total[:, :, y * scale:y * scale + h, x * scale:x * scale + w] += weight
    return out / total


def _to_tensor(image: Image.Image, device, dtype) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


def _to_image(tensor: torch.Tensor) -> Image.Image:
    array = (tensor[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def target_size(image: Image.Image, scale: float | None = None, size: tuple[int, int] | None = None) -> tuple[int, int]:
    if size is not None:
        return int(size[0]), int(size[1])
    if scale is None or scale <= 0:
        raise UpscalerError("give a scale above 0 or a target size")
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


class UpscalerLibrary:
    """The upscalers on disk and the two resamplers; loaded models are kept in a small LRU cache
    (never loaded twice while cached)."""

    def __init__(self, folders: list[Path], device: torch.device | None = None, half: bool = False,
                 cache_size: int = 1, download_folder: Path | None = None):
        self.folders = [Path(f) for f in folders]
        self.download_folder = Path(download_folder) if download_folder else None  # None: no downloads
        self.release_after_use = False  # free loaded models after each upscale (a setting, for small GPUs)
        self.tile = TileSettings()  # a setting: A1111's ESRGAN_tile / ESRGAN_tile_overlap
        self.device = device or torch.device("cpu")
        self.half = half and self.device.type == "cuda"
        self.cache_size = cache_size
        self._models: OrderedDict[Path, object] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0
        self._files: list[ModelFile] = []
        self.refresh()

    def refresh(self) -> None:
        self._files = [f for folder in self.folders for f in scan(folder, UPSCALER_SUFFIXES)]

    @property
    def upscalers(self) -> list[UpscalerInfo]:
        found: dict[str, UpscalerInfo] = {}
        for file in self._files:
            stem = Path(file.name).name
            name = KNOWN_NAMES.get(stem, stem)
            found.setdefault(name, UpscalerInfo(name, file))
        return [UpscalerInfo(name, None) for name in RESAMPLERS] + sorted(found.values(), key=lambda u: u.name.lower())

    @property
    def names(self) -> list[str]:
        present = [u.name for u in self.upscalers]
        fetchable = [name for name in DOWNLOADABLE if name not in present] if self.download_folder else []
        return [NONE] + present + fetchable

    def find(self, name: str) -> UpscalerInfo:
        for upscaler in self.upscalers:
            if name in (upscaler.name, upscaler.file and Path(upscaler.file.name).name,
                        upscaler.file and upscaler.file.filename):
                return upscaler
        for upscaler in self.upscalers:
            if upscaler.name.lower() == name.lower():
                return upscaler
        if name in DOWNLOADABLE:
            folder = self.download_folder or (self.folders[-1] if self.folders else Path("models", "RealESRGAN"))
            try:
                downloads.ensure(DOWNLOADABLE[name], folder, allowed=self.download_folder is not None)
            except downloads.DownloadError as error:
                raise UpscalerError(f"upscaler '{name}': {error}") from None
            self.refresh()
            return self.find(name)
        folders = ", ".join(str(f) for f in self.folders)
        raise UpscalerError(f"upscaler '{name}' not found; available: {', '.join(self.names[1:])}. "
                            f"Put the model file into one of: {folders}")

    def model(self, upscaler: UpscalerInfo):
        path = upscaler.file.path
        with self._lock:
            if path in self._models:
                self._models.move_to_end(path)
                return self._models[path]
            descriptor = load_model(path, self.device)
            if self.half and descriptor.supports_half:
                descriptor.half()
            self.loads += 1
            self._models[path] = descriptor
            while len(self._models) > max(1, self.cache_size):
                self._models.popitem(last=False)
            return descriptor

    def release(self) -> None:
        """Drop the loaded models (a setting does this after each use on small GPUs)."""
        with self._lock:
            self._models.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def upscale(self, image: Image.Image, name: str, scale: float | None = None,
                size: tuple[int, int] | None = None, tile: TileSettings | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> Image.Image:
        """`image` upscaled by `name` to exactly `size` (or `scale` times its size), in tiles of
        `tile` (default: the library's `tile` setting)."""
        tile = tile or self.tile
        width, height = target_size(image, scale, size)
        upscaler = self.find(name)
        if upscaler.file is None:
            return image.convert("RGB").resize((width, height), RESAMPLERS[upscaler.name])
        descriptor = self.model(upscaler)
        current = image.convert("RGB")
        for _ in range(MAX_PASSES):
            if current.width >= width and current.height >= height:
                break
            current = self._apply(descriptor, current, tile, should_stop)
        if self.release_after_use:
            self.release()
        if current.size == (width, height):
            return current
        return current.resize((width, height), Image.LANCZOS)

    @torch.no_grad()
    def _apply(self, descriptor, image: Image.Image, tile: TileSettings, should_stop) -> Image.Image:
        dtype = torch.float16 if self.half and descriptor.supports_half else torch.float32
        tensor = _to_tensor(image, self.device, dtype)
        settings = tile
        while True:
            try:
                return _to_image(tiled_apply(descriptor, tensor, descriptor.scale, settings, should_stop))
            except torch.cuda.OutOfMemoryError:
                smaller = (settings.size or max(tensor.shape[2:])) // 2
                if smaller < MIN_TILE:
                    raise
                logger.warning("Out of memory upscaling with %s: retrying with %d-pixel tiles",
                               descriptor.architecture.name, smaller)
                torch.cuda.empty_cache()
                settings = TileSettings(smaller, settings.overlap)

