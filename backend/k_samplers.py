"""A1111's k-diffusion samplers in sigma space, by A1111 name: `sample("DPM++ 2M", model, x, sigmas)`.

Euler, Euler a, Heun, DPM2, DPM2 a, LMS, DPM++ 2S a, DPM++ 2M and Restart live here; the SDE and
adaptive ones in `backend.k_samplers_sde`. Each computes what crowsonkb/k-diffusion (the version A1111
1.10 pins) computes, with the same noise draws in the same order, so a seed gives A1111's image.

The caller provides `model(x, sigma) -> denoised` (the UNet behind CFG and the sigma -> timestep
conversion; `sigma` holds one sigma per image), starts `x` at noise * sigmas[0], and may pass
`noise_sampler(sigma, sigma_next) -> N(0, 1) noise` (default torch.randn_like; for the SDE samplers a
randomly seeded Brownian tree, A1111 builds a `BrownianTreeNoiseSampler` from the batch's seeds) and
`callback({"x", "i", "sigma", "sigma_hat", "denoised"})`, called once a step before the update. To stop
early (Interrupt, Skip), raise `StopSampling` from the callback or the model: `sample` then returns the
latest denoised estimate, as A1111 does.

The schedule is the caller's, as A1111 builds it (`backend.schedules.sigmas`: the sampler's own schedule
for "Automatic", without the next-to-last sigma where A1111 drops it). DPM fast and DPM adaptive run from
`sigma_max` to `sigma_min` (default: the schedule's range; A1111's txt2img passes the model's own) and
stop there, not at 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from backend import schedules
from backend.errors import InputError
from backend.k_samplers_sde import (
    BrownianTreeNoiseSampler,
    Model,
    ancestral_step,
    derivative,
    log_time,
    randn_noise,
    report,
    sample_dpm_adaptive,
    sample_dpm_fast,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    time_sigma,
)

__all__ = ["K_SAMPLERS", "BrownianTreeNoiseSampler", "KSampler", "StopSampling", "find_k_sampler", "sample"]


class StopSampling(Exception):
    """Raised by a callback (or the model) to end sampling now; `sample` returns the latest estimate."""


# -- first-order and Heun-family samplers with Karras' "churn" -------------------------------------------


def _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al.'s stochastic step: raise the noise level from sigma to sigma_hat by adding noise.
    The noise is drawn on every step, used or not, as k-diffusion draws it."""
    sigma = sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    noise = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _heun_family(model: Model, x, sigmas, noise_sampler, callback, churn: dict, midpoint: bool):
    """Heun (trapezoid between sigma_hat and sigma_next) or DPM2 (midpoint in log sigma), with churn."""
    noise_sampler = randn_noise(x) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, **churn)
        sigma_next = sigmas[i + 1]
        denoised = model(x, sigma_hat * ones)
        d = derivative(x, sigma_hat, denoised)
        report(callback, x, i, sigmas[i], sigma_hat, denoised)
        if sigma_next == 0:  # the last step is a plain Euler step
            x = x + d * (sigma_next - sigma_hat)
        elif midpoint:
            sigma_mid = sigma_hat.log().lerp(sigma_next.log(), 0.5).exp()
            x_mid = x + d * (sigma_mid - sigma_hat)
            d_mid = derivative(x_mid, sigma_mid, model(x_mid, sigma_mid * ones))
            x = x + d_mid * (sigma_next - sigma_hat)
        else:
            x_euler = x + d * (sigma_next - sigma_hat)
            d_next = derivative(x_euler, sigma_next, model(x_euler, sigma_next * ones))
            x = x + (d + d_next) / 2 * (sigma_next - sigma_hat)
    return x


