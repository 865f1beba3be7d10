"""One batch through an A1111 sampler, as A1111 v1.10 runs it.

The k-diffusion samplers (and LCM) see the UNet as a denoiser in sigma space (CompVis scalings, fractional
timesteps) and start at noise x sigma_max; the timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) see its
noise prediction at CompVis timesteps and start at unit noise. Both: img2img's and the hires fix's
shortened schedules, inpainting's blend, each image's own per-step noise (or a Brownian tree seeded by its
seed), progress, previews, interrupt and the extensions' `step` events.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from backend import flow_sampling, k_samplers, noise, philox, schedules, timestep_samplers, unipc
from backend.control_pass import SamplingProgress
from backend.progress import JobControl, Progress
from backend.sampler_settings import SamplerSettings


def uses_timesteps(sampler_name: str) -> bool:
    """DDIM, DDIM CFG++, PLMS and UniPC: samplers over CompVis timesteps rather than sigmas."""
    return schedules.sampler_schedule(sampler_name).sigma_input == "timesteps"


def model_alphas_cumprod(config: dict) -> torch.Tensor:
    """The model's training noise schedule, built as the CompVis/SGM code builds it (float64, then
    float32), rescaled to zero terminal SNR as A1111 does when the model says so."""
    steps = int(config.get("num_train_timesteps", schedules.TRAIN_TIMESTEPS))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    if config.get("beta_schedule", "scaled_linear") == "scaled_linear":
        alphas_cumprod = schedules.scaled_linear_alphas_cumprod(start, end, steps)
    else:  # "linear"
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
    if config.get("rescale_betas_zero_snr"):
        alphas_cumprod = schedules.zero_terminal_snr(alphas_cumprod)
    return alphas_cumprod


@dataclass
class KRun:
    """What the k path needs from the batch that `backend.denoiser` prepared."""

    sampler: str
    schedule: str
    family: str
    steps: int
    seeds: list[tuple[int, int]]
    randn_source: str
    denoising_strength: float | None  # None: txt2img (the whole schedule)
    fixed_steps: bool  # the hires fix: exactly `steps` steps of a longer schedule (A1111)
    eta_noise_seed_delta: int = 0  # A1111's ENSD: per-step noise comes from generators seeded seed + ENSD
    seed_resized: bool = False  # "resize seed from": the first noise was drawn apart from each image's generator
    settings: SamplerSettings = field(default_factory=SamplerSettings)  # A1111's sampler settings
    eta: float | None = None  # the request's own eta, over the settings'


def img2img_steps(run: KRun) -> tuple[int, int]:
    """A1111's `setup_img2img_steps`: the length of the schedule img2img cuts from, and how far into it the
    init image is noised (t_enc)."""
    strength = min(run.denoising_strength, 0.999)
    if run.fixed_steps:
        return max(1, int(run.steps / strength) if strength > 0 else 0), run.steps - 1
    return run.steps, int(strength * run.steps)


def sampling_steps(run: KRun) -> int:
    """The step count A1111's progress (and ControlNet's guidance start/end) divides by: the steps in
    txt2img, t_enc + 1 in img2img and the hires pass."""
    return run.steps if run.denoising_strength is None else img2img_steps(run)[1] + 1


def schedule_for(run: KRun, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The sigmas this batch samples: A1111's for the sampler and schedule, shortened for img2img as A1111's
    `setup_img2img_steps` shortens them."""
    overrides = run.settings.schedule_overrides(schedules.sampler_schedule(run.sampler, run.schedule).schedule)
    if run.denoising_strength is None:
        return schedules.sigmas(alphas_cumprod, run.steps, run.schedule, run.family, run.sampler, **overrides)
    total, t_enc = img2img_steps(run)
    full = schedules.sigmas(alphas_cumprod, total, run.schedule, run.family, run.sampler, **overrides)
    return full[max(0, len(full) - t_enc - 2):]


def timesteps_for(run: KRun) -> tuple[torch.Tensor, int | None]:
    """The CompVis timesteps a timestep sampler steps through, and for img2img the timestep the init image
    is noised to. As in A1111 that is one entry above the first one sampled (20 steps at strength 0.5:
    noised to 501, sampled from 451)."""
    discard = run.settings.always_discard_next_to_last_sigma
    if run.denoising_strength is None:
        return schedules.compvis_timesteps(run.steps, discard_penultimate_sigma=discard), None
    total, t_enc = img2img_steps(run)
    timesteps = schedules.compvis_timesteps(total, discard_penultimate_sigma=discard)
    return timesteps[:t_enc], int(timesteps[t_enc])


