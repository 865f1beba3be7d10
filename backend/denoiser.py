"""One batch through the sampler: initial latents (noise, or a noised init image), the guided
denoising loop, and inpainting's blending, with progress, previews, interrupt and skip.

Each image has its own CPU generator and its own scheduler instance; only the UNet runs batched.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

from backend import images, init_image, k_sampling, noise, preview, samplers, schedules, vae_codec
from backend.conditioning import Conditioning, pad_cond_uncond, stack_contexts
from backend.extensions import NO_EXTENSIONS, ExtensionRegistry, Guidance, Step
from backend.init_image import InitSource
from backend.progress import JobControl, Progress
from backend.request import GenerationRequest
from backend.sd_model import StableDiffusionModel


@dataclass
class BatchInputs:
    run: GenerationRequest  # seeds resolved, sizes filled in
    sampler: samplers.Sampler
    schedule: str
    conds: list[Conditioning]  # per image (wildcards can give each image its own prompt)
    source: InitSource | None
    seeds: list[tuple[int, int]]  # (seed, variation seed) per image
    phase: str = ""  # reported with progress ("Hires" for the hires fix's second pass)
    share: tuple[float, float] = (0.0, 1.0)  # (start, length) of this pass within the batch's progress
    extensions: ExtensionRegistry = NO_EXTENSIONS  # their `step` and `guidance` callbacks run here
    warnings: list[str] = field(default_factory=list)  # where failing extensions are named


def denoise(model: StableDiffusionModel, inputs: BatchInputs, control: JobControl, batch: int) -> torch.Tensor | None:
    """Final latents of one batch, or None when the batch was skipped or interrupted."""
    run, n, f = inputs.run, len(inputs.seeds), model.vae_scale_factor
    latent_hw = (run.height // f, run.width // f)
    # 1. Initial noise, one CPU generator per image; one scheduler per image
    specs = _noise_specs(inputs, f, str(model.device))
    start_noise, generators = noise.batch_noise(specs, (model.vae.config.latent_channels, *latent_hw))
    start_noise = start_noise.to(model.device, model.dtype)
    if k_sampling.uses_k_diffusion(inputs.sampler.name):
        return _denoise_k(model, inputs, control, batch, start_noise, latent_hw)
    schedulers = _schedulers(model, inputs)
    # 2. Starting latents: pure noise, or the init image noised to where img2img starts
    latents, timesteps, blend = _starting_latents(model, inputs, schedulers, start_noise, latent_hw)
    # 3. What every step uses: an inpainting model's extra channels, guidance, each image's generator
    extra_channels = _inpaint_conditioning(model, inputs.source, n, latent_hw) if model.is_inpainting else None
    alphas, prediction = schedulers[0].alphas_cumprod, schedulers[0].config.get("prediction_type", "epsilon")
    alpha_bar = lambda t: float(alphas[min(len(alphas) - 1, max(0, int(round(float(t)))))])  # noqa: E731
    guidance = _BatchGuidance(model, inputs.conds, run, _guidance_hook(inputs, alpha_bar, prediction, len(timesteps)))
    stepped = inputs.extensions.has("step")
    step_kwargs = [_step_kwargs(s, g) for s, g in zip(schedulers, generators)]
    # 4. Denoising loop
    with torch.no_grad(), model.use(model.unet):
        for step, t in enumerate(timesteps):
            if control.should_stop_batch:
                return None
            model_input = _each(schedulers, lambda i, s, latents=latents, t=t: s.scale_model_input(latents[i : i + 1], t))
            if extra_channels is not None:
                model_input = torch.cat([model_input, extra_channels], dim=1)
            prediction = guidance.predict(model_input, t, step)
            outputs = [
                s.step(prediction[i : i + 1], t, latents[i : i + 1], **step_kwargs[i])
                for i, s in enumerate(schedulers)
            ]
            latents = torch.cat([out.prev_sample for out in outputs])
            if blend is not None:
                latents = blend.after_step(latents, step)
            _report(model, control, outputs[0], latents, step, len(timesteps), batch, inputs)
            if stepped:
                latents, stop = _step_event(inputs, step, len(timesteps), t, latents)
                if stop:
                    break
    return blend.final(latents) if blend is not None else latents


def _schedulers(model, inputs: BatchInputs) -> list:
    """One scheduler per image (seeded by its seed), its timesteps set for the request's steps."""
    schedulers = [
        samplers.make_scheduler(inputs.sampler, inputs.schedule, model.scheduler_config, seed)
        for seed, _ in inputs.seeds
    ]
    for scheduler in schedulers:
        scheduler.set_timesteps(inputs.run.steps, device=model.device)
        # Step by position, not by looking the timestep up: with zero-terminal-SNR models, Karras and
        # exponential sigmas above the top training sigma all round to timestep 999, and a lookup
        # would land on the wrong repeat and run off the end of the schedule.
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
    return schedulers


