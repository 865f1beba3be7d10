"""A1111's timestep samplers DDIM, DDIM CFG++ and PLMS, computing what A1111 v1.10 computes
(`sd_samplers_timesteps_impl.py`); UniPC is in `backend.unipc`.

They step through the CompVis timesteps (`backend.schedules.compvis_timesteps`) with the model's
noise prediction `model(x, t) -> eps` at whole timesteps, from the last timestep down to the first. As in
A1111, `len(timesteps) - 1` steps are taken (20 steps: 19 model calls for DDIM), the last one landing
on the first timestep's alpha (t = 1), not on the clean image; and the step scalars are float32 tensors
of the latents' type, as A1111's `.item() * s_x` makes them.

The callback gets `{'x', 'i', 't', 'denoised'}` after each step; it may raise to stop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CFGPP_SCALE = 1 / 12.5  # DDIM CFG++ maps CFG 0..12.5 onto guidance 0..1 (A1111's cond_scale multiplier)


def step_alphas(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each step's alpha_cumprod (float32, the model's table) and the previous timestep's (float64; the
    first step's previous is timestep 0's), indexed like `timesteps`."""
    timesteps = timesteps.long().cpu()
    table = alphas_cumprod.float().cpu()
    previous = torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))
    return table[timesteps], table[previous].double()


def ddim_sigmas(alphas: torch.Tensor, alphas_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM's per-step noise scale (0 everywhere at eta 0, A1111's default `eta_ddim`)."""
    a, a_prev = alphas.double(), alphas_prev.double()
    return eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()


def _scalar(value, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def sample_ddim(model: Callable, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                noise_sampler: Callable | None = None, callback: Callable | None = None, eta: float = 0.0,
                uncond_direction: bool = False) -> torch.Tensor:
    """DDIM; with `uncond_direction` DDIM CFG++, which points the step at the negative prompt's noise
    prediction (`model.last_uncond` after each call). For CFG++ the caller's guidance runs at
    CFG x `CFGPP_SCALE` and always computes the negative prompt's prediction."""
    alphas, alphas_prev = step_alphas(timesteps, alphas_cumprod)
    sqrt_one_minus = (1 - alphas).sqrt()
    sigmas = ddim_sigmas(alphas, alphas_prev, eta)
    ones = x.new_ones(x.shape[0])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        t = timesteps[index].item()
        e_t = model(x, t * ones)
        direction = model.last_uncond if uncond_direction else e_t
        a_t, a_prev = _scalar(alphas[index], x), _scalar(alphas_prev[index], x)
        sigma_t = _scalar(sigmas[index], x)
        pred_x0 = (x - _scalar(sqrt_one_minus[index], x) * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma_t**2).sqrt() * direction
        if sigma_t > 0:  # A1111 draws every step and multiplies by 0 at eta 0; nothing else reads the draws
            x = x + sigma_t * noise_sampler()
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": pred_x0})
    return x


def sample_plms(model: Callable, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                noise_sampler: Callable | None = None, callback: Callable | None = None) -> torch.Tensor:
    """PLMS: a pseudo improved Euler first step (two model calls), then Adams-Bashforth of order 2, 3
    and 4 over the previous noise predictions."""
    alphas, alphas_prev = step_alphas(timesteps, alphas_cumprod)
    sqrt_one_minus = (1 - alphas).sqrt()
    ones = x.new_ones(x.shape[0])
    old_eps: list[torch.Tensor] = []

    def step(x, e_t, index):
        a_t, a_prev = _scalar(alphas[index], x), _scalar(alphas_prev[index], x)
        pred_x0 = (x - _scalar(sqrt_one_minus[index], x) * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t, pred_x0

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        t, t_next = timesteps[index].item(), timesteps[max(index - 1, 0)].item()
        e_t = model(x, t * ones)
        if not old_eps:
            x_next, _ = step(x, e_t, index)
            e_prime = (e_t + model(x_next, t_next * ones)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = step(x, e_prime, index)
        old_eps = [*old_eps, e_t][-3:]
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": pred_x0})
    return x
