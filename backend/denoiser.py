"""One batch through the sampler: each image's initial noise, the init image and inpainting's blend,
classifier-free guidance over the prompts in force at each step, and the extensions' `guidance` and
`step` callbacks. `backend.k_sampling` runs the sampler itself, as A1111 does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from backend import (
    control_pass,
    flow_sampling,
    images,
    init_image,
    k_sampling,
    noise,
    preview,
    samplers,
    schedules,
    vae_codec,
)
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
    controls: list = field(default_factory=list)  # ControlNet units ready for this pass (control_pass.ActiveControl)
    warnings: list[str] = field(default_factory=list)  # where failing extensions are named


def denoise(model: StableDiffusionModel, inputs: BatchInputs, control: JobControl, batch: int) -> torch.Tensor | None:
    """Final latents of one batch through A1111's sampler (see `backend.k_sampling`), or None when the batch
    was skipped or interrupted."""
    run, f = inputs.run, model.vae_scale_factor
    latent_hw = (run.height // f, run.width // f)
    # 1. Each image's initial noise, from its seed and the chosen source
    start_noise = noise.batch_noise(_noise_specs(inputs, f, str(model.device)),
                                    (model.vae.config.latent_channels, *latent_hw))
    start_noise = start_noise.to(model.device)  # float32 as A1111's, whatever the UNet's type
    krun = k_sampling.KRun(inputs.sampler.name, inputs.schedule, model.family, run.steps, inputs.seeds,
                           run.randn_source, None if inputs.source is None else run.denoising_strength,
                           fixed_steps=inputs.phase == "Hires", eta_noise_seed_delta=run.eta_noise_seed_delta,
                           seed_resized=run.seed_resize_from_w > 0 and run.seed_resize_from_h > 0,
                           settings=run.sampler_settings, eta=run.eta)
    # 2. The init image and inpainting's blend (A1111 blends with inpainting models too)
    init_latents = blend = None
    if inputs.source is not None:
        init_latents, mask = _init_latents(model, inputs, start_noise, latent_hw)
        init_latents = init_latents.float()
        blend = (init_latents, mask.float()) if mask is not None else None
    extra = _inpaint_conditioning(model, inputs.source, len(inputs.seeds), latent_hw) if model.is_inpainting else None
    # 3. Sampling, reporting progress and previews, with the extensions' step events
    sampling = control_pass.SamplingProgress(steps=k_sampling.sampling_steps(krun))
    hooks = k_sampling.Hooks(
        control, lambda step, total, image: Progress(step, total, batch, run.batch_count, image, inputs.phase,
                                                     inputs.share),
        lambda denoised: preview.cheap_preview(denoised[0].to(model.dtype), model),
        (lambda i, total, t, x: _step_event(inputs, i, total, t, x)) if inputs.extensions.has("step") else None,
        sampling)
    with torch.no_grad(), model.use(model.unet), control_pass.applied(model, inputs.controls):
        if model.engine.prediction == "flow":
            latents = _sample_flow(model, inputs, krun, start_noise, init_latents, blend, hooks)
        elif k_sampling.uses_timesteps(krun.sampler):
            latents = _sample_timesteps(model, inputs, krun, start_noise, init_latents, blend, extra, hooks)
        else:
            latents = _sample_sigmas(model, inputs, krun, start_noise, init_latents, blend, extra, hooks)
    if latents is None:
        return None
    if blend is not None:  # A1111: the unmasked area is the init image's
        latents = blend[0] * (1 - blend[1]) + latents * blend[1]
    return latents.to(model.dtype)


def _sample_flow(model, inputs: BatchInputs, krun, start_noise, init_latents, blend, hooks):
    """Rectified flows (FLUX.1, SD 3.x): start at noise (img2img: the init image that far along the flow)."""
    engine, shift = model.engine, model.engine.shift(model, inputs.run)
    if krun.denoising_strength is None:
        sigmas = flow_sampling.sigmas(krun.steps, krun.schedule, shift)
    else:  # the end of a longer schedule, as A1111 shortens img2img's
        total, t_enc = k_sampling.img2img_steps(krun)
        sigmas = flow_sampling.sigmas(total, krun.schedule, shift)
        sigmas = sigmas[max(0, len(sigmas) - t_enc - 2):]
    sigmas = sigmas.to(model.device)
    start = start_noise if init_latents is None else flow_sampling.noised(init_latents, start_noise, sigmas[0])
    guidance = _BatchGuidance(model, inputs.conds, inputs.run,
                              _guidance_hook(inputs, lambda t: float(1 - engine.sigma_of(t)) ** 2, model,
                                             len(sigmas) - 1),
                              inputs.controls, hooks.sampling)
    denoiser = flow_sampling.FlowDenoiser(model.dtype, model.device, guidance.predict, engine.timestep, blend)
    return k_sampling.sample_flow(krun, denoiser, sigmas, start, hooks)


def _sample_sigmas(model, inputs: BatchInputs, krun, start_noise, init_latents, blend, extra, hooks):
    """k-diffusion samplers and LCM: start at noise x the first sigma (img2img: added to the init image)."""
    alphas = k_sampling.model_alphas_cumprod(model.scheduler_config)
    plan = schedules.sampler_schedule(krun.sampler)
    table = schedules.SigmaTable.build(alphas, lcm=plan.lcm_table)
    sigmas = k_sampling.schedule_for(krun, alphas).to(model.device)
    start = start_noise * sigmas[0] if init_latents is None else init_latents + start_noise * sigmas[0]
    log_sigmas = schedules.model_sigmas(alphas).log()

    def alpha_bar(t) -> float:  # for the extensions: the cumulative alpha at the UNet's (fractional) timestep
        return float(1.0 / (1.0 + schedules.t_to_sigma(torch.as_tensor([float(t)]), log_sigmas)[0] ** 2))

    guidance = _BatchGuidance(model, inputs.conds, inputs.run, _guidance_hook(inputs, alpha_bar, model, len(sigmas) - 1),
                              inputs.controls, hooks.sampling)
    denoiser = k_sampling.SigmaDenoiser(model, guidance.predict, table, extra, blend)
    return k_sampling.sample_batch(krun, denoiser, sigmas, start, hooks)


def _sample_timesteps(model, inputs: BatchInputs, krun, start_noise, init_latents, blend, extra, hooks):
    """DDIM, DDIM CFG++, PLMS, UniPC: start at unit noise (img2img: the init image noised to its timestep)."""
    alphas = k_sampling.model_alphas_cumprod(model.scheduler_config)
    timesteps, noised_to = k_sampling.timesteps_for(krun)
    start = start_noise
    if init_latents is not None:
        alpha = alphas[noised_to].float()
        start = init_latents * alpha.sqrt() + start_noise * (1 - alpha).sqrt()

    def alpha_bar(t) -> float:
        return float(alphas[min(len(alphas) - 1, max(0, int(float(t))))])

    guidance = _BatchGuidance(model, inputs.conds, inputs.run, _guidance_hook(inputs, alpha_bar, model, len(timesteps)),
                              inputs.controls, hooks.sampling)
    denoiser = k_sampling.TimestepDenoiser(model, guidance, alphas, extra, blend)
    return k_sampling.sample_timesteps(krun, denoiser, timesteps.to(model.device), start, hooks)


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


def _noise_specs(inputs: BatchInputs, f: int, device: str) -> list[noise.NoiseSpec]:
    run = inputs.run
    resize_from = None
    if run.seed_resize_from_w > 0 and run.seed_resize_from_h > 0:
        resize_from = (run.seed_resize_from_h // f, run.seed_resize_from_w // f)
    return [noise.NoiseSpec(seed, sub, run.subseed_strength, resize_from, run.randn_source, device)
            for seed, sub in inputs.seeds]


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

    def __init__(self, model, cond: Conditioning, n: int, run: GenerationRequest, hook=None, controls=(),
                 progress: control_pass.SamplingProgress | None = None):
        self.model, self.cond, self.n, self.run, self.hook = model, cond, n, run, hook
        self.controls, self.progress = list(controls), progress or control_pass.SamplingProgress()
        self._cached: tuple | None = None
        self.cfg_multiplier, self.keep_uncond = 1.0, False  # DDIM CFG++: CFG / 12.5, and its negative prediction
        self.last_uncond: torch.Tensor | None = None

    @property
    def skip_negative(self) -> bool:
        return self.run.cfg_scale == 1 and len(self.cond.positive) == 1 and not self.keep_uncond

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
        added = self.model.engine.added_conditioning(self.model, self.run, embeddings, self.n)
        return _UNetCall(start, contexts.repeat_interleave(self.n, dim=0), added)

    def _unet(self, model_input: torch.Tensor, t, calls: list[_UNetCall]) -> torch.Tensor:
        """The UNet's predictions for every row of the step's batch, in the batch's order."""
        rows = sum(call.context.shape[0] for call in calls)
        passes = rows // self.n
        batch = model_input.repeat(passes, 1, 1, 1) if passes > 1 else model_input
        if len(calls) == 1:
            return self._call_unet(batch, t, calls[0])
        pieces = {call.start: self._call_unet(batch[call.start : call.start + call.context.shape[0]], t, call)
                  for call in calls}
        return torch.cat([pieces[start] for start in sorted(pieces)])

    def _call_unet(self, sample: torch.Tensor, t, call: _UNetCall) -> torch.Tensor:
        """One UNet call, with the ControlNet units' residuals and T2I-Adapters' features for its rows (the
        negative prompt's are the batch's first n rows), and tile_colorfix's fix of its prediction."""
        extra, uncond = {}, None
        if self.controls:
            uncond = None if self.skip_negative or call.start >= self.n else slice(0, self.n - call.start)
            found = control_pass.residuals(self.controls, self.progress, sample, t, call.context, call.added, uncond)
            if found is not None:
                extra = found.unet_kwargs()
        out = self.model.engine.call_network(self.model, sample, t, call.context, call.added, extra)
        return control_pass.color_fixed(self.controls, out, sample, t, uncond) if self.controls else out

    def predict(self, model_input: torch.Tensor, t, step: int) -> torch.Tensor:
        out = self._unet(model_input, t, self._calls(step))
        if self.skip_negative:
            return out
        outputs = out.chunk(len(self.cond.positive) + 1)
        uncond, result = outputs[0], outputs[0].clone()
        if self.keep_uncond:
            self.last_uncond = uncond
        for (weight, _), cond in zip(self.cond.positive, outputs[1:]):
            result += (cond - uncond) * (weight * (self.run.cfg_scale * self.cfg_multiplier))
        if self.hook is not None:  # extensions see the conditional prediction at CFG 1 and the combination
            conditional = uncond + sum((c - uncond) * w for (w, _), c in zip(self.cond.positive, outputs[1:]))
            result = self.hook(step, t, model_input[:, : uncond.shape[1]], conditional, uncond, result)
        return result