class ImageNoise:
    """Each image's noise after the first draw, continuing its own generator (A1111's ImageRNG.next):
    torch's CPU generator, the device's (GPU source on CUDA), or NVIDIA's Philox (NV). With an ENSD
    (A1111's "Eta noise seed delta") the draws come from fresh generators seeded seed + ENSD instead. A1111
    draws a resized seed's first noise apart from the generator, which then starts from the seed."""

    def __init__(self, seeds: list[int], source: str, device: str, shape: tuple[int, ...], ensd: int = 0,
                 first_drawn: bool = True):
        self.shape, self.device = tuple(shape), device
        self.source = noise.effective_source(source, device)
        self.generators = []
        for seed in seeds:
            seed = (seed + ensd) % 2**64
            if self.source == noise.NV:
                generator = philox.PhiloxGenerator(seed)
            else:
                generator = torch.Generator(device if self.source == noise.GPU else "cpu").manual_seed(seed)
            if first_drawn and not ensd:  # the first draw was the initial noise
                self._draw(generator)
            self.generators.append(generator)

    def _draw(self, generator) -> torch.Tensor:
        if self.source == noise.NV:
            return generator.randn_tensor(self.shape)
        return torch.randn(self.shape, generator=generator, device=generator.device)

    def next(self) -> torch.Tensor:
        return torch.stack([self._draw(g) for g in self.generators]).to(self.device)


class SigmaDenoiser:
    """`model(x, sigma) -> denoised`: the UNet behind guidance as k-diffusion's CompVisDenoiser
    (epsilon) or CompVisVDenoiser (v-prediction) wraps it, or as A1111's LCMCompVisDenoiser for LCM (whole
    timesteps of its 50-entry table, and LCM's boundary scalings; A1111 takes a v-prediction output for
    noise there, Easel converts it), with inpainting's blend (A1111's CFGDenoiser: the unmasked area of the
    estimate is the init image's). Counts its calls: A1111 advances prompt schedules once per call."""

    def __init__(self, model, predict: Callable, table: schedules.SigmaTable, extra_channels=None, blend=None):
        self.model, self.predict, self.extra_channels, self.blend = model, predict, extra_channels, blend
        self.table = table
        self.v_prediction = model.scheduler_config.get("prediction_type") == "v_prediction"
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        c_in = 1.0 / (s**2 + 1.0) ** 0.5
        t = self.table.to_t(sigma.flatten()[:1].float().cpu())
        model_input = (x * c_in).to(self.model.dtype)
        if self.extra_channels is not None:
            model_input = torch.cat([model_input, self.extra_channels], dim=1)
        out = self.predict(model_input, t[0].to(self.model.device), self.calls).to(x.dtype)
        self.calls += 1
        if self.v_prediction:
            denoised = x / (s**2 + 1.0) - out * s / (s**2 + 1.0) ** 0.5
        else:
            denoised = x - out * s
        if self.table.lcm:  # LCM's consistency boundary: c_skip and c_out of the timestep x 10 (sigma_data 0.5)
            scaled = t.to(x.dtype).to(x.device).view(-1, 1, 1, 1) * 10.0
            denoised = scaled / (scaled**2 + 0.25) ** 0.5 * denoised + 0.25 / (scaled**2 + 0.25) * x
        if self.blend is not None:
            init, mask = self.blend
            denoised = init * (1 - mask) + denoised * mask
        return denoised


