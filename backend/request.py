"""`GenerationRequest`, the one request type for txt2img, img2img and inpainting, and its result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from backend.control_units import ControlUnit
from backend.errors import InputError
from backend.images import INPAINT_AREAS, MASKED_CONTENT, RESIZE_MODES
from backend.sampler_settings import SamplerSettings

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")  # as backend.conditioning
RANDN_SOURCES = ("GPU", "CPU", "NV")  # A1111's `randn_source` choices, its default first (see backend.noise)

MIN_SIZE, MAX_SIZE = 64, 4096
MAX_STEPS = 1000
MAX_BATCH_SIZE = 64
MAX_BATCH_COUNT = 1000
MAX_CONTROL_UNITS = 8
# Far longer than any prompt people write (A1111's are rarely over a few thousand characters), short
# enough that tokenizing and parsing one stays instant.
MAX_PROMPT_CHARS = 32_768
PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
# Whole-number fields: within 64 bits (seeds are unsigned) before anything compares or converts them.
INTEGER_FIELDS = ("steps", "width", "height", "batch_size", "batch_count", "clip_skip", "seed", "subseed",
                  "seed_resize_from_w", "seed_resize_from_h", "mask_blur", "only_masked_padding",
                  "hr_resize_x", "hr_resize_y", "hr_second_pass_steps")
INTEGER_RANGE = (-(2**63), 2**64)
NUMBER_FIELDS = ("cfg_scale", "distilled_cfg_scale", "shift", "subseed_strength", "denoising_strength", "hr_scale",
                 "codeformer_weight", "face_visibility", "upscale_by")


class RequestError(InputError):
    """Invalid request; the message says which field and what is accepted."""


@dataclass
class GenerationRequest:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M"
    schedule_type: str = "Automatic"
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = 3.5  # FLUX.1 dev's guidance input (Forge's "Distilled CFG Scale"); others ignore it
    shift: float = 0.0  # a flow model's schedule shift (Forge's "Shift"); 0: the family's own
    width: int | None = None  # None: the model's native size
    height: int | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    randn_source: str = "GPU"  # A1111's noise sources: GPU (the device's generator), CPU, NV (NVIDIA's, on any machine)
    eta_noise_seed_delta: int = 0  # A1111's ENSD: per-step noise from generators seeded seed + this (infotext `ENSD`)
    use_old_scheduling: bool = False  # A1111's "Old prompt editing timelines" (see prompt_parser.prompt_schedules)
    eta: float | None = None  # A1111's request `eta`; None: the sampler settings' (eta_ancestral or eta_ddim)
    sampler_settings: SamplerSettings = field(default_factory=SamplerSettings)  # from the options
    control_units: tuple[ControlUnit, ...] = ()  # ControlNet units (backend.control_units)
    emphasis: str = "Original"  # how (word:1.2) weights apply: Original, No norm, Ignore, None
    pad_cond_uncond: bool = False  # A1111's "Pad prompt/negative prompt" (see Options.pad_cond_uncond)
    styles: tuple[str, ...] = ()  # names from styles.csv, applied to both prompts at generation
    same_wildcards: bool = False  # one wildcard expansion (the first image's) for the whole batch
    checkpoint: str | None = None  # None: the active model
    vae: str | None = None  # None: the current VAE choice
    # img2img and inpainting
    init_image: Image.Image | None = None
    denoising_strength: float = 0.75
    resize_mode: str = "Just resize"
    mask: Image.Image | None = None
    mask_blur: int = 4
    masked_content: str = "original"
    inpaint_area: str = "Whole picture"
    only_masked_padding: int = 32
    invert_mask: bool = False
    # hires fix (txt2img): a second img2img pass at a larger size; `denoising_strength` is its strength
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_resize_x: int = 0  # a target size instead of hr_scale (0: use the scale)
    hr_resize_y: int = 0
    hr_upscaler: str = "Latent"  # a latent mode (HIRES_LATENT_MODES) or any upscaler name
    hr_second_pass_steps: int = 0  # 0: the first pass's steps
    hr_sampler: str | None = None  # None: the first pass's sampler
    hr_prompt: str = ""  # "": the first pass's prompt
    hr_negative_prompt: str = ""
    # after decoding: face restoration, then upscaling
    restore_faces: bool = False
    face_restorer: str = "CodeFormer"  # or "GFPGAN" (A1111's setting "Face restoration model")
    codeformer_weight: float = 0.5  # 0: strongest restoration, 1: weakest (A1111)
    face_visibility: float = 1.0  # the restored image blended over the original
    save_before_face_restoration: bool = False  # also save the image as it was before restoration
    upscaler: str | None = None  # an upscaler name ("R-ESRGAN 4x+", "Lanczos", ...); None or "None": off
    upscale_by: float = 2.0
    # extensions: panel values (or the API's alwayson_scripts args) by extension name, and the script
    # (its title) that makes the job's images instead of one generation, its values under its title
    script_args: dict = field(default_factory=dict)
    script_name: str | None = None
    # outputs
    save_images: bool = True
    output_dir: Path | None = None
    filename_pattern: str = "[seed]"  # A1111's tags: [seed], [prompt], [model_name], [sampler], ...
    save_txt: bool = False  # also write the infotext to a .txt beside each image

    @property
    def mode(self) -> str:
        return "img2img" if self.init_image is not None else "txt2img"

    def with_changes(self, **changes) -> GenerationRequest:
        return replace(self, **changes)

    def validate(self) -> None:
        """RequestError naming the first field that is out of range, not a finite number, or too long."""
        _check_numbers(self)
        for name in PROMPT_FIELDS:
            text = getattr(self, name)
            if isinstance(text, str) and len(text) > MAX_PROMPT_CHARS:
                raise RequestError(f"{name} is {len(text):,} characters long; the limit is {MAX_PROMPT_CHARS:,} "
                                   "characters")
        _need(1 <= self.steps <= MAX_STEPS, f"steps must be between 1 and {MAX_STEPS}, not {self.steps}")
        _need(self.cfg_scale >= 0, f"CFG scale must be 0 or more, not {self.cfg_scale}")
        _need(self.distilled_cfg_scale >= 0, f"Distilled CFG Scale must be 0 or more, not {self.distilled_cfg_scale}")
        _need(self.shift >= 0, f"Shift must be 0 (the model's own) or more, not {self.shift}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                check_dimension(name, value)
        _need(1 <= self.batch_size <= MAX_BATCH_SIZE, f"batch size must be between 1 and {MAX_BATCH_SIZE}")
        _need(1 <= self.batch_count <= MAX_BATCH_COUNT, f"batch count must be between 1 and {MAX_BATCH_COUNT}")
        _need(1 <= self.clip_skip <= 12, f"clip skip must be between 1 and 12, not {self.clip_skip}")
        _need(self.emphasis in EMPHASIS_MODES, f"emphasis must be one of: {', '.join(EMPHASIS_MODES)}")
        _need(isinstance(self.pad_cond_uncond, bool), "pad_cond_uncond must be true or false")
        _need(self.randn_source in RANDN_SOURCES,
              f"random number source must be one of: {', '.join(RANDN_SOURCES)}, not {self.randn_source!r}")
        _need(0 <= self.eta_noise_seed_delta < 2**64,
              f"eta noise seed delta (ENSD) must be between 0 and 2^64 - 1, not {_describe(self.eta_noise_seed_delta)}")
        _need(self.eta is None or isinstance(self.eta, (int, float)) and math.isfinite(self.eta) and self.eta >= 0,
              f"eta must be a finite number of 0 or more, not {_describe(self.eta)}")
        self.sampler_settings.validate()
        _need(len(self.control_units) <= MAX_CONTROL_UNITS,
              f"at most {MAX_CONTROL_UNITS} ControlNet units, not {len(self.control_units)}")
        for index, unit in enumerate(self.control_units):
            unit.validate(index)
        _need(0 <= self.subseed_strength <= 1, "variation strength must be between 0 and 1")
        _need(0 <= self.denoising_strength <= 1, "denoising strength must be between 0 and 1")
        _need(self.resize_mode in RESIZE_MODES, f"resize mode must be one of: {', '.join(RESIZE_MODES)}")
        _need(self.masked_content in MASKED_CONTENT, f"masked content must be one of: {', '.join(MASKED_CONTENT)}")
        _need(self.inpaint_area in INPAINT_AREAS, f"inpaint area must be one of: {', '.join(INPAINT_AREAS)}")
        for name, label in (("mask_blur", "mask blur"), ("only_masked_padding", "only masked padding")):
            value = getattr(self, name)
            _need(0 <= value <= MAX_SIZE, f"{label} must be between 0 and {MAX_SIZE}, not {value}")
        _need(self.mask is None or self.init_image is not None, "a mask needs an init image to inpaint")
        _need(0 <= self.codeformer_weight <= 1,
              f"CodeFormer weight must be between 0 and 1, not {self.codeformer_weight}")
        _need(0 <= self.face_visibility <= 1,
              f"face restoration visibility must be between 0 and 1, not {self.face_visibility}")
        _need(0 < self.upscale_by <= 8, f"upscale by must be above 0 and at most 8, not {self.upscale_by}")
        _check_hires(self)
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            value = getattr(self, name)
            _need(value <= 0 or value % 8 == 0 and value <= MAX_SIZE,
                  f"{name} must be a multiple of 8 up to {MAX_SIZE} (or 0 to turn it off)")
        for name in ("seed", "subseed"):
            _need(getattr(self, name) < 2**64, f"{name} must be below 2^64 (or -1 for a random one)")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise RequestError(message)


def _describe(value) -> str:
    """A number for a message; a huge int by its size (printing it could take long, or raise past 4300 digits)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit number"
    return repr(value) if isinstance(value, float) else str(value)


