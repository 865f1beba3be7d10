"""Sampling for rectified-flow families (FLUX.1, SD 3.x): their sigma schedules with the family's shift, the
network as a k-diffusion denoiser, and the ancestral step of a flow.

A flow model sees x_sigma = (1 - sigma) * image + sigma * noise for sigma in [0, 1] and predicts the velocity
noise - image, so its denoised estimate is x - sigma * velocity. The k-diffusion samplers then step it as they
step SD's (Euler is the flow's own Euler step); Euler a renoises as a flow must (`sample_euler_ancestral`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from backend import k_samplers
from backend.errors import InputError

SIMPLE = "Simple"
# Schedule types that mean something for a flow ("Automatic" is "Simple", as Forge presets FLUX and SD 3).
SCHEDULE_TYPES = ("Automatic", SIMPLE, "Normal", "Uniform", "Karras", "Beta", "SGM Uniform")
# The k-diffusion samplers that are sound on a flow; the others' noise algebra assumes SD's schedule.
SAMPLERS = ("Euler", "Euler a", "Heun", "DPM++ 2M", "LMS")
TRAIN_STEPS = 1000  # the flows are trained on t = 1/1000 ... 1
KARRAS_RHO = 7.0
BETA_ALPHA = BETA_BETA = 0.6


@dataclass(frozen=True)
class Shift:
    """How a family bends the schedule towards high noise: SD 3's sigma' = s*sigma / (1 + (s-1)*sigma), or with
    `exponential` FLUX's exp(mu) / (exp(mu) + 1/sigma - 1), mu growing with the image's token count. The two
    are one curve: mu = ln(s) (FLUX.1 dev at 1024x1024, mu 1.15, shifts as s = 3.16 would)."""

    value: float  # s, or mu for the exponential shift
    exponential: bool = False

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.double()
        if self.exponential:
            shifted = math.exp(self.value) / (math.exp(self.value) + (1.0 / sigma - 1.0))
        else:
            shifted = self.value * sigma / (1.0 + (self.value - 1.0) * sigma)
        return shifted.float()


def resolution_mu(tokens: int, base: tuple[int, float] = (256, 0.5), top: tuple[int, float] = (4096, 1.15)) -> float:
    """FLUX.1 dev's shift for an image of `tokens` 2x2 latent patches: linear from 0.5 at 256 tokens
    (256x256 px) to 1.15 at 4096 (1024x1024 px), extrapolated beyond."""
    slope = (top[1] - base[1]) / (top[0] - base[0])
    return base[1] + slope * (tokens - base[0])


def check_sampler(sampler: str, schedule: str, label: str) -> str:
    """The schedule type a flow runs for `schedule` ("Automatic" is "Simple"); InputError naming the choices
    for a sampler or schedule type that is unsound on a flow."""
    if sampler not in SAMPLERS:
        raise InputError(f"sampler '{sampler}' does not work with {label} models; use one of {', '.join(SAMPLERS)}")
    if schedule not in SCHEDULE_TYPES:
        raise InputError(f"schedule type '{schedule}' does not work with {label} models; use one of "
                         f"{', '.join(SCHEDULE_TYPES)}")
    return SIMPLE if schedule == "Automatic" else schedule


def sigmas(steps: int, schedule: str, shift: Shift) -> torch.Tensor:
    """`steps` + 1 float32 sigmas from 1 down to 0 for a schedule type (see `check_sampler`)."""
    if schedule in ("Automatic", SIMPLE, "SGM Uniform"):  # diffusers' and ComfyUI's: t = 1, 1 - 1/n, ..., 1/n
        t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    elif schedule in ("Normal", "Uniform"):  # evenly between the first and last training sigma (diffusers' default)
        t = torch.linspace(1.0, shift(torch.tensor(1.0 / TRAIN_STEPS)).item(), steps, dtype=torch.float64)
    elif schedule == "Karras":
        low, high = shift(torch.tensor(1.0 / TRAIN_STEPS)).item(), 1.0
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        rho = KARRAS_RHO
        result = (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
        return torch.cat([result.float(), torch.zeros(1)])
    elif schedule == "Beta":
        from scipy import stats

        quantiles = 1.0 - np.linspace(0, 1, steps, endpoint=False)
        t = torch.tensor([stats.beta.ppf(q, BETA_ALPHA, BETA_BETA) for q in quantiles], dtype=torch.float64)
        t = t.clamp(min=1.0 / TRAIN_STEPS)
    else:
        raise InputError(f"unknown schedule type '{schedule}' for a flow model; use one of {', '.join(SCHEDULE_TYPES)}")
    return torch.cat([shift(t), torch.zeros(1)])


def noised(image: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The flow's state at `sigma` between an image and noise (img2img's start)."""
    return (1.0 - sigma) * image + sigma * noise


class FlowDenoiser:
    """`model(x, sigma) -> denoised` for the k-diffusion samplers: the guided velocity (`predict(input, t,
    call)`, where `timestep(sigma)` gives the family's t) made an image estimate, with inpainting's blend (the
    unmasked area of the estimate is the init image's). Counts its calls, as prompt schedules advance per call."""

    def __init__(self, dtype: torch.dtype, device, predict: Callable, timestep: Callable, blend=None):
        self.dtype, self.device, self.predict, self.timestep, self.blend = dtype, device, predict, timestep, blend
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        t = self.timestep(sigma.flatten()[:1].float()).to(self.device)
        velocity = self.predict(x.to(self.dtype), t[0], self.calls).to(x.dtype)
        self.calls += 1
        denoised = x - velocity * s
        if self.blend is not None:
            init, mask = self.blend
            denoised = init * (1 - mask) + denoised * mask
        return denoised


def sample_euler_ancestral(model, x, sigmas, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """Euler a on a flow: an Euler step down to sigma_down, then the image part rescaled and fresh noise added
    so the state is the flow's at sigma_next again. eta 1: sigma_down = sigma_next^2 / sigma (k-diffusion's
    ancestral split); eta 0: plain Euler."""
    noise_sampler = k_samplers.randn_noise(x) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones)
        k_samplers.report(callback, x, i, sigma, sigma, denoised)
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next == 0:
            continue
        scale = (1 - sigma_next) / (1 - sigma_down)
        renoise = (sigma_next**2 - (sigma_down * scale) ** 2).clamp(min=0).sqrt()
        x = x * scale + noise_sampler(sigma, sigma_next) * s_noise * renoise
    return x


def sample(sampler: str, model: FlowDenoiser, x: torch.Tensor, sigmas: torch.Tensor, noise_sampler, callback,
           eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Run `sampler` (one of `SAMPLERS`) from x at sigmas[0]; on `StopSampling` the latest estimate."""
    if sampler != "Euler a":
        return k_samplers.sample(sampler, model, x, sigmas, noise_sampler=noise_sampler, callback=callback)
    latest = {}

    def remember(info: dict):
        latest["denoised"] = info["denoised"]
        callback(info)

    with torch.no_grad():
        try:
            return sample_euler_ancestral(model, x, sigmas, noise_sampler, remember, eta=eta, s_noise=s_noise)
        except k_samplers.StopSampling:
            return latest.get("denoised", x)