class TimestepDenoiser:
    """`model(x, t) -> eps`: the UNet's guided noise prediction at a timestep, as A1111's
    CFGDenoiserTimesteps gives it to DDIM, PLMS and UniPC (v-prediction converted at the whole timestep, with
    the schedule in use: A1111 keeps the un-rescaled tables for it under zero terminal SNR, a bug of its own).
    Inpainting blends the init image into the unmasked area of the model's input, not of the result
    (A1111's `mask_before_denoising`). `last_uncond`: the negative prompt's noise prediction of the last
    call, for DDIM CFG++ (set `guidance.keep_uncond`)."""

    def __init__(self, model, guidance, alphas_cumprod: torch.Tensor, extra_channels=None, blend=None):
        self.model, self.guidance, self.extra_channels, self.blend = model, guidance, extra_channels, blend
        self.alphas_cumprod = alphas_cumprod.float()
        self.v_prediction = model.scheduler_config.get("prediction_type") == "v_prediction"
        self.calls = 0
        self.last_uncond: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.blend is not None:
            init, mask = self.blend
            x = x * mask + init * (1 - mask)
        model_input = x.to(self.model.dtype)
        if self.extra_channels is not None:
            model_input = torch.cat([model_input, self.extra_channels], dim=1)
        timestep = t.flatten()[:1].float().to(self.model.device)[0]
        out = self.guidance.predict(model_input, timestep, self.calls).to(x.dtype)
        self.calls += 1
        if self.guidance.keep_uncond:
            self.last_uncond = self._eps(self.guidance.last_uncond.to(x.dtype), x, t)
        return self._eps(out, x, t)

    def _eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.v_prediction:
            return out
        alpha = self.alphas_cumprod[t.flatten()[:1].cpu().to(torch.int)].to(x.device, x.dtype)
        return alpha.sqrt() * out + (1 - alpha).sqrt() * x


@dataclass
class Hooks:
    """What the loop reports to: progress and previews, interrupt and skip, the extensions' step events."""

    control: JobControl
    progress: Callable[[int, int, torch.Tensor | None], Progress]  # (step, steps, preview source) -> Progress
    preview: Callable[[torch.Tensor], object]
    # (step index, steps, timestep, x) -> (x, stop)
    step_event: Callable[[int, int, float, torch.Tensor], tuple[torch.Tensor, bool]] | None = None
    sampling: SamplingProgress | None = None  # the step ControlNet units read, set as A1111's callback sets it


class _Reporter:
    """The samplers' callback: progress, previews, interrupt and skip, step events. The loop stops by raising
    `StopSampling`; an extension's stop keeps the latents reached."""

    def __init__(self, hooks: Hooks, steps: int, timestep_of: Callable[[dict], float]):
        self.hooks, self.steps, self.timestep_of = hooks, steps, timestep_of
        self.stopped, self.kept = False, None

    def __call__(self, info: dict) -> None:
        hooks, i = self.hooks, int(info["i"])
        if hooks.sampling is not None:
            hooks.sampling.step = i
        if hooks.control.should_stop_batch:
            self.stopped = True
            raise k_samplers.StopSampling
        denoised = info["denoised"] if info["denoised"] is not None else info["x"]  # UniPC's last step has none
        image = hooks.preview(denoised) if hooks.control.wants_preview(i + 1) else None
        hooks.control.report(hooks.progress(i + 1, self.steps, image))
        if hooks.step_event is not None:
            latents, stop = hooks.step_event(i, self.steps, self.timestep_of(info), info["x"])
            if latents is not info["x"]:
                info["x"].copy_(latents)
            if stop:
                self.kept = info["x"].clone()
                raise k_samplers.StopSampling

    def result(self, sample: torch.Tensor | None) -> torch.Tensor | None:
        if self.stopped:
            return None
        return self.kept if self.kept is not None else sample


def sample_batch(run: KRun, denoiser: SigmaDenoiser, sigmas: torch.Tensor, start: torch.Tensor,
                 hooks: Hooks) -> torch.Tensor | None:
    """Run a k-diffusion sampler from `start` (already at sigmas[0]); the final latents, or None when the
    batch was interrupted or skipped (an extension's stop keeps the latents reached)."""
    sampler = k_samplers.find_k_sampler(run.sampler)
    reporter = _Reporter(hooks, len(sigmas) - 1,
                         lambda info: float(denoiser.table.to_t(torch.as_tensor([float(info["sigma"])]))[0]))
    result = k_samplers.sample(sampler.name, denoiser, start, sigmas.to(start.device),
                               noise_sampler=_noise_sampler(run, sampler, start, sigmas), callback=reporter,
                               **run.settings.k_options(sampler.name, run.eta),
                               **_range_options(sampler, sigmas, denoiser, run))
    return reporter.result(result)


def sample_flow(run: KRun, denoiser, sigmas: torch.Tensor, start: torch.Tensor, hooks: Hooks) -> torch.Tensor | None:
    """Run a sampler on a rectified flow (`backend.flow_sampling`) from `start` (already at sigmas[0]), each
    image's per-step noise from its own generator; None when the batch was interrupted or skipped."""
    reporter = _Reporter(hooks, len(sigmas) - 1, lambda info: float(info["sigma"]) * 1000)
    images = _image_noise(run, start)
    eta = run.settings.eta(run.sampler, run.eta)
    eta = 1.0 if eta is None else eta
    result = flow_sampling.sample(run.sampler, denoiser, start, sigmas, lambda sigma, sigma_next: images.next(),
                                  reporter, eta=eta)
    return reporter.result(result)