def sample_heun(model: Model, x, sigmas, noise_sampler=None, callback=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    churn = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    return _heun_family(model, x, sigmas, noise_sampler, callback, churn, midpoint=False)


def sample_dpm_2(model: Model, x, sigmas, noise_sampler=None, callback=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    churn = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    return _heun_family(model, x, sigmas, noise_sampler, callback, churn, midpoint=True)


def sample_euler(model: Model, x, sigmas, noise_sampler=None, callback=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    noise_sampler = randn_noise(x) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * ones)
        d = derivative(x, sigma_hat, denoised)
        report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


# -- ancestral samplers -----------------------------------------------------------------------------------


def sample_euler_ancestral(model: Model, x, sigmas, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    noise_sampler = randn_noise(x) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        report(callback, x, i, sigma, sigma, denoised)
        x = x + derivative(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def sample_dpm_2_ancestral(model: Model, x, sigmas, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    noise_sampler = randn_noise(x) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        report(callback, x, i, sigma, sigma, denoised)
        d = derivative(x, sigma, denoised)
        if sigma_down == 0:  # no noise follows a step down to zero
            x = x + d * (sigma_down - sigma)
            continue
        sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
        x_mid = x + d * (sigma_mid - sigma)
        d_mid = derivative(x_mid, sigma_mid, model(x_mid, sigma_mid * ones))
        x = x + d_mid * (sigma_down - sigma)
        x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def sample_dpmpp_2s_ancestral(model: Model, x, sigmas, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step second-order steps down to sigma_down, then ancestral noise."""
    noise_sampler = randn_noise(x) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_down == 0:
            x = x + derivative(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_down = log_time(sigma), log_time(sigma_down)
            h = t_down - t
            s = t + h * 0.5  # the midpoint in log sigma
            x_mid = (time_sigma(s) / time_sigma(t)) * x - (-h * 0.5).expm1() * denoised
            denoised_mid = model(x_mid, time_sigma(s) * ones)
            x = (time_sigma(t_down) / time_sigma(t)) * x - (-h).expm1() * denoised_mid
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


# -- multistep samplers ---------------------------------------------------------------------------------


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Weights of the last `order` derivatives (newest first) for the step sigmas[i] -> sigmas[i + 1]:
    the integral over that step of each one's Lagrange basis polynomial through sigmas[i - order + 1..i].
    Gauss-Legendre with `order` nodes integrates these degree order-1 polynomials exactly, as scipy's
    quad does in k-diffusion; the nodes' differences are taken in the schedule's own dtype, as there."""
    if order - 1 > i:
        raise ValueError(f"LMS order {order} is too high for step {i}")
    nodes, weights = np.polynomial.legendre.leggauss(max(order, 2))
    start, end = float(sigmas[i]), float(sigmas[i + 1])
    taus = (end - start) / 2 * nodes + (start + end) / 2
    coefficients = []
    for j in range(order):
        basis = np.ones_like(taus)
        for k in range(order):
            if k != j:
                basis *= (taus - float(sigmas[i - k])) / float(sigmas[i - j] - sigmas[i - k])
        coefficients.append(float((end - start) / 2 * np.dot(weights, basis)))
    return coefficients


def sample_lms(model: Model, x, sigmas, noise_sampler=None, callback=None, order=4):
    """Linear multistep: a polynomial through the last `order` derivatives, integrated over the step."""
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ones = x.new_ones([x.shape[0]])
    history = []  # derivatives, oldest first
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones)
        history = [*history, derivative(x, sigmas[i], denoised)][-order:]
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        step_order = min(i + 1, order)
        coefficients = lms_coefficients(sigmas_cpu, i, step_order)
        x = x + sum(c * d for c, d in zip(coefficients, reversed(history)))
    return x


def sample_dpmpp_2m(model: Model, x, sigmas, noise_sampler=None, callback=None):
    """DPM-Solver++(2M): each step extrapolates the denoised estimate from the last two."""
    ones = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones)
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = log_time(sigmas[i]), log_time(sigmas[i + 1])
        h = t_next - t
        if old_denoised is not None and sigmas[i + 1] != 0:
            r = (t - log_time(sigmas[i - 1])) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        else:  # first step, and the step to zero: first order
            estimate = denoised
        x = (time_sigma(t_next) / time_sigma(t)) * x - (-h).expm1() * estimate
        old_denoised = denoised
    return x


# -- Restart (A1111's sd_samplers_extra) ---------------------------------------------------------------


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> torch.Tensor:
    """Karras et al.'s schedule (`backend.schedules.karras`: n sigmas evenly spaced in sigma**(1/rho),
    then a final 0), on `device`: what Restart rebuilds its schedule with."""
    return schedules.karras(n, sigma_min, sigma_max, rho).to(device)


def restart_plan(sigmas: torch.Tensor, restart_list: dict | None = None) -> list[tuple]:
    """Restart's (sigma_from, sigma_to) Heun steps. `restart_list` maps a sigma to
    [steps, times, sigma_max]: on reaching it, jump back up to sigma_max `times` times and come down in
    `steps - 1` steps. A1111's default: none under 20 steps; else 9 restart steps once (from 36 steps,
    steps // 4 steps twice) from sigma 0.1 up to 2, the main Karras schedule shortened to keep the
    total step count."""
    if restart_list is None:
        steps = len(sigmas) - 1
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = karras_sigmas(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item(),
                                   device=sigmas.device)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    nearest = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    plan = []
    for i in range(len(sigmas) - 1):
        plan.append((sigmas[i], sigmas[i + 1]))
        if i + 1 not in nearest:
            continue
        restart_steps, restart_times, restart_max = nearest[i + 1]
        low_index, high_index = i + 1, int(torch.argmin(abs(sigmas - restart_max), dim=0))
        if high_index < low_index:
            ladder = karras_sigmas(restart_steps, sigmas[low_index].item(), sigmas[high_index].item(),
                                   device=sigmas.device)[:-1]
            plan.extend(list(zip(ladder[:-1], ladder[1:])) * restart_times)
    return plan


def sample_restart(model: Model, x, sigmas, noise_sampler=None, callback=None, s_noise=1.0, restart_list=None):
    """Restart sampling (Xu et al. 2023): Heun steps, and at each restart fresh noise lifting x from the
    sigma reached back up to the restart's top sigma. The callback gets `sigma` = the step's target."""
    noise_sampler = randn_noise(x) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    last_sigma = None
    for i, (sigma, sigma_next) in enumerate(restart_plan(sigmas, restart_list)):
        if last_sigma is not None and last_sigma < sigma:
            x = x + noise_sampler(last_sigma, sigma) * s_noise * (sigma**2 - last_sigma**2) ** 0.5
        denoised = model(x, sigma * ones)
        d = derivative(x, sigma, denoised)
        report(callback, x, i, sigma_next, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x_euler = x + d * (sigma_next - sigma)
            d_next = derivative(x_euler, sigma_next, model(x_euler, sigma_next * ones))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        last_sigma = sigma_next
    return x


def sample_lcm(model: Model, x, sigmas, noise_sampler=None, callback=None):
    """A1111's LCM sampler: jump to the model's consistency estimate, then noise it to the next sigma."""
    noise_sampler = randn_noise(x) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


# -- the table and the entry point ---------------------------------------------------------------------

_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
_ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}  # A1111's "Eta for ancestral samplers" and "sigma noise"
_DPM_SOLVER_RANGE = {"sigma_min": None, "sigma_max": None}


@dataclass(frozen=True)
class KSampler:
    """One A1111 sampler: its function and A1111's options for it (every option it accepts). How A1111
    prepares its run (its schedule for "Automatic", a dropped next-to-last sigma, Brownian-tree noise)
    and its aliases are in `backend.schedules.sampler_schedule`, the one table of those."""

    name: str
    function: Callable[..., torch.Tensor]
    defaults: dict = field(default_factory=dict)

    @property
    def brownian_noise(self) -> bool:
        return schedules.sampler_schedule(self.name).brownian_noise

    @property
    def discard_penultimate_sigma(self) -> bool:
        return schedules.sampler_schedule(self.name).discard_penultimate_sigma


_ADAPTIVE = {"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0,
             "accept_safety": 0.81}
K_SAMPLERS = {s.name: s for s in (  # A1111's order
    KSampler("DPM++ 2M", sample_dpmpp_2m),
    KSampler("DPM++ SDE", sample_dpmpp_sde, {**_ANCESTRAL, "r": 0.5}),
    KSampler("DPM++ 2M SDE", sample_dpmpp_2m_sde, {**_ANCESTRAL, "solver_type": "midpoint"}),
    KSampler("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde, {**_ANCESTRAL, "solver_type": "heun"}),
    KSampler("DPM++ 2S a", sample_dpmpp_2s_ancestral, {**_ANCESTRAL}),
    KSampler("DPM++ 3M SDE", sample_dpmpp_3m_sde, {**_ANCESTRAL}),
    KSampler("Euler a", sample_euler_ancestral, {**_ANCESTRAL}),
    KSampler("Euler", sample_euler, {**_CHURN}),
    KSampler("LMS", sample_lms, {"order": 4}),
    KSampler("Heun", sample_heun, {**_CHURN}),
    KSampler("DPM2", sample_dpm_2, {**_CHURN}),
    KSampler("DPM2 a", sample_dpm_2_ancestral, {**_ANCESTRAL}),
    KSampler("DPM fast", sample_dpm_fast, {**_ANCESTRAL, **_DPM_SOLVER_RANGE, "n": None}),
    KSampler("DPM adaptive", sample_dpm_adaptive, {**_ANCESTRAL, **_DPM_SOLVER_RANGE, **_ADAPTIVE}),
    KSampler("Restart", sample_restart, {"s_noise": 1.0, "restart_list": None}),
    KSampler("LCM", sample_lcm),  # A1111's own (sd_samplers_lcm.py), listed after the timestep samplers
)}


def find_k_sampler(name: str) -> KSampler:
    """A sampler by its A1111 name or alias, in any case."""
    try:
        sampler = K_SAMPLERS.get(schedules.sampler_schedule(str(name)).sampler)
    except InputError:
        sampler = None
    if sampler is None:
        raise InputError(f"unknown k-diffusion sampler {name!r}; available: {', '.join(K_SAMPLERS)}")
    return sampler


def sample(name: str, model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise_sampler=None, callback=None,
           **options) -> torch.Tensor:
    """Run A1111's sampler `name` from x (noise * sigmas[0]) down the schedule `sigmas` (ending in 0).
    `options` override A1111's defaults (`K_SAMPLERS[name].defaults`). Returns the sample, or, when
    the callback or the model raises `StopSampling`, the latest denoised estimate (x if none yet)."""
    sampler = find_k_sampler(name)
    unknown = sorted(set(options) - set(sampler.defaults))
    if unknown:
        accepted = ", ".join(sampler.defaults) or "none"
        raise InputError(f"sampler {sampler.name!r} has no option {', '.join(unknown)}; its options: {accepted}")
    latest = {}

    def remember(info: dict):
        latest["denoised"] = info["denoised"]
        if callback is not None:
            callback(info)

    with torch.no_grad():
        try:
            return sampler.function(model, x, sigmas, noise_sampler=noise_sampler, callback=remember,
                                    **{**sampler.defaults, **options})
        except StopSampling:
            return latest.get("denoised", x)