def _starting_latents(model, inputs: BatchInputs, schedulers, start_noise, latent_hw):
    """The first step's latents, the timesteps to run, and the inpainting blend to apply (None
    without a mask, or with an inpainting model, which sees the mask itself)."""
    timesteps = schedulers[0].timesteps
    source = inputs.source
    if source is None:
        return start_noise * schedulers[0].init_noise_sigma, timesteps, None
    init_latents, mask = _init_latents(model, inputs, start_noise, latent_hw)
    timesteps = _skip_to_strength(schedulers, timesteps, inputs.run)
    latents = _each(schedulers, lambda i, s: s.add_noise(init_latents[i : i + 1], start_noise[i : i + 1],
                                                          timesteps[:1]))
    blend = None
    if mask is not None and not model.is_inpainting:
        blend = _InpaintBlend(schedulers, timesteps, init_latents, start_noise, mask)
    return latents, timesteps, blend


def _init_latents(model, inputs: BatchInputs, start_noise, latent_hw):
    """img2img's encoded init image (once for all batches), with A1111's masked content, and the latent
    mask (1: repaint), or None without one."""
    source = inputs.source
    if source.latents is None:
        source.latents = vae_codec.encode(model, images.to_tensor(source.image)[None])
    init_latents = source.latents.expand(len(inputs.seeds), -1, -1, -1)
    mask = None
    if source.mask is not None:
        mask = init_image.latent_mask(source.mask, latent_hw, model.device, model.dtype)
        init_latents = _masked_content(inputs.run.masked_content, init_latents, start_noise, mask)
    return init_latents, mask


def _denoise_k(model, inputs: BatchInputs, control: JobControl, batch: int, start_noise, latent_hw):
    """A1111's k-diffusion samplers (see `backend.k_sampling`): the batch's final latents, or None."""
    run = inputs.run
    alphas = k_sampling.model_alphas_cumprod(model.scheduler_config)
    krun = k_sampling.KRun(inputs.sampler.name, inputs.schedule, model.family, run.steps, inputs.seeds,
                           run.randn_source, None if inputs.source is None else run.denoising_strength,
                           fixed_steps=inputs.phase == "Hires")
    sigmas = k_sampling.schedule_for(krun, alphas).to(model.device)
    # 1. Start: noise at the first sigma, or the init image noised to it; inpainting's blend
    blend, noise_ = None, start_noise.float()
    if inputs.source is None:
        start = noise_ * sigmas[0]
    else:
        init_latents, mask = _init_latents(model, inputs, start_noise, latent_hw)
        start = init_latents.float() + noise_ * sigmas[0]
        blend = (init_latents.float(), mask.float()) if mask is not None else None
    # 2. The UNet as a denoiser in sigma space, behind guidance
    extra = _inpaint_conditioning(model, inputs.source, len(inputs.seeds), latent_hw) if model.is_inpainting else None
    log_sigmas = schedules.model_sigmas(alphas).log()
    alpha_bar = lambda t: float(1.0 / (1.0 + schedules.t_to_sigma(torch.as_tensor([float(t)]), log_sigmas)[0] ** 2))  # noqa: E731
    prediction = model.scheduler_config.get("prediction_type", "epsilon")
    steps = len(sigmas) - 1
    guidance = _BatchGuidance(model, inputs.conds, run, _guidance_hook(inputs, alpha_bar, prediction, steps))
    denoiser = k_sampling.SigmaDenoiser(model, guidance.predict, log_sigmas, extra, blend)
    # 3. Sampling, reporting progress and previews, with the extensions' step events
    step_event = None
    if inputs.extensions.has("step"):
        def step_event(i, total, sigma, x):
            t = float(schedules.sigma_to_t(torch.as_tensor([sigma]), log_sigmas)[0])
            return _step_event(inputs, i, total, t, x)
    hooks = k_sampling.Hooks(
        control, lambda step, total, image: Progress(step, total, batch, run.batch_count, image, inputs.phase,
                                                     inputs.share),
        lambda denoised: preview.cheap_preview(denoised[0].to(model.dtype), model.family), step_event)
    with torch.no_grad(), model.use(model.unet):
        latents = k_sampling.sample_batch(krun, denoiser, sigmas, start, hooks)
    if latents is None:
        return None
    if blend is not None:  # A1111: the unmasked area is the init image's
        latents = blend[0] * (1 - blend[1]) + latents * blend[1]
    return latents.to(model.dtype)


