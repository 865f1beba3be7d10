"""Options kept in `config.json` in the data folder (A1111 keeps its settings there too).

Written atomically (temporary file, then rename), so a crash mid-write never leaves a broken file; an
unreadable or partly invalid file falls back to defaults field by field and says which.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from dataclasses import field as dataclass_field
from pathlib import Path

from backend.errors import InputError
from backend.request import EMPHASIS_MODES, MAX_CONTROL_UNITS, RANDN_SOURCES
from backend.sampler_settings import SamplerSettings
from backend.samplers import SAMPLER_NAMES
from backend.settings import MODEL_FOLDERS

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
FP8_STORAGE = ("Disable", "Enable for SDXL", "Enable")  # A1111's choices
VAE_TILING = ("Automatic", "Always", "Never")


@dataclass
class Options(SamplerSettings):
    """Easel's options; A1111's sampler settings (eta, sigma churn, UniPC's...) come first, from
    `SamplerSettings`."""

    # Saving
    save_images: bool = True  # txt2img and img2img results go to the outputs folder
    outdir_txt2img: str = ""  # empty: <outputs>/txt2img-images
    outdir_img2img: str = ""  # empty: <outputs>/img2img-images
    filename_pattern: str = "[seed]"  # after the NNNNN- number; A1111's tags
    save_txt: bool = False  # a .txt with the infotext beside each image
    # Models
    checkpoint_cache: int = 1  # checkpoints kept loaded
    # A1111's "FP8 weight": the UNet's / transformer's linear weights stored in fp8 (half the memory), each
    # layer cast to the compute precision as it runs. Disable, Enable for SDXL (and FLUX.1 / SD 3.5), Enable
    fp8_storage: str = "Disable"
    # The VAE in tiles (large images on small GPUs): Automatic (images over 2048x2048, and after running out of
    # memory), Always, Never
    vae_tiling: str = "Automatic"
    # Speed: torch.compile the UNet / transformer (compiled once per model and image shape, at the first job:
    # minutes; then faster), and channels-last memory layout for the UNet's convolutions (often faster on GPUs)
    torch_compile: bool = False
    channels_last: bool = False
    # Defaults of the txt2img / img2img controls
    default_sampler: str = "DPM++ 2M"
    default_steps: int = 20
    default_cfg_scale: float = 7.0
    # Live preview: every N steps (0 turns previews off)
    live_preview_every: int = 5
    # How (word:1.2) weights apply (A1111's "Emphasis mode")
    emphasis: str = "Original"
    # Prompt and negative prompt of different lengths (over 75 tokens, BREAK): False runs the UNet on each
    # at its own length (A1111's default); True pads the shorter with the empty prompt to batch them
    # (A1111's "Pad prompt/negative prompt": faster, other images; infotexts say `Pad conds: True`)
    pad_cond_uncond: bool = False
    # A1111's "Use old prompt editing timelines": a `when` below 1 is a fraction of the pass, any other a
    # step, and the hires pass starts its timeline over (infotext `Old prompt editing timelines: True`)
    use_old_scheduling: bool = False
    # Wildcards: one expansion for the whole batch instead of one per image
    same_wildcards: bool = False
    # Face restoration (A1111's settings of the same names)
    face_restoration_model: str = "CodeFormer"
    code_former_weight: float = 0.5  # 0: strongest, 1: weakest
    save_images_before_face_restoration: bool = False
    face_restoration_unload: bool = False  # free the model after each use (small GPUs)
    upscaler_unload: bool = False  # the same for upscaler models
    # Upscaler tiles (A1111's names): input pixels per tile side (0: no tiling) and overlap
    ESRGAN_tile: int = 192
    ESRGAN_tile_overlap: int = 8
    # Noise source (A1111's randn_source): GPU (the device's generator), CPU, or NV (an NVIDIA GPU's noise on
    # any machine); infotexts record it as `RNG`
    randn_source: str = "GPU"
    # A1111's "Eta noise seed delta" (ENSD): ancestral and other per-step noise comes from generators seeded
    # seed + this (31337 in NovelAI-style infotexts); 0 continues each image's own generator
    eta_noise_seed_delta: int = 0
    # X/Y/Z plot: the most cells a plot may have, and the largest grid image (megapixels)
    xyz_max_cells: int = 1024
    xyz_max_megapixels: int = 64
    # ControlNet (sd-webui-controlnet's names): units each page shows (read when the UI is built: takes effect
    # at restart), and ControlNet models kept loaded (least recently used freed first; applied at once)
    control_net_unit_count: int = 3
    control_net_model_cache_size: int = 2
    # Extensions turned off in the Extensions tab (by folder name); applied at the next start
    disabled_extensions: list = dataclass_field(default_factory=list)

    def validate(self) -> None:
        try:
            self.settings().validate()
        except InputError as error:
            raise ValueError(str(error)) from None
        if self.checkpoint_cache < 1:
            raise ValueError("checkpoint cache size must be at least 1")
        if self.vae_tiling not in VAE_TILING:
            raise ValueError(f"VAE tiling must be one of: {', '.join(VAE_TILING)}")
        if self.fp8_storage not in FP8_STORAGE:
            raise ValueError(f"FP8 weight must be one of: {', '.join(FP8_STORAGE)}")
        if self.default_sampler not in SAMPLER_NAMES:
            raise ValueError(f"default sampler must be one of: {', '.join(SAMPLER_NAMES)}")
        if not 1 <= self.default_steps <= 150:
            raise ValueError("default steps must be between 1 and 150")
        if self.default_cfg_scale < 0:
            raise ValueError("default CFG scale must be 0 or more")
        if not 0 <= self.eta_noise_seed_delta < 2**63:
            raise ValueError("eta noise seed delta (ENSD) must be 0 or a positive whole number")
        if self.randn_source not in RANDN_SOURCES:
            raise ValueError(f"random number source must be one of: {', '.join(RANDN_SOURCES)}")
        if self.emphasis not in EMPHASIS_MODES:
            raise ValueError(f"emphasis must be one of: {', '.join(EMPHASIS_MODES)}")
        if self.face_restoration_model not in ("CodeFormer", "GFPGAN"):
            raise ValueError("face restoration model must be CodeFormer or GFPGAN")
        if not 0 <= self.code_former_weight <= 1:
            raise ValueError("CodeFormer weight must be between 0 and 1")
        if self.ESRGAN_tile < 0 or not 0 <= self.ESRGAN_tile_overlap <= 128:
            raise ValueError("upscaler tile size must be 0 (no tiles) or more, and its overlap 0-128")
        if not 1 <= self.xyz_max_cells <= 100_000 or not 1 <= self.xyz_max_megapixels <= 1024:
            raise ValueError("X/Y/Z plot limits: 1-100,000 cells and 1-1,024 megapixels")
        if not isinstance(self.pad_cond_uncond, bool):
            raise ValueError("pad_cond_uncond must be true or false")
        if not 1 <= self.control_net_unit_count <= MAX_CONTROL_UNITS:
            raise ValueError(f"ControlNet unit number must be between 1 and {MAX_CONTROL_UNITS}")
        if not 1 <= self.control_net_model_cache_size <= 8:
            raise ValueError("ControlNet model cache size must be between 1 and 8")
        if self.live_preview_every < 0:
            raise ValueError("live preview period must be 0 (off) or more")

    def upscaler_tile(self):
        from backend.upscalers import TileSettings

        return TileSettings(self.ESRGAN_tile, self.ESRGAN_tile_overlap)



def load_options(path: Path) -> Options:
    """Options from `path`; missing, unreadable or invalid entries keep their defaults."""
    options = Options()
    try:
        stored = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return options
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring %s (%s); using default options", path, exc)
        return options
    if not isinstance(stored, dict):
        logger.warning("Ignoring %s: not a JSON object; using default options", path)
        return options
    for field in fields(Options):
        if field.name not in stored:
            continue
        candidate = Options(**{**asdict(options), field.name: stored[field.name]})
        try:
            if not isinstance(stored[field.name], type(getattr(options, field.name))) and not (
                isinstance(stored[field.name], int) and isinstance(getattr(options, field.name), float)
            ):
                raise ValueError(f"expected {type(getattr(options, field.name)).__name__}")
            candidate.validate()
        except ValueError as exc:
            logger.warning("Ignoring %s = %r in %s: %s", field.name, stored[field.name], path, exc)
            continue
        options = candidate
    return options


def save_options(options: Options, path: Path) -> None:
    """Validate, then write atomically: a temporary file in the same folder replaces the old one."""
    options.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(options), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


FOLDER_OPTIONS = ("outdir_txt2img", "outdir_img2img")
MAX_FOLDER_CHARS = 1024
# Folders no output option may name: the system's own and Easel's models and cache.
_SYSTEM_FOLDERS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/run", "/sbin", "/sys",
                   "/usr")


def check_output_folder(key: str, value: str, settings) -> None:
    """An output folder option must be a folder Easel may write its images into: not the file system's
    root, not a system folder, not the models or cache folder. Empty means the default folder."""
    if not value.strip():
        return
    if len(value) > MAX_FOLDER_CHARS or "\0" in value:
        raise InputError(f"{key} must be a folder path of at most {MAX_FOLDER_CHARS} characters")
    folder = (Path(settings.data_dir) / value.strip()).resolve()
    refused = [Path(settings.models_dir), settings.cache_dir, *(settings.model_dir(k) for k in MODEL_FOLDERS)]
    if folder == Path(folder.anchor) or any(_inside(folder, Path(s)) for s in _SYSTEM_FOLDERS) or any(
            _inside(folder, Path(r).resolve()) for r in refused):
        raise InputError(f"{key} cannot be {folder}: choose a folder for images, such as "
                         f"{settings.output_root / 'my-images'} (system, models and cache folders are refused)")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def clean_stale_temporaries(folder: Path) -> None:
    """Remove `.config-*.json` files that an interrupted save left behind."""
    for stale in Path(folder).glob(".config-*.json"):
        try:
            stale.unlink()
        except OSError as error:
            logger.warning("Cannot remove the stale temporary %s: %s", stale, error)
