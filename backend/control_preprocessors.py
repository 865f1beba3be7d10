"""ControlNet preprocessors ("modules") and control images as sd-webui-controlnet names and makes them: the
module registry and its sliders, the modules, and the control image: a map detected at the processor
resolution (`detect_map`), fitted and read as the ControlNet's input by `control_maps`."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from backend import depth_anything
from backend.control_maps import (
    fit_map,
    grey_to_rgb,
    latent_aligned,
    map_to_tensor,
    pixel_perfect_resolution,
    resize_mode_name,
    rgb_array,
)
from backend.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slider:
    """One slider as sd-webui-controlnet's `/controlnet/module_list` reports it."""

    name: str
    value: float
    minimum: float
    maximum: float
    step: float = 0.01  # sd-webui-controlnet's default step, even for 0-255 thresholds

    def api_json(self) -> dict:
        return {"name": self.name, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)


@dataclass(frozen=True)
class ModuleInput:
    """What a module's `run` receives. `image`: (H, W, 3) uint8 RGB, or (H, W, 4) with the mask as the
    fourth channel for a module that takes a mask. `weights`: the loaded model of a `needs_weights` module."""

    image: np.ndarray
    resolution: int
    threshold_a: float
    threshold_b: float
    rng: np.random.RandomState
    weights: object | None = None


@dataclass(frozen=True)
class Module:
    """A preprocessor. `resolution` None: no resolution slider (the module runs at 512 or ignores it)."""

    name: str
    run: Callable[[ModuleInput], np.ndarray]
    label: str | None = None  # the name the UI shows (`alias_names=true`)
    resolution: Slider | None = RESOLUTION
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    priority: int = 0  # sd-webui-controlnet's sorting_priority: higher is listed first
    takes_mask: bool = False
    model_free: bool = False  # runs without a ControlNet model (sd-webui-controlnet's reference_*)
    needs_weights: bool = False  # a model-based preprocessor: `weights` must be supplied

    @property
    def display_name(self) -> str:
        return self.label or self.name

    def sliders(self) -> list[Slider]:
        return [s for s in (self.resolution, self.threshold_a, self.threshold_b) if s is not None]


# ---- the modules -------------------------------------------------------------------------------------

def _resized(image: np.ndarray, resolution: int) -> np.ndarray:
    """The short side scaled to `resolution` (cubic up, area down, sizes rounded half to even)."""
    height, width = image.shape[:2]
    k = float(resolution) / min(height, width)
    size = (int(np.round(width * k)), int(np.round(height * k)))
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)