class _InpaintBlend:
    """Inpainting with a plain model: after each step the unmasked area becomes the init image noised
    to the next step's level, and after the last step the init image itself."""

    def __init__(self, schedulers, timesteps, init_latents, start_noise, mask):
        self.schedulers, self.timesteps = schedulers, timesteps
        self.init_latents, self.start_noise, self.mask = init_latents, start_noise, mask

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        if step + 1 >= len(self.timesteps):
            return latents
        next_t = self.timesteps[step + 1 : step + 2]
        known = _each(self.schedulers, lambda i, s: s.add_noise(
            self.init_latents[i : i + 1], self.start_noise[i : i + 1], next_t))
        return known * (1 - self.mask) + latents * self.mask

    def final(self, latents: torch.Tensor) -> torch.Tensor:
        return self.init_latents * (1 - self.mask) + latents * self.mask


def _each(schedulers, fn) -> torch.Tensor:
    return torch.cat([fn(i, s) for i, s in enumerate(schedulers)])


def _noise_specs(inputs: BatchInputs, f: int, device: str) -> list[noise.NoiseSpec]:
    run = inputs.run
    resize_from = None
    if run.seed_resize_from_w > 0 and run.seed_resize_from_h > 0:
        resize_from = (run.seed_resize_from_h // f, run.seed_resize_from_w // f)
    return [noise.NoiseSpec(seed, sub, run.subseed_strength, resize_from, run.randn_source, device)
            for seed, sub in inputs.seeds]


def _skip_to_strength(schedulers, timesteps, run: GenerationRequest):
    """img2img runs the last `strength` share of the schedule (at least one step), as A1111 does."""
    steps_to_run = max(1, min(run.steps, int(run.steps * run.denoising_strength)))
    begin = (run.steps - steps_to_run) * schedulers[0].order
    for scheduler in schedulers:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
    return timesteps[begin:]


def _step_kwargs(scheduler, generator) -> dict:
    """Ancestral and SDE steps draw noise from the image's own generator (the Brownian-tree SDE
    sampler is seeded per image instead)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def _masked_content(kind: str, init_latents, start_noise, mask):
    """A1111's "latent noise" and "latent nothing" replace the masked latents before sampling."""
    if kind == "latent noise":
        return init_latents * (1 - mask) + start_noise * mask
    if kind == "latent nothing":
        return init_latents * (1 - mask)
    return init_latents


def _inpaint_conditioning(model, source: InitSource | None, n: int, latent_hw) -> torch.Tensor:
    """Inpainting models (9 input channels) also see the mask and the latents of the masked image;
    without a mask everything is to be painted (A1111's conditioning for txt2img)."""
    device, dtype, f = model.device, model.dtype, model.vae_scale_factor
    if source is None or source.mask is None:
        mask = torch.ones((1, 1, *latent_hw), device=device, dtype=dtype)
        masked = torch.zeros((1, 3, latent_hw[0] * f, latent_hw[1] * f))
    else:
        mask = init_image.latent_mask(source.mask, latent_hw, device, dtype).round()
        full_mask = torch.from_numpy(np.array(source.mask.convert("L"), dtype=np.float32) / 255.0)
        masked = images.to_tensor(source.image)[None] * (full_mask[None, None] < 0.5)
    return torch.cat([mask, vae_codec.encode(model, masked)], dim=1).expand(n, -1, -1, -1)


@dataclass
class _UNetCall:
    """One UNet call of a guidance step: its rows of the step's batch (the negative prompt's first, then
    each subprompt's) and its text inputs."""

    start: int
    context: torch.Tensor
    added: dict | None


class _Guidance:
    """Classifier-free guidance over the prompts in force at each step, combined as A1111 does:
    uncond + sum(weight * cfg * (cond - uncond)). As in A1111, the `AND` subprompts run as one batch
    (a shorter one padded with copies of its last vector); the negative prompt joins it when the token
    lengths match, and otherwise runs in a call of its own (A1111's default) or, with
    `pad_cond_uncond`, the shorter side is padded with the empty prompt's embedding to join it.
    Without guidance (CFG 1, one subprompt) the negative pass is skipped."""

    def __init__(self, model, cond: Conditioning, n: int, run: GenerationRequest, hook=None):
        self.model, self.cond, self.n, self.run, self.hook = model, cond, n, run, hook
        self.skip_negative = run.cfg_scale == 1 and len(cond.positive) == 1
        self._cached: tuple | None = None

    def _calls(self, step: int) -> list[_UNetCall]:
        conds = [Conditioning.at(schedule, step) for _, schedule in self.cond.positive]
        uncond = None if self.skip_negative else Conditioning.at(self.cond.negative, step)
        key = (tuple(id(e) for e in conds), id(uncond))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._plan(conds, uncond))
        return self._cached[1]

    def _plan(self, conds, uncond) -> list[_UNetCall]:
        cond_context = stack_contexts(conds)
        if uncond is None:
            return [self._call(0, cond_context, conds)]
        uncond_context = uncond.context[None]
        if self.run.pad_cond_uncond and cond_context.shape[1] != uncond_context.shape[1]:
            cond_context, uncond_context = pad_cond_uncond(cond_context, uncond_context, self.cond.empty)
        if cond_context.shape[1] == uncond_context.shape[1]:
            return [self._call(0, torch.cat([uncond_context, cond_context]), [uncond, *conds])]
        # Lengths differ: as A1111, the conditional rows in slices of two subprompts, then the negative.
        calls = [self._call(self.n * (1 + i), cond_context[i : i + 2], conds[i : i + 2])
                 for i in range(0, len(conds), 2)]
        return [*calls, self._call(0, uncond_context, [uncond])]

    def _call(self, start: int, contexts: torch.Tensor, embeddings) -> _UNetCall:
        """A call for `contexts` (one per embedding), each repeated for the group's images."""
        n, model, run = self.n, self.model, self.run
        added = None
        if model.family == "sdxl":
            # SDXL's micro-conditioning: original size, crop offset, target size; pooled text.
            time_ids = torch.tensor([[run.height, run.width, 0, 0, run.height, run.width]], device=model.device)
            pooled = torch.cat([e.pooled[None].expand(n, -1) for e in embeddings])
            added = {"text_embeds": pooled, "time_ids": time_ids.to(model.dtype).expand(pooled.shape[0], -1)}
        return _UNetCall(start, contexts.repeat_interleave(n, dim=0), added)

    def _unet(self, model_input: torch.Tensor, t, calls: list[_UNetCall]) -> torch.Tensor:
        """The UNet's predictions for every row of the step's batch, in the batch's order."""
        rows = sum(call.context.shape[0] for call in calls)
        passes = rows // self.n
        batch = model_input.repeat(passes, 1, 1, 1) if passes > 1 else model_input
        if len(calls) == 1:
            return self.model.unet(batch, t, encoder_hidden_states=calls[0].context,
                                   added_cond_kwargs=calls[0].added).sample
        pieces = {call.start: self.model.unet(batch[call.start : call.start + call.context.shape[0]], t,
                                              encoder_hidden_states=call.context, added_cond_kwargs=call.added).sample
                  for call in calls}
        return torch.cat([pieces[start] for start in sorted(pieces)])

    def predict(self, model_input: torch.Tensor, t, step: int) -> torch.Tensor:
        out = self._unet(model_input, t, self._calls(step))
        if self.skip_negative:
            return out
        outputs = out.chunk(len(self.cond.positive) + 1)
        uncond, result = outputs[0], outputs[0].clone()
        for (weight, _), cond in zip(self.cond.positive, outputs[1:]):
            result += (cond - uncond) * (weight * self.run.cfg_scale)
        if self.hook is not None:  # extensions see the conditional prediction at CFG 1 and the combination
            conditional = uncond + sum((c - uncond) * w for (w, _), c in zip(self.cond.positive, outputs[1:]))
            result = self.hook(step, t, model_input[:, : uncond.shape[1]], conditional, uncond, result)
        return result