def sample_timesteps(run: KRun, denoiser: TimestepDenoiser, timesteps: torch.Tensor, start: torch.Tensor,
                     hooks: Hooks) -> torch.Tensor | None:
    """Run DDIM, DDIM CFG++, PLMS or UniPC from `start` down `timesteps` (see `timesteps_for`); the final
    latents, or None when the batch was interrupted or skipped."""
    name = schedules.sampler_schedule(run.sampler).sampler
    steps = len(timesteps) if name == "UniPC" else len(timesteps) - 1  # UniPC: one update per timestep
    reporter = _Reporter(hooks, steps, lambda info: float(info["t"]))
    try:
        result = _run_timesteps(name, run, denoiser, timesteps, start, reporter)
    except k_samplers.StopSampling:
        result = None
    return reporter.result(result)


def _run_timesteps(name: str, run: KRun, denoiser: TimestepDenoiser, timesteps: torch.Tensor, start: torch.Tensor,
                   callback: Callable) -> torch.Tensor:
    alphas = denoiser.alphas_cumprod
    if len(timesteps) == 0:  # img2img at a strength too low for one step: the noised init image
        return start
    if name == "UniPC":
        # A1111 starts img2img's UniPC just above the last timestep it kept ("likely off by a bit", it says)
        t_start = unipc.img2img_t_start(timesteps) if run.denoising_strength is not None else None
        s = run.settings
        return unipc.sample_unipc(denoiser, start, alphas, len(timesteps), t_start=t_start, variant=s.uni_pc_variant,
                                  skip_type=s.uni_pc_skip_type, order=s.uni_pc_order,
                                  lower_order_final=s.uni_pc_lower_order_final, callback=callback)
    if name == "PLMS":
        return timestep_samplers.sample_plms(denoiser, start, timesteps, alphas, callback=callback)
    cfgpp = name == "DDIM CFG++"
    denoiser.guidance.configure(timestep_samplers.CFGPP_SCALE if cfgpp else 1.0, keep_uncond=cfgpp)
    images = _image_noise(run, start)
    return timestep_samplers.sample_ddim(denoiser, start, timesteps, alphas, lambda: images.next().to(start.dtype),
                                         callback, eta=run.settings.eta(name, run.eta), uncond_direction=cfgpp)


def _noise_sampler(run: KRun, sampler, x: torch.Tensor, sigmas: torch.Tensor):
    """Per-step noise: a Brownian tree per image seeded by its seed for the SDE samplers (A1111), else
    each image's generator continued."""
    if sampler.brownian_noise:
        # float32 rounding puts a query a hair outside the tree's interval; torchsde says so every step
        warnings.filterwarnings("ignore", message="Should have t[ab]", module="torchsde")
        positive, device = sigmas[sigmas > 0], str(x.device)
        source = noise.effective_source(run.randn_source, device)
        return k_samplers.BrownianTreeNoiseSampler(  # its normals from the chosen source, as A1111's
            x, positive.min(), sigmas.max(), [seed for seed, _ in run.seeds],
            randn=lambda seed, shape: noise.randn_for_seed(source, seed, shape, device))
    images = _image_noise(run, x)
    return lambda sigma, sigma_next: images.next().to(x.dtype)


def _image_noise(run: KRun, x: torch.Tensor) -> ImageNoise:
    return ImageNoise([seed for seed, _ in run.seeds], run.randn_source, str(x.device), tuple(x.shape[1:]),
                      run.eta_noise_seed_delta, first_drawn=not run.seed_resized)


def _range_options(sampler, sigmas: torch.Tensor, denoiser: SigmaDenoiser, run: KRun) -> dict:
    """DPM fast and DPM adaptive take a range and a step count instead of a schedule (A1111: the model's
    range in txt2img, the shortened schedule's in img2img)."""
    if "sigma_min" not in sampler.defaults:
        return {}
    if run.denoising_strength is None:
        table = denoiser.table.sigmas
        options = {"sigma_min": table[0].item(), "sigma_max": table[-1].item()}
    else:
        options = {"sigma_min": sigmas[-2].item(), "sigma_max": sigmas[0].item()}
    if "n" in sampler.defaults:
        options["n"] = len(sigmas) - 1
    return options
