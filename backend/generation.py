"""`generate`: one `GenerationRequest` -> images, for txt2img, img2img and inpainting.

Reads as numbered steps (check, activate, seeds, encode, per batch: noise, denoise, decode, save).
Each image has its own noise generator and its own scheduler, so image i of a batch is the same
image as a single generation with seed+i, whatever the sampler.
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import random
from pathlib import Path

import torch

from backend import conditioning, images, infotext, init_image, noise, outputs, preview, samplers
from backend.model_manager import ModelManager
from backend.progress import JobControl, Progress
from backend.request import GeneratedImage, GenerationRequest, GenerationResult, check_dimension
from backend.sd_model import StableDiffusionModel
from backend.version import INFOTEXT_VERSION

logger = logging.getLogger(__name__)


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN/inf; the message gives the usual remedy."""


def generate(
    manager: ModelManager,
    request: GenerationRequest,
    control: JobControl | None = None,
    rng: random.Random | None = None,
    now: dt.datetime | None = None,
) -> GenerationResult:
    control = control or JobControl()
    # 1. Check inputs
    request.validate()
    sampler, schedule = samplers.resolve(request.sampler, request.schedule_type)
    with manager.lock:
        # 2. Activate the checkpoint (a no-op when it is already active)
        model = manager.activate(request.checkpoint, request.vae)
        width = request.width or model.native_size
        height = request.height or model.native_size
        check_dimension("width", width)
        check_dimension("height", height)
        # 3. Resolve seeds: -1 means random, and the seed used is reported
        seed = noise.resolve_seed(request.seed, rng)
        subseed = noise.resolve_seed(request.subseed, rng) if request.subseed_strength > 0 else -1
        run = request.with_changes(seed=seed, subseed=subseed, width=width, height=height)
        result = GenerationResult(request=run)
        # 4. Encode the prompts once for every batch
        cond, uncond = conditioning.encode_pair(model, run.prompt, run.negative_prompt, run.clip_skip)
        source = init_image.prepare(run, width, height) if run.init_image is not None else None
        output_dir = run.output_dir or manager.settings.output_root / f"{run.mode}-images"
        for batch in range(run.batch_count):
            if control.interrupted:
                break
            control.take_skip()
            images_out = _run_batch(model, run, sampler, schedule, cond, uncond, source, batch, control)
            if images_out is None:
                continue
            for index, image in enumerate(images_out):
                result.images.append(_finish_image(
                    model, run, sampler, schedule, source, batch, index, image, output_dir, now
                ))
        result.interrupted = control.interrupted
        return result


def _seeds(run: GenerationRequest, position: int) -> tuple[int, int]:
    """Seed and variation seed of the image at `position`: the seed advances, or with a variation
    seed the variation seed advances instead (A1111)."""
    if run.subseed_strength > 0:
        return run.seed, run.subseed + position
    return run.seed + position, run.subseed