class _BatchGuidance:
    """Images sharing a prompt run through the UNet together; each distinct prompt is its own pass."""

    def __init__(self, model, conds: list[Conditioning], run: GenerationRequest, hook=None):
        groups: dict[int, list[int]] = {}
        for index, cond in enumerate(conds):
            groups.setdefault(id(cond), []).append(index)
        self.groups = [(indices, _Guidance(model, conds[indices[0]], len(indices), run, hook))
                       for indices in groups.values()]

    def predict(self, model_input: torch.Tensor, t, step: int) -> torch.Tensor:
        if len(self.groups) == 1:
            return self.groups[0][1].predict(model_input, t, step)
        out = torch.empty_like(model_input)
        for indices, guidance in self.groups:
            out[indices] = guidance.predict(model_input[indices], t, step)
        return out


def _step_event(inputs: BatchInputs, step: int, steps: int, t, latents) -> tuple[torch.Tensor, bool]:
    """Extensions' `step` callbacks: the (maybe replaced) latents, and whether one asked to stop."""
    box = {"latents": latents, "stop": False}

    def make(extension):
        return Step(step + 1, steps, float(t), box["latents"], inputs.run,
                    inputs.extensions.args(extension, inputs.run.script_args))

    def after(event: Step) -> None:
        box["latents"] = event.latents
        box["stop"] = box["stop"] or event.stop

    inputs.extensions.emit("step", make, inputs.warnings, after)
    return box["latents"], box["stop"]


