"""One batch through an A1111 k-diffusion sampler, as A1111 v1.10 runs it: the UNet as a denoiser in sigma
space (CompVis scalings, fractional timesteps), A1111's sigmas, txt2img's start at noise x sigma_max,
img2img's and the hires fix's shortened schedule, inpainting's blend on the denoised estimate, each
image's own per-step noise (or a Brownian tree seeded by its seed), progress, previews, interrupt and
the extensions' `step` events.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from backend import k_samplers, noise, philox, schedules
from backend.progress import JobControl, Progress


def uses_k_diffusion(sampler_name: str) -> bool:
    return sampler_name in k_samplers.K_SAMPLERS


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


def schedule_for(run: KRun, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The sigmas this batch samples: A1111's for the sampler and schedule, shortened for img2img as A1111's
    `setup_img2img_steps` shortens them."""
    steps = run.steps
    if run.denoising_strength is None:
        return schedules.sigmas(alphas_cumprod, steps, run.schedule, run.family, run.sampler)
    strength = min(run.denoising_strength, 0.999)
    if run.fixed_steps:
        total, t_enc = (int(steps / strength) if strength > 0 else 0), steps - 1
    else:
        total, t_enc = steps, int(strength * steps)
    full = schedules.sigmas(alphas_cumprod, max(1, total), run.schedule, run.family, run.sampler)
    return full[max(0, len(full) - t_enc - 2):]


class ImageNoise:
    """Each image's noise after the first draw, continuing its own generator (A1111's ImageRNG.next):
    torch's CPU generator, the device's (GPU source on CUDA), or NVIDIA's Philox (NV)."""

    def __init__(self, seeds: list[int], source: str, device: str, shape: tuple[int, ...]):
        self.shape, self.device = tuple(shape), device
        self.source = noise.effective_source(source, device)
        self.generators = []
        for seed in seeds:
            if self.source == noise.NV:
                generator = philox.PhiloxGenerator(seed)
                generator.randn(self.shape)  # the first draw was the initial noise
            else:
                generator = torch.Generator(device if self.source == noise.GPU else "cpu").manual_seed(seed)
                torch.randn(self.shape, generator=generator, device=generator.device)
            self.generators.append(generator)

    def next(self) -> torch.Tensor:
        if self.source == noise.NV:
            draws = [g.randn_tensor(self.shape) for g in self.generators]
        else:
            draws = [torch.randn(self.shape, generator=g, device=g.device) for g in self.generators]
        return torch.stack(draws).to(self.device)


class SigmaDenoiser:
    """`model(x, sigma) -> denoised`: the UNet behind guidance as k-diffusion's CompVisDenoiser
    (epsilon) or CompVisVDenoiser (v-prediction) wraps it, with inpainting's blend (A1111's CFGDenoiser:
    the unmasked area of the estimate is the init image's). Counts its calls: A1111 advances prompt
    schedules once per call."""

    def __init__(self, model, predict: Callable, log_sigmas: torch.Tensor, extra_channels=None, blend=None):
        self.model, self.predict, self.extra_channels, self.blend = model, predict, extra_channels, blend
        self.log_sigmas = log_sigmas  # the model's sigma table, log (schedules.model_sigmas)
        self.v_prediction = model.scheduler_config.get("prediction_type") == "v_prediction"
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        c_in = 1.0 / (s**2 + 1.0) ** 0.5
        t = schedules.sigma_to_t(sigma.flatten()[:1].float().cpu(), self.log_sigmas)[0].to(self.model.device)
        model_input = (x * c_in).to(self.model.dtype)
        if self.extra_channels is not None:
            model_input = torch.cat([model_input, self.extra_channels], dim=1)
        out = self.predict(model_input, t, self.calls).to(x.dtype)
        self.calls += 1
        if self.v_prediction:
            denoised = x / (s**2 + 1.0) - out * s / (s**2 + 1.0) ** 0.5
        else:
            denoised = x - out * s
        if self.blend is not None:
            init, mask = self.blend
            denoised = init * (1 - mask) + denoised * mask
        return denoised


@dataclass
class Hooks:
    """What the loop reports to: progress and previews, interrupt and skip, the extensions' step events."""

    control: JobControl
    progress: Callable[[int, int, torch.Tensor | None], Progress]  # (step, steps, preview source) -> Progress
    preview: Callable[[torch.Tensor], object]
    step_event: Callable[[int, int, float, torch.Tensor], tuple[torch.Tensor, bool]] | None = None


def sample_batch(run: KRun, denoiser: SigmaDenoiser, sigmas: torch.Tensor, start: torch.Tensor,
                 hooks: Hooks) -> torch.Tensor | None:
    """Run the sampler from `start` (already at sigmas[0]); the final latents, or None when the batch was
    interrupted or skipped (an extension's stop keeps the latents reached)."""
    sampler = k_samplers.find_k_sampler(run.sampler)
    steps = len(sigmas) - 1
    state: dict = {"stopped": False, "kept": None}

    def callback(info: dict) -> None:
        i = int(info["i"])
        if hooks.control.should_stop_batch:
            state["stopped"] = True
            raise k_samplers.StopSampling
        image = hooks.preview(info["denoised"]) if hooks.control.wants_preview(i + 1) else None
        hooks.control.report(hooks.progress(i + 1, steps, image))
        if hooks.step_event is not None:
            latents, stop = hooks.step_event(i, steps, float(info["sigma"]), info["x"])
            if latents is not info["x"]:
                info["x"].copy_(latents)
            if stop:
                state["kept"] = info["x"].clone()
                raise k_samplers.StopSampling

    result = k_samplers.sample(sampler.name, denoiser, start, sigmas.to(start.device),
                               noise_sampler=_noise_sampler(run, sampler, start, sigmas), callback=callback,
                               **_range_options(sampler, sigmas, denoiser, run))
    if state["stopped"]:
        return None
    return state["kept"] if state["kept"] is not None else result


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
    images = ImageNoise([seed for seed, _ in run.seeds], run.randn_source, str(x.device), tuple(x.shape[1:]))
    return lambda sigma, sigma_next: images.next().to(x.dtype)


def _range_options(sampler, sigmas: torch.Tensor, denoiser: SigmaDenoiser, run: KRun) -> dict:
    """DPM fast and DPM adaptive take a range and a step count instead of a schedule (A1111: the model's
    range in txt2img, the shortened schedule's in img2img)."""
    if "sigma_min" not in sampler.defaults:
        return {}
    if run.denoising_strength is None:
        table = denoiser.log_sigmas.exp()
        options = {"sigma_min": table[0].item(), "sigma_max": table[-1].item()}
    else:
        options = {"sigma_min": sigmas[-2].item(), "sigma_max": sigmas[0].item()}
    if "n" in sampler.defaults:
        options["n"] = len(sigmas) - 1
    return options