def _run_batch(model, run, sampler, schedule, cond, uncond, source, batch, control):
    n = run.batch_size
    positions = [batch * n + i for i in range(n)]
    seeds = [_seeds(run, p) for p in positions]
    f = model.vae_scale_factor
    latent_hw = (run.height // f, run.width // f)
    channels = model.vae.config.latent_channels
    resize_from = None
    if run.seed_resize_from_w > 0 and run.seed_resize_from_h > 0:
        resize_from = (run.seed_resize_from_h // f, run.seed_resize_from_w // f)
    specs = [noise.NoiseSpec(s, sub, run.subseed_strength, resize_from) for s, sub in seeds]
    # 5. Initial noise, one CPU generator per image
    start_noise, generators = noise.batch_noise(specs, (channels, *latent_hw))
    start_noise = start_noise.to(model.device, model.dtype)
    schedulers = [samplers.make_scheduler(sampler, schedule, model.scheduler_config, s) for s, _ in seeds]
    for scheduler in schedulers:
        scheduler.set_timesteps(run.steps, device=model.device)
    timesteps = schedulers[0].timesteps
    # 6. img2img: start part-way, from the noised init latents
    init_latents = mask = image_conditioning = None
    if source is not None:
        init_latents = encode_image(model, images.to_tensor(source.image)[None]).expand(n, -1, -1, -1)
        if source.mask is not None:
            mask = init_image.latent_mask(source.mask, latent_hw, model.device, model.dtype)
            init_latents = _masked_content(run.masked_content, init_latents, start_noise, mask)
        steps_to_run = max(1, min(run.steps, int(run.steps * run.denoising_strength)))
        begin = (run.steps - steps_to_run) * schedulers[0].order
        timesteps = timesteps[begin:]
        for scheduler in schedulers:
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin)
        latents = torch.cat([
            s.add_noise(init_latents[i : i + 1], start_noise[i : i + 1], timesteps[:1])
            for i, s in enumerate(schedulers)
        ])
    else:
        latents = start_noise * schedulers[0].init_noise_sigma
    if model.is_inpainting:
        image_conditioning = _inpaint_conditioning(model, source, n, latent_hw)
    added = _added_conditioning(model, cond, uncond, run, n)
    context = _context(cond, uncond, n, run.cfg_scale)
    # 7. Denoising loop
    with torch.no_grad(), model.use(model.unet):
        for step, t in enumerate(timesteps):
            if control.should_stop_batch:
                return None
            model_input = torch.cat([s.scale_model_input(latents[i : i + 1], t) for i, s in enumerate(schedulers)])
            if image_conditioning is not None:
                model_input = torch.cat([model_input, image_conditioning], dim=1)
            prediction = _guided_prediction(model, model_input, t, context, added, run.cfg_scale)
            stepped = [
                s.step(prediction[i : i + 1], t, latents[i : i + 1], **_step_kwargs(s, generators[i]))
                for i, s in enumerate(schedulers)
            ]
            latents = torch.cat([out.prev_sample for out in stepped])
            if mask is not None and not model.is_inpainting:
                latents = _blend_known(schedulers, latents, init_latents, start_noise, mask, timesteps, step)
            preview_image = None
            if control.wants_preview(step + 1):
                denoised = getattr(stepped[0], "pred_original_sample", None)
                preview_image = preview.cheap_preview((denoised if denoised is not None else latents[:1])[0], model.family)
            control.report(Progress(step + 1, len(timesteps), batch, run.batch_count, preview_image))
    if mask is not None and not model.is_inpainting:
        latents = init_latents * (1 - mask) + latents * mask
    # 8. Decode
    return decode_latents(model, latents)


def _step_kwargs(scheduler, generator) -> dict:
    """Ancestral and SDE steps draw noise from the image's own generator (the Brownian-tree SDE
    sampler is seeded per image instead)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def _masked_content(kind: str, init_latents, start_noise, mask):
    if kind == "latent noise":
        return init_latents * (1 - mask) + start_noise * mask
    if kind == "latent nothing":
        return init_latents * (1 - mask)
    return init_latents


def _blend_known(schedulers, latents, init_latents, start_noise, mask, timesteps, step):
    """Standard (4-channel) models inpaint by resetting the unmasked area to the init image,
    noised to the level of the next step."""
    if step + 1 >= len(timesteps):
        return latents
    next_t = timesteps[step + 1 : step + 2]
    known = torch.cat([
        s.add_noise(init_latents[i : i + 1], start_noise[i : i + 1], next_t) for i, s in enumerate(schedulers)
    ])
    return known * (1 - mask) + latents * mask


def _inpaint_conditioning(model, source, n, latent_hw):
    """Inpainting models (9 input channels) also see the mask and the latents of the masked image."""
    device, dtype = model.device, model.dtype
    if source is None or source.mask is None:
        mask = torch.ones((1, 1, *latent_hw), device=device, dtype=dtype)
        masked = torch.zeros((1, 3, latent_hw[0] * model.vae_scale_factor, latent_hw[1] * model.vae_scale_factor))
    else:
        mask = init_image.latent_mask(source.mask, latent_hw, device, dtype).round()
        pixels = images.to_tensor(source.image)[None]
        full_mask = torch.from_numpy(__import__("numpy").array(source.mask.convert("L"), dtype="float32") / 255.0)
        masked = pixels * (full_mask[None, None] < 0.5)
    masked_latents = encode_image(model, masked)
    return torch.cat([mask, masked_latents], dim=1).expand(n, -1, -1, -1)


def _context(cond, uncond, n, cfg_scale):
    positive = cond.context[None].expand(n, -1, -1)
    if cfg_scale == 1:
        return positive
    return torch.cat([uncond.context[None].expand(n, -1, -1), positive])


def _added_conditioning(model, cond, uncond, run, n):
    if model.family != "sdxl":
        return None
    # SDXL's micro-conditioning: original size, crop offset, target size.
    time_ids = torch.tensor([[run.height, run.width, 0, 0, run.height, run.width]], device=model.device)
    pooled = cond.pooled[None].expand(n, -1)
    if run.cfg_scale != 1:
        pooled = torch.cat([uncond.pooled[None].expand(n, -1), pooled])
    return {"text_embeds": pooled, "time_ids": time_ids.to(model.dtype).expand(pooled.shape[0], -1)}


def _guided_prediction(model, model_input, t, context, added, cfg_scale):
    batch = model_input if cfg_scale == 1 else torch.cat([model_input, model_input])
    out = model.unet(batch, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    if cfg_scale == 1:
        return out
    uncond, cond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def encode_image(model: StableDiffusionModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (the distribution's mean: deterministic)."""
    with model.use(model.vae):
        dist = model.vae.encode(pixels.to(model.device, model.vae_dtype)).latent_dist
    latents = dist.mode()
    shift = model.vae.config.get("shift_factor") or 0.0
    return ((latents - shift) * model.vae.config.scaling_factor).to(model.dtype)


@torch.no_grad()
def decode_latents(model: StableDiffusionModel, latents: torch.Tensor) -> list:
    if not torch.isfinite(latents).all():
        raise NonFiniteOutputError(
            "the UNet produced NaN/inf values; run with --no-half (or --precision full), "
            "or lower the CFG scale if it is very high"
        )
    scaled = latents / model.vae.config.scaling_factor + (model.vae.config.get("shift_factor") or 0.0)
    with model.use(model.vae):
        pixels = model.vae.decode(scaled.to(model.device, model.vae_dtype)).sample
        if not torch.isfinite(pixels).all() and model.vae_dtype != torch.float32:
            logger.warning("The VAE produced NaNs in half precision; retrying in full precision")
            model.upcast_vae()
            pixels = model.vae.decode(scaled.to(model.device, torch.float32)).sample
    if not torch.isfinite(pixels).all():
        raise NonFiniteOutputError(
            "the VAE produced NaN/inf values; run with --no-half-vae, or choose another VAE"
        )
    return [images.to_pil(p) for p in pixels]


def infotext_parameters(model, run, sampler, schedule, seed, subseed) -> dict:
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
        "VAE": Path(model.vae_name).name if model.vae_name else None,
        "Variation seed": subseed if run.subseed_strength > 0 else None,
        "Variation seed strength": run.subseed_strength if run.subseed_strength > 0 else None,
        "Seed resize from": (
            f"{run.seed_resize_from_w}x{run.seed_resize_from_h}" if run.seed_resize_from_w > 0 else None
        ),
        "Denoising strength": run.denoising_strength if run.init_image is not None else None,
        "Clip skip": run.clip_skip if run.clip_skip > 1 else None,
        "RNG": "CPU",  # noise is drawn on the CPU, so A1111 reproduces it with this setting
    }
    if run.mask is not None:
        params["Mask blur"] = run.mask_blur
        if run.inpaint_area == "Only masked":
            params["Inpaint area"] = "Only masked"
            params["Masked area padding"] = run.only_masked_padding
    params["Version"] = INFOTEXT_VERSION
    return params


def _finish_image(model, run, sampler, schedule, source, batch, index, image, output_dir, now) -> GeneratedImage:
    seed, subseed = _seeds(run, batch * run.batch_size + index)
    if source is not None:
        image = source.restore(image)
    text = infotext.format_infotext(
        run.prompt, run.negative_prompt, infotext_parameters(model, run, sampler, schedule, seed, subseed)
    )
    path = outputs.save_image(image, output_dir, seed, text, now) if run.save_images else None
    return GeneratedImage(image, seed, subseed, run.prompt, run.negative_prompt, text, path)