def _guidance_hook(inputs: BatchInputs, alpha_bar, prediction_type: str, steps: int):
    """A function (step, t, model_input, cond, uncond, prediction) -> prediction running the
    extensions' `guidance` callbacks, or None when none listens. `alpha_bar(t)`: the timestep's
    cumulative alpha."""
    registry = inputs.extensions
    if not registry.has("guidance"):
        return None

    def hook(step, t, model_input, cond, uncond, prediction):
        box = {"prediction": prediction}

        def make(extension):
            return Guidance(step, steps, float(t), cond, uncond, box["prediction"], inputs.run.cfg_scale,
                            prediction_type, alpha_bar(t), model_input,
                            registry.args(extension, inputs.run.script_args))

        registry.emit("guidance", make, inputs.warnings, lambda event: box.update(prediction=event.prediction))
        return box["prediction"]

    return hook


def _report(model, control: JobControl, output, latents, step: int, steps: int, batch: int, inputs: BatchInputs) -> None:
    image = None
    if control.wants_preview(step + 1):
        denoised = getattr(output, "pred_original_sample", None)
        image = preview.cheap_preview((denoised if denoised is not None else latents[:1])[0], model.family)
    control.report(Progress(step + 1, steps, batch, inputs.run.batch_count, image, inputs.phase, inputs.share))
