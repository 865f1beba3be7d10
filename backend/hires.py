"""Hires fix (txt2img): generate at the base size, upscale (in latent space, or decoded with any
upscaler and encoded again), then a second img2img pass at the large size with its own steps,
denoising strength, sampler and prompts, with the same seeds, as A1111 does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend import denoiser, images, vae_codec
from backend.init_image import InitSource
from backend.request import GenerationRequest, RequestError
from backend.upscalers import Interrupted

SAME_SAMPLER = "Use same sampler"

# A1111's latent upscale modes: (interpolation, antialias).
HIRES_LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


def target_size(run: GenerationRequest) -> tuple[int, int]:
    """The second pass's (width, height): hr_resize_x/y if given (one of them keeps the aspect),
    else width/height x hr_scale; multiples of 8."""
    width, height = run.width, run.height
    if run.hr_resize_x or run.hr_resize_y:
        x = run.hr_resize_x or round(run.hr_resize_y * width / height)
        y = run.hr_resize_y or round(run.hr_resize_x * height / width)
    else:
        x, y = round(width * run.hr_scale), round(height * run.hr_scale)
    return max(8, x // 8 * 8), max(8, y // 8 * 8)


def check_upscaler(name: str, upscalers) -> str:
    if name in HIRES_LATENT_MODES:
        return name
    if not name or name == "None":
        raise RequestError(f"hires upscaler is required: one of {', '.join(HIRES_LATENT_MODES)} or an upscaler")
    return upscalers.find(name).name


def upscaled_latents(model, run: GenerationRequest, latents: torch.Tensor, size: tuple[int, int], upscalers,
                     should_stop, warnings: list[str] | None = None) -> torch.Tensor:
    """The first pass's latents brought to `size`: interpolated, or decoded, upscaled and encoded."""
    f = model.vae_scale_factor
    width, height = size
    if run.hr_upscaler in HIRES_LATENT_MODES:
        mode, antialias = HIRES_LATENT_MODES[run.hr_upscaler]
        return F.interpolate(latents.float(), size=(height // f, width // f), mode=mode,
                             antialias=antialias).to(latents.dtype)
    encoded = []
    for image in vae_codec.decode(model, latents, warnings):
        large = upscalers.upscale(image, run.hr_upscaler, size=size, should_stop=should_stop)
        encoded.append(vae_codec.encode(model, images.to_tensor(large)[None], warnings))
    return torch.cat(encoded)


def second_pass(model, run: GenerationRequest, sampler, schedule, conds, seeds, latents: torch.Tensor,
                size: tuple[int, int], upscalers, control, batch: int, extensions=None,
                warnings: list[str] | None = None, controls: list | None = None) -> torch.Tensor | None:
    """The hires pass for one batch; None when skipped or interrupted."""
    try:
        start = upscaled_latents(model, run, latents, size, upscalers, lambda: control.should_stop_batch, warnings)
    except Interrupted:
        return None
    hires_run = run.with_changes(width=size[0], height=size[1], steps=second_pass_steps(run))
    source = InitSource(original=None, image=None, mask=None, overlay_mask=None, crop=None, latents=start)
    first = first_pass_share(run)
    inputs = denoiser.BatchInputs(hires_run, sampler, schedule, conds, source, seeds, "Hires", (first, 1 - first),
                                  controls=controls or [])
    if extensions is not None:
        inputs.extensions, inputs.warnings = extensions, warnings if warnings is not None else []
    return denoiser.denoise(model, inputs, control, batch)


def second_pass_steps(run: GenerationRequest) -> int:
    """The hires pass's steps setting (0 means the first pass's); it runs their strength's share."""
    return run.hr_second_pass_steps or run.steps


def first_pass_share(run: GenerationRequest) -> float:
    """The first pass's share of a batch's steps (for progress; as A1111, the hires pass runs exactly its
    steps, the last ones of a longer schedule)."""
    hires_steps = second_pass_steps(run)
    return run.steps / (run.steps + hires_steps)


def infotext(run: GenerationRequest, upscaler: str, sampler_name: str, first_sampler: str) -> dict:
    """A1111's hires keys."""
    params = {"Denoising strength": run.denoising_strength}
    if run.hr_resize_x or run.hr_resize_y:
        params["Hires resize"] = f"{run.hr_resize_x}x{run.hr_resize_y}"
    else:
        params["Hires upscale"] = run.hr_scale
    params["Hires steps"] = run.hr_second_pass_steps or None
    params["Hires upscaler"] = upscaler
    params["Hires sampler"] = sampler_name if sampler_name != first_sampler else None
    params["Hires prompt"] = run.hr_prompt or None
    params["Hires negative prompt"] = run.hr_negative_prompt or None
    return params
