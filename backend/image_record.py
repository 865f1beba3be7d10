"""A generated image's record: its infotext parameters (A1111's keys, written as A1111 writes them)
and saving the image with them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from backend import infotext, k_sampling, noise, outputs, schedules
from backend.request import GeneratedImage
from backend.version import INFOTEXT_VERSION


def infotext_parameters(model, run, sampler, schedule, seed, subseed, extra: dict | None = None) -> dict:
    """A1111's infotext keys for one image, in its order (`format_infotext` leaves out empty ones)."""
    params = {
        "Steps": run.steps,
        "Sampler": sampler.name,
        "Schedule type": schedule,
        "CFG scale": run.cfg_scale,
        "Seed": seed,
        "Size": f"{run.width}x{run.height}",
        "Model hash": model.model_hash,
        "Model": Path(model.name).name,
        "VAE hash": model.vae_hash,
        "VAE": model.vae_name,  # the file name with its extension, as A1111 writes it
        "Variation seed": subseed if run.subseed_strength > 0 else None,
        "Variation seed strength": run.subseed_strength if run.subseed_strength > 0 else None,
        "Seed resize from": (
            f"{run.seed_resize_from_w}x{run.seed_resize_from_h}" if run.seed_resize_from_w > 0 else None
        ),
        "Denoising strength": run.denoising_strength if run.init_image is not None or run.enable_hr else None,
        "Clip skip": run.clip_skip if run.clip_skip > 1 else None,
        # A1111 writes ENSD only for the samplers it marks as using it (the ancestral ones, DPM fast/adaptive),
        # when their eta is not 0
        "ENSD": run.eta_noise_seed_delta if run.eta_noise_seed_delta and schedules.sampler_schedule(
            sampler.name).uses_ensd and run.sampler_settings.eta(sampler.name, run.eta) else None,
        # A1111 writes the source unless it is its default (GPU); GPU noise drawn on a CPU is the CPU's
        "RNG": rng if (rng := noise.effective_source(run.randn_source, str(model.device))) != noise.GPU else None,
        **run.sampler_settings.infotext_parameters(sampler.name, schedule, run.eta, _sigma_range(model)),
        **(extra or {}),  # Lora hashes, TI hashes, the postprocessing upscaler
        "Emphasis": run.emphasis if run.emphasis != "Original" else None,
        "Old prompt editing timelines": True if run.use_old_scheduling else None,
        "Styles array": json.dumps(list(run.styles)) if run.styles else None,
        **model.engine.infotext_parameters(model, run),
    }
    if run.mask is not None:
        params["Mask blur"] = run.mask_blur
        if run.inpaint_area == "Only masked":
            params["Inpaint area"] = "Only masked"
            params["Masked area padding"] = run.only_masked_padding
    params["Version"] = INFOTEXT_VERSION
    return params


def _sigma_range(model) -> tuple[float, float]:
    """The model's lowest and highest sigma (A1111 writes a schedule's min/max sigma setting unless equal)."""
    table = schedules.model_sigmas(k_sampling.model_alphas_cumprod(model.scheduler_config))
    return table[0].item(), table[-1].item()


def finish_image(model, run, sampler, schedule, seed: int, subseed: int, image, saver: outputs.ImageSaver, now,
                 texts: tuple[str, str], extra: dict, before_faces=None) -> GeneratedImage:
    """The image's infotext (the expanded prompts, the templates beside them), then the image saved
    with it (and the copy before face restoration, when asked)."""
    prompt, negative = texts
    params = infotext_parameters(model, run, sampler, schedule, seed, subseed, extra)
    # The expanded prompt is the prompt (the PNG reproduces alone); the template is recorded beside it.
    if prompt != run.prompt:
        params["Wildcard prompt"] = run.prompt
    if negative != run.negative_prompt:
        params["Wildcard negative prompt"] = run.negative_prompt
    text = infotext.format_infotext(prompt, negative, params)
    path = None
    if run.save_images:
        when = now or dt.datetime.now()
        name = outputs.expand_filename_pattern(run.filename_pattern, outputs.filename_values(
            prompt, seed, model.name, sampler.name, run.steps, run.cfg_scale, run.width, run.height, when))
        if before_faces is not None:  # A1111's "save a copy of the image before doing face restoration"
            saver.save(before_faces, seed, text, when, name=f"{name or seed}-before-face-restoration")
        path = saver.save(image, seed, text, when, name=name, save_txt=run.save_txt)
    return GeneratedImage(image, seed, subseed, prompt, negative, text, path)