def _check_numbers(request: GenerationRequest) -> None:
    """Numbers before ranges: a non-finite float or a 70-bit int would otherwise pass a comparison here
    and overflow later (the API echoes whatever a client sends, even for options that are off)."""
    for name in INTEGER_FIELDS:
        value = getattr(request, name)
        if value is None and name in ("width", "height"):
            continue
        ok = isinstance(value, (int, float)) and (not isinstance(value, float) or math.isfinite(value))
        _need(ok and INTEGER_RANGE[0] <= value < INTEGER_RANGE[1],
              f"{name} must be a whole number that fits in 64 bits, not {_describe(value)}")
    for name in NUMBER_FIELDS:
        value = getattr(request, name)
        _need(isinstance(value, (int, float)) and math.isfinite(value),
              f"{name} must be a finite number, not {_describe(value)}")


def _check_hires(request: GenerationRequest) -> None:
    """Hires steps are checked even with hires fix off: clients send them back from an earlier result."""
    _need(0 <= request.hr_second_pass_steps <= MAX_STEPS,
          f"hires steps must be between 0 and {MAX_STEPS}, not {request.hr_second_pass_steps}")
    if not request.enable_hr:
        return
    _need(1 <= request.hr_scale <= 8, f"hires upscale must be between 1 and 8, not {request.hr_scale}")
    for name in ("hr_resize_x", "hr_resize_y"):
        value = getattr(request, name)
        _need(value == 0 or MIN_SIZE <= value <= MAX_SIZE,
              f"{name} must be 0 (use the scale) or between {MIN_SIZE} and {MAX_SIZE}, not {value}")


def check_dimension(name: str, value: int, multiple: int = 8, family: str = "") -> None:
    """A width or height: a multiple of `multiple` (8 for SD; 16 for FLUX.1 and SD 3.x) within the limits."""
    if not isinstance(value, int) or value % multiple or not MIN_SIZE <= value <= MAX_SIZE:
        nearest = (min(MAX_SIZE, max(MIN_SIZE, round(value / multiple) * multiple))
                   if isinstance(value, (int, float)) else 512)
        models = f" for {family} models" if family else ""
        raise RequestError(f"{name} must be a multiple of {multiple} between {MIN_SIZE} and {MAX_SIZE}{models}, "
                           f"not {value}; try {nearest}")


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    subseed: int
    prompt: str
    negative_prompt: str
    infotext: str
    path: Path | None = None


@dataclass
class GenerationResult:
    request: GenerationRequest  # as run: seeds resolved, sizes filled in
    images: list[GeneratedImage] = field(default_factory=list)
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what ran, for the status line (e.g. the face detector)

    @property
    def seeds(self) -> list[int]:
        return [image.seed for image in self.images]

    @property
    def paths(self) -> list[Path]:
        return [image.path for image in self.images if image.path is not None]