def _on_padded(image: np.ndarray, resolution: int, detect: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`detect` on the resized image edge-padded to multiples of 64, then cropped back (the padding
    changes filters near the right and bottom edges: kept for identical maps)."""
    resized = _resized(image, resolution)
    height, width = resized.shape[:2]
    pad = [(0, -height % 64), (0, -width % 64), (0, 0)]
    return np.ascontiguousarray(detect(np.pad(resized, pad, mode="edge"))[:height, :width])


def _identity(inp: ModuleInput) -> np.ndarray:
    return inp.image


def _canny(inp: ModuleInput) -> np.ndarray:
    low, high = int(inp.threshold_a), int(inp.threshold_b)
    return grey_to_rgb(_on_padded(inp.image, inp.resolution, lambda x: cv2.Canny(x, low, high)))


def _threshold(inp: ModuleInput) -> np.ndarray:
    darkest = np.min(_resized(inp.image, inp.resolution), axis=2)
    return grey_to_rgb(np.where(darkest > inp.threshold_a, 255, 0).astype(np.uint8))


def _xdog(inp: ModuleInput) -> np.ndarray:
    def detect(image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32)
        dog = np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2)
        dog = (255 - dog).clip(0, 255).astype(np.uint8)
        # 2 * (255 - dog) in 8 bits, wrapping modulo 256 as sd-webui-controlnet's uint8 arithmetic does
        strength = (2 * (255 - dog.astype(np.int32))) % 256
        return grey_to_rgb(np.where(strength > inp.threshold_a, 255, 0).astype(np.uint8))

    return _on_padded(inp.image, inp.resolution, detect)


def _lineart_standard(inp: ModuleInput) -> np.ndarray:
    def detect(image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32)
        darkness = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
        lines = darkness[darkness > 8]
        darkness /= max(16, np.median(lines)) if lines.size else 16  # the median line reads as 127
        darkness *= 127
        return grey_to_rgb(darkness.clip(0, 255).astype(np.uint8))

    return _on_padded(inp.image, inp.resolution, detect)


def _blur_gaussian(inp: ModuleInput) -> np.ndarray:
    return cv2.GaussianBlur(_resized(inp.image, inp.resolution), (0, 0), float(inp.threshold_a))


def _tile_resample(inp: ModuleInput) -> np.ndarray:
    rate = float(inp.threshold_a)
    if rate < 1.1:
        return inp.image
    height, width = inp.image.shape[:2]
    return cv2.resize(inp.image, (int(width / rate), int(height / rate)), interpolation=cv2.INTER_AREA)


def _smooth_noise(height: int, width: int, rng: np.random.RandomState, cell: int = 256) -> np.ndarray:
    """A smooth random field in [0, 1]: uniform noise on a coarse grid, cubic-upsampled, normalised."""
    coarse = rng.uniform(0, 1, size=(height // cell + 2, width // cell + 2))
    field = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    field = field[cell:cell + height, cell:cell + width]
    field -= np.min(field)
    field /= np.max(field)
    return field


def _shuffle(inp: ModuleInput) -> np.ndarray:
    image = _resized(inp.image, inp.resolution)
    height, width = image.shape[:2]
    source_x = _smooth_noise(height, width, inp.rng) * float(width - 1)
    source_y = _smooth_noise(height, width, inp.rng) * float(height - 1)
    flow = np.stack([source_x, source_y], axis=2).astype(np.float32)
    return cv2.remap(image, flow, None, cv2.INTER_LINEAR)


def _color(inp: ModuleInput) -> np.ndarray:
    height, width, res = *inp.image.shape[:2], inp.resolution
    size = (int(round(width / height * res)), res) if height < width else (res, int(round(height / width * res)))
    image = cv2.resize(inp.image, size, interpolation=cv2.INTER_AREA)
    cells = cv2.resize(image, (max(1, size[0] // 64), max(1, size[1] // 64)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, size, interpolation=cv2.INTER_NEAREST)


def _depth_anything_v2(inp: ModuleInput) -> np.ndarray:
    # Normalised over the padded image, as sd-webui-controlnet does (the padding can hold the extremes).
    return grey_to_rgb(_on_padded(inp.image, inp.resolution, lambda x: depth_anything.depth_map(inp.weights, x)))


_VARIATION = Slider("Variation", 8.0, 3.0, 32.0, 1.0)  # tile_colorfix's blur radius in latent pixels

_ALL = (
    Module("none", _identity, priority=10),
    Module("canny", _canny, threshold_a=Slider("Low Threshold", 100, 1, 255, 1),
           threshold_b=Slider("High Threshold", 200, 1, 255, 1), priority=100),
    Module("invert", lambda inp: 255 - inp.image, label="invert (from white bg & black line)", resolution=None,
           priority=20),
    Module("blur_gaussian", _blur_gaussian, threshold_a=Slider("Sigma", 9.0, 0.01, 64.0)),
    Module("scribble_xdog", _xdog, threshold_a=Slider("XDoG Threshold", 32, 1, 64)),
    Module("shuffle", _shuffle, resolution=None),
    Module("inpaint", _identity, label="inpaint_global_harmonious", resolution=None, takes_mask=True),
    Module("inpaint_only", _identity, resolution=None, priority=100, takes_mask=True),
    Module("threshold", _threshold, threshold_a=Slider("Binarization Threshold", 127, 0, 255)),
    Module("lineart_standard", _lineart_standard, label="lineart_standard (from white bg & black line)",
           priority=100),
    Module("tile_resample", _tile_resample, threshold_a=Slider("Down Sampling Rate", 1.0, 1.0, 8.0), priority=100),
    Module("color", _color, label="t2ia_color_grid"),
    Module("depth_anything_v2", _depth_anything_v2, resolution=None, needs_weights=True),
    # The image passes through; the colour fix runs during sampling (`control_pass.color_fixed`).
    Module("tile_colorfix", _identity, resolution=None, threshold_a=_VARIATION),
    Module("tile_colorfix+sharp", _identity, resolution=None, threshold_a=_VARIATION,
           threshold_b=Slider("Sharpness", 1.0, 0.0, 2.0, 0.01)),
    # IP-Adapters' image encoders (models/clip_vision): the image goes to the encoder as it is
    Module("ip-adapter-auto", _identity, resolution=None, priority=100),
    Module("ip-adapter_clip_h", _identity, resolution=None),
    Module("ip-adapter_clip_g", _identity, resolution=None),
)
# sd-webui-controlnet's older names, which clients and infotexts still send
_ALIASES = {"ip-adapter_clip_sd15": "ip-adapter_clip_h", "ip-adapter_clip_sdxl_plus_vith": "ip-adapter_clip_h",
            "ip-adapter_clip_sdxl": "ip-adapter_clip_g"}
MODULES: dict[str, Module] = {m.name: m for m in _ALL}
_BY_LABEL = {m.display_name: m for m in _ALL}


# ---- the registry as the API reports it ----------------------------------------------------------------

def _sorted_modules() -> list[Module]:
    """"none" first, then by priority and label, both descending (sd-webui-controlnet's order)."""
    rest = [m for m in MODULES.values() if m.name != "none"]
    rest.sort(key=lambda m: str(m.priority).zfill(8) + m.display_name, reverse=True)
    return [MODULES["none"], *rest]


def module_list(alias_names: bool = False) -> list[str]:
    return [m.display_name if alias_names else m.name for m in _sorted_modules()]


def module_detail(alias_names: bool = False) -> dict[str, dict]:
    """`module_detail` of `/controlnet/module_list`: per module, model_free and its sliders."""
    return {(m.display_name if alias_names else m.name): {"model_free": m.model_free, "sliders": sliders(m.name)}
            for m in _sorted_modules()}


def sliders(module: str) -> list[dict]:
    return [s.api_json() for s in get_module(module).sliders()]


def get_module(name: str) -> Module:
    """A module by its name or its label, as clients send either."""
    module = MODULES.get(_ALIASES.get(name, name)) or _BY_LABEL.get(name)
    if module is None:
        raise InputError(f"ControlNet module {name!r} is not available; available: {', '.join(module_list())}")
    return module


def _slider_value(slider: Slider | None, value, field: str, module: Module, strict: bool) -> float | None:
    if slider is None:
        return None
    if value is None or value == -1:
        return slider.value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{field} must be a number (-1 for {module.name}'s default), not {value!r}")
    if slider.minimum <= value <= slider.maximum:
        return value
    message = (f"{field} {value} is outside {module.name}'s {slider.name} range {slider.minimum}-{slider.maximum};"
               f" send -1 for its default ({slider.value})")
    if strict:
        raise InputError(message)
    logger.info("%s; using the default", message)  # sd-webui-controlnet's leniency
    return slider.value


def resolve_values(module: str, processor_res=-1, threshold_a=-1, threshold_b=-1,
                   strict: bool = True) -> tuple[int, float, float]:
    """(resolution, threshold_a, threshold_b) a module runs with; -1 (or None): the slider's default.
    Out of range: an InputError, or with strict=False the default, as sd-webui-controlnet silently does
    (webuiapi sends 64 for both thresholds whatever the module). A module without a resolution slider
    runs at 512; values for sliders a module lacks are not used."""
    spec = get_module(module)
    resolution = _slider_value(spec.resolution, processor_res, "processor_res", spec, strict)
    a = _slider_value(spec.threshold_a, threshold_a, "threshold_a", spec, strict)
    b = _slider_value(spec.threshold_b, threshold_b, "threshold_b", spec, strict)
    return int(resolution or RESOLUTION.value), 0.0 if a is None else a, 0.0 if b is None else b


def numpy_seed(seed: int, subseed: int = -1) -> int:
    """The seed sd-webui-controlnet gives numpy before preprocessing (`shuffle`'s randomness) for an
    A1111 image of this resolved seed and requested subseed (-1: the seed again)."""
    seed = max(int(seed), 0)
    return (seed + (seed if subseed == -1 else max(int(subseed), 0))) & 0xFFFFFFFF


# ---- images in, maps out ---------------------------------------------------------------------------------

def _module_array(module: Module, image: Image.Image, mask: Image.Image | None, need_mask: bool) -> np.ndarray:
    """The module's input: RGB, with the mask's first channel as a fourth for a module that takes one
    (no mask: nothing masked)."""
    array = rgb_array(image, "ControlNet image")
    if not module.takes_mask:
        if mask is not None:
            logger.debug("module %s takes no mask; the mask is not used by the preprocessor", module.name)
        return array
    if mask is None and need_mask:
        raise InputError(f"module {module.name} needs a mask (white: the area to inpaint)")
    alpha = np.zeros(array.shape[:2], np.uint8) if mask is None else rgb_array(mask, "ControlNet mask")[:, :, 0]
    if alpha.shape != array.shape[:2]:
        raise InputError(f"the ControlNet mask is {alpha.shape[1]}x{alpha.shape[0]} but its image is "
                         f"{array.shape[1]}x{array.shape[0]}; send them at the same size")
    return np.concatenate([array, alpha[:, :, None]], axis=2)


def _detect(module: Module, array: np.ndarray, values: tuple[int, float, float], seed: int, weights) -> np.ndarray:
    if module.needs_weights and weights is None:
        raise InputError(f"module {module.name} needs its preprocessor model loaded; none was given")
    return module.run(ModuleInput(array, *values, np.random.RandomState(seed & 0xFFFFFFFF), weights))


def detect_map(module: str, image: Image.Image, resolution=-1, threshold_a=-1, threshold_b=-1,
               mask: Image.Image | None = None, seed: int = 0, strict: bool = True, weights=None) -> np.ndarray:
    """The detected map at the processor resolution: (H, W, 3) uint8, or (H, W, 4) with the mask for
    the inpaint modules. `seed`: numpy's seed for the random modules (see `numpy_seed`)."""
    spec = get_module(module)
    values = resolve_values(spec.name, resolution, threshold_a, threshold_b, strict)
    return _detect(spec, _module_array(spec, image, mask, need_mask=True), values, seed, weights)


def run_preprocessor(module: str, image: Image.Image, resolution=-1, threshold_a=-1, threshold_b=-1,
                     mask: Image.Image | None = None, seed: int = 0, strict: bool = True, weights=None) -> Image.Image:
    """What `/controlnet/detect` returns and the preview shows. The inpaint modules show the image with
    the masked area half transparent (alpha 255 - mask / 2)."""
    detected = detect_map(module, image, resolution, threshold_a, threshold_b, mask, seed, strict, weights)
    if detected.shape[2] == 4:
        shown = detected.copy()
        shown[:, :, 3] = 255 - shown[:, :, 3] // 2
        return Image.fromarray(shown, "RGBA")
    return Image.fromarray(detected, "RGB")


def prepare_control_image(image: Image.Image, module: str, size: tuple[int, int], resize_mode="Crop and Resize",
                          processor_res=-1, threshold_a=-1, threshold_b=-1, pixel_perfect: bool = False,
                          mask: Image.Image | None = None, seed: int = 0, strict: bool = True,
                          weights=None) -> torch.Tensor:
    """The (3, H, W) `controlnet_cond` for a generation of `size` (width, height), H and W the size
    aligned down to multiples of 8. For the hires pass, fit the same `detect_map` result again."""
    # 1. Check inputs
    spec, mode, target = get_module(module), resize_mode_name(resize_mode), latent_aligned(size)
    values = resolve_values(spec.name, -1 if pixel_perfect else processor_res, threshold_a, threshold_b, strict)
    array = _module_array(spec, image, mask, need_mask=False)
    # 2. Pixel perfect: run where the map's short side already has its final size
    if pixel_perfect:
        resolution = pixel_perfect_resolution((array.shape[1], array.shape[0]), target, mode)
        values = (resolution, *values[1:])
    # 3. Detect, fit to the generation size, read as the ControlNet's input
    return map_to_tensor(fit_map(_detect(spec, array, values, seed, weights), target, mode))