class _BatchGuidance:
    """Images sharing a prompt run through the UNet together; each distinct prompt is its own pass."""

    def __init__(self, model, conds: list[Conditioning], run: GenerationRequest, hook=None, controls=(),
                 progress: control_pass.SamplingProgress | None = None):
        groups: dict[int, list[int]] = {}
        for index, cond in enumerate(conds):
            groups.setdefault(id(cond), []).append(index)
        self.groups = [(indices, _Guidance(model, conds[indices[0]], len(indices), run, hook, controls, progress))
                       for indices in groups.values()]

    def configure(self, cfg_multiplier: float, keep_uncond: bool) -> None:
        """DDIM CFG++: guide at CFG x `cfg_multiplier`, keeping the negative prompt's prediction."""
        for _, guidance in self.groups:
            guidance.cfg_multiplier, guidance.keep_uncond = cfg_multiplier, keep_uncond

    @property
    def keep_uncond(self) -> bool:
        return self.groups[0][1].keep_uncond

    @property
    def last_uncond(self) -> torch.Tensor:
        """The negative prompt's prediction of the last call, per image (with `keep_uncond`)."""
        if len(self.groups) == 1:
            return self.groups[0][1].last_uncond
        first = self.groups[0][1].last_uncond
        out = first.new_empty((sum(len(indices) for indices, _ in self.groups), *first.shape[1:]))
        for indices, guidance in self.groups:
            out[indices] = guidance.last_uncond
        return out

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


def _guidance_hook(inputs: BatchInputs, alpha_bar, model, steps: int):
    """A function (step, t, model_input, cond, uncond, prediction) -> prediction running the
    extensions' `guidance` callbacks, or None when none listens. `alpha_bar(t)`: the timestep's
    cumulative alpha."""
    registry = inputs.extensions
    if not registry.has("guidance"):
        return None
    prediction_type = model.scheduler_config.get("prediction_type", "epsilon")

    def hook(step, t, model_input, cond, uncond, prediction):
        box = {"prediction": prediction}

        def make(extension):
            return Guidance(step, steps, float(t), cond, uncond, box["prediction"], inputs.run.cfg_scale,
                            prediction_type, alpha_bar(t), model_input,
                            registry.args(extension, inputs.run.script_args))

        registry.emit("guidance", make, inputs.warnings, lambda event: box.update(prediction=event.prediction))
        return box["prediction"]

    return hook
