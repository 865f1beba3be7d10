"""The stochastic and adaptive k-diffusion samplers (DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE, DPM fast,
DPM adaptive), the per-image Brownian-tree noise A1111 gives the SDE ones, and the small helpers every
sampler in sigma space shares. Same update rules and order of noise draws as crowsonkb/k-diffusion.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torchsde
from torchsde._brownian import brownian_interval

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma per image) -> denoised x
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, sigma_next) -> N(0, 1) noise
Callback = Callable[[dict], object]
Randn = Callable[[int, tuple], torch.Tensor]  # (seed, shape) -> N(0, 1), as A1111's devices.randn_local


# -- shared helpers ------------------------------------------------------------------------------------


def derivative(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022) from the model's denoised estimate."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step from sigma_from to sigma_to into a deterministic move down to sigma_down and fresh
    noise of standard deviation sigma_up, so that sigma_down**2 + sigma_up**2 == sigma_to**2."""
    if not eta:
        return sigma_to, 0.0
    variance = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2
    sigma_up = min(sigma_to, eta * variance**0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def log_time(sigma: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's time variable t = -log(sigma): it grows as sampling proceeds."""
    return sigma.log().neg()


def time_sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def report(callback: Callback | None, x, i: int, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def randn_noise(x: torch.Tensor) -> NoiseSampler:
    return lambda sigma, sigma_next: torch.randn_like(x)


# -- Brownian-tree noise -------------------------------------------------------------------------------

_TREE_LOCK = threading.Lock()


@contextmanager
def _tree_randn(randn: Randn | None):
    """torchsde draws every normal of a tree through one module-level function; A1111 replaces it with
    its own noise source (CPU, GPU or NV). Swap ours in only while our trees work, and put it back."""
    with _TREE_LOCK:
        if randn is None:
            yield
            return
        original = brownian_interval._randn
        brownian_interval._randn = lambda size, dtype, device, seed: randn(int(seed), tuple(size)).to(device, dtype)
        try:
            yield
        finally:
            brownian_interval._randn = original


class BrownianTreeNoiseSampler:
    """Noise for a step (sigma, sigma_next) as the normalised increment of a Brownian motion over sigma:
    (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|), so overlapping steps get correlated noise.

    `seeds` as a list gives one tree per image, each seeded by its image's seed, so an image comes out
    the same alone or in a batch (A1111 passes the batch's seeds); an int or None (random) gives one
    tree for the whole batch. `randn(seed, shape)` replaces torchsde's normal draws (default: a
    `torch.Generator` on x's device), e.g. with A1111's CPU or NV noise source.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seeds: Sequence[int] | int | None = None,
                 randn: Randn | None = None):
        self._randn = randn
        low, high = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self._orientation = 1 if low < high else -1
        if self._orientation < 0:
            low, high = high, low
        if seeds is None:
            seeds = torch.randint(0, 2**63 - 1, []).item()
        self._batched = not isinstance(seeds, int)
        if self._batched:
            seeds = [int(seed) for seed in seeds]
            if len(seeds) != x.shape[0]:
                raise ValueError(f"BrownianTreeNoiseSampler needs one seed per image: got {len(seeds)} seeds "
                                 f"for a batch of {x.shape[0]}")
            start = torch.zeros_like(x[0])
        else:
            seeds, start = [seeds], torch.zeros_like(x)
        with _tree_randn(randn):
            self._trees = [torchsde.BrownianTree(low, start, high, entropy=seed) for seed in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, direction = (a, b, 1) if a < b else (b, a, -1)
        with _tree_randn(self._randn):
            increments = torch.stack([tree(low, high) for tree in self._trees])
        increments = increments * (self._orientation * direction)
        if not self._batched:
            increments = increments[0]
        return increments / (b - a).abs().sqrt()


def schedule_tree(x: torch.Tensor, sigmas: torch.Tensor) -> BrownianTreeNoiseSampler:
    """k-diffusion's default noise for the SDE samplers: one randomly seeded tree over the schedule."""
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())


# -- DPM++ SDE family ----------------------------------------------------------------------------------


def sample_dpmpp_sde(model: Model, x, sigmas, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic), A1111's "DPM++ SDE": two model calls a step, noise at both stages."""
    noise_sampler = schedule_tree(x, sigmas) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = x + derivative(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = log_time(sigma), log_time(sigma_next)
        h = t_next - t
        s = t + h * r
        # 1. Ancestral step to the intermediate time s, and the model's estimate there.
        sigma_down, sigma_up = ancestral_step(time_sigma(t), time_sigma(s), eta)
        s_down = log_time(sigma_down)
        x_mid = (time_sigma(s_down) / time_sigma(t)) * x - (t - s_down).expm1() * denoised
        x_mid = x_mid + noise_sampler(time_sigma(t), time_sigma(s)) * s_noise * sigma_up
        denoised_mid = model(x_mid, time_sigma(s) * ones)
        # 2. The full step with both estimates blended, then fresh noise up to sigma_next.
        sigma_down, sigma_up = ancestral_step(time_sigma(t), time_sigma(t_next), eta)
        t_down = log_time(sigma_down)
        weight = 1 / (2 * r)
        blended = (1 - weight) * denoised + weight * denoised_mid
        x = (time_sigma(t_down) / time_sigma(t)) * x - (t - t_down).expm1() * blended
        x = x + noise_sampler(time_sigma(t), time_sigma(t_next)) * s_noise * sigma_up
    return x


def sample_dpmpp_2m_sde(model: Model, x, sigmas, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0,
                        solver_type="midpoint"):
    """DPM-Solver++(2M) SDE: A1111's "DPM++ 2M SDE" (midpoint) and "DPM++ 2M SDE Heun" (heun)."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', not {solver_type!r}")
    noise_sampler = schedule_tree(x, sigmas) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    previous = None  # (denoised, h) of the step before, for the second-order correction
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised  # the last step lands on the estimate itself
            continue
        h = log_time(sigma_next) - log_time(sigma)
        eta_h = eta * h
        decay = (-h - eta_h).expm1().neg()  # 1 - exp(-(1 + eta) h)
        x = sigma_next / sigma * (-eta_h).exp() * x + decay * denoised
        if previous is not None:
            old_denoised, h_last = previous
            r = h_last / h
            if solver_type == "heun":
                x = x + (decay / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                x = x + 0.5 * decay * (1 / r) * (denoised - old_denoised)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        previous = denoised, h
    return x


def sample_dpmpp_3m_sde(model: Model, x, sigmas, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: A1111's "DPM++ 3M SDE"; third order once two earlier estimates exist."""
    noise_sampler = schedule_tree(x, sigmas) if noise_sampler is None else noise_sampler
    ones = x.new_ones([x.shape[0]])
    denoised_1 = denoised_2 = h_1 = h_2 = None  # the last two estimates and their step lengths
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = log_time(sigma_next) - log_time(sigma)
        h_eta = h * (eta + 1)
        x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            slope_0 = (denoised - denoised_1) / r0
            slope_1 = (denoised_1 - denoised_2) / r1
            first = slope_0 + (slope_0 - slope_1) * r0 / (r0 + r1)
            second = (slope_0 - slope_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * first - phi_3 * second
        elif h_1 is not None:
            x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# -- DPM-Solver: DPM fast and DPM adaptive -------------------------------------------------------------


class _DPMSolver:
    """DPM-Solver-1/2/3 (Lu et al. 2022) in t = -log(sigma), in noise-prediction form. Model outputs are
    cached per step by role ("eps", "eps_r1", "eps_r2"), so a lower- and a higher-order estimate of the
    same step share their model calls."""

    def __init__(self, model: Model):
        self.model = model

    def eps(self, cache: dict, key: str, x, t):
        if key not in cache:
            sigma = time_sigma(t)
            cache[key] = (x - self.model(x, sigma * x.new_ones([x.shape[0]]))) / sigma
        return cache[key]

    def first_order(self, cache, x, t, t_next):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        return x - time_sigma(t_next) * h.expm1() * eps

    def second_order(self, cache, x, t, t_next, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - time_sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - time_sigma(t_next) * h.expm1() * eps - time_sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def third_order(self, cache, x, t, t_next, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - time_sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - time_sigma(s2) * (r2 * h).expm1() * eps
              - time_sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - time_sigma(t_next) * h.expm1() * eps - time_sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def step(self, order: int, cache, x, t, t_next):
        return (self.first_order, self.second_order, self.third_order)[order - 1](cache, x, t, t_next)


def _ancestral_target(t, t_next, t_end, eta):
    """Where the deterministic part of an ancestral DPM-Solver step aims, and the noise that follows."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(time_sigma(t), time_sigma(t_next), eta)
    target = torch.minimum(t_end, log_time(sigma_down))
    return target, (time_sigma(t_next) ** 2 - time_sigma(target) ** 2) ** 0.5


def _time_range(x, sigmas, sigma_min, sigma_max):
    """DPM-Solver's start and end times. By default the schedule's first and smallest non-zero sigma,
    as A1111 passes them in img2img (in txt2img it passes the model's own sigma range). Like
    k-diffusion, the times are tensors of the default dtype (float32), whatever the schedule's."""
    sigma_max = float(sigmas[0] if sigma_max is None else sigma_max)
    sigma_min = float(sigmas[sigmas > 0].min() if sigma_min is None else sigma_min)
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("DPM fast and DPM adaptive need sigma_min and sigma_max above 0")
    return log_time(torch.tensor(sigma_max, device=x.device)), log_time(torch.tensor(sigma_min, device=x.device))


def sample_dpm_fast(model: Model, x, sigmas, noise_sampler=None, callback=None, eta=0.0, s_noise=1.0,
                    sigma_min=None, sigma_max=None, n=None):
    """DPM-Solver-Fast: `n` model calls (default: one per step of `sigmas`) spent on third-order steps
    evenly spaced in t, with a second- or first-order step to finish."""
    noise_sampler = randn_noise(x) if noise_sampler is None else noise_sampler
    nfe = len(sigmas) - 1 if n is None else int(n)
    if nfe < 1:
        raise ValueError(f"DPM fast needs at least one model call, not {nfe}")
    t_start, t_end = _time_range(x, sigmas, sigma_min, sigma_max)
    if eta and not t_end > t_start:
        raise ValueError("eta must be 0 for reverse sampling")
    m = nfe // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    solver = _DPMSolver(model)
    for i, order in enumerate(orders):
        cache = {}
        t, t_next = ts[i], ts[i + 1]
        target, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        eps = solver.eps(cache, "eps", x, t)
        report(callback, x, i, time_sigma(t), time_sigma(t), x - time_sigma(t) * eps)
        x = solver.step(order, cache, x, t, target)
        x = x + sigma_up * s_noise * noise_sampler(time_sigma(t), time_sigma(t_next))
    return x


class _StepSizeController:
    """PID control of the step size h from the embedded error estimate (Söderlind's digital filters)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.weights = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety = accept_safety
        self.eps = eps
        self.history = []  # inverse errors: current, previous accepted, the one before

    def propose_step(self, error: float) -> bool:
        inverse = 1 / (error + self.eps)
        if not self.history:
            self.history = [inverse] * 3
        self.history[0] = inverse
        b1, b2, b3 = self.weights
        factor = self.history[0] ** b1 * self.history[1] ** b2 * self.history[2] ** b3
        factor = 1 + math.atan(factor - 1)  # limiter: no wild jumps either way
        accept = factor >= self.accept_safety
        if accept:
            self.history[2], self.history[1] = self.history[1], self.history[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(model: Model, x, sigmas, noise_sampler=None, callback=None, order=3, rtol=0.05,
                        atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=0.0, s_noise=1.0, sigma_min=None, sigma_max=None):
    """DPM-Solver-12/23 with adaptive step size: from sigma_max down to sigma_min, each step's order-1
    (or 2) and order-2 (or 3) results compared, the step accepted or retried smaller. `callback` gets
    every attempt, `i` counting rejected ones too."""
    if order not in (2, 3):
        raise ValueError(f"DPM adaptive's order must be 2 or 3, not {order}")
    noise_sampler = randn_noise(x) if noise_sampler is None else noise_sampler
    t_start, t_end = _time_range(x, sigmas, sigma_min, sigma_max)
    if not t_end > t_start:
        raise ValueError("DPM adaptive samples from sigma_max down to a smaller sigma_min")
    atol, rtol = torch.tensor(atol, device=x.device), torch.tensor(rtol, device=x.device)
    controller = _StepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    solver = _DPMSolver(model)
    s, x_prev, attempts = t_start, x, 0
    while s < t_end - 1e-5:
        cache = {}
        t = torch.minimum(t_end, s + controller.h)
        target, sigma_up = _ancestral_target(s, t, t_end, eta)
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - time_sigma(s) * eps
        if order == 2:
            x_low = solver.first_order(cache, x, s, target)
            x_high = solver.second_order(cache, x, s, target)
        else:
            x_low = solver.second_order(cache, x, s, target, r1=1 / 3)
            x_high = solver.third_order(cache, x, s, target)
        scale = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5)
        if not math.isfinite(error):
            raise ValueError("DPM adaptive: the model returned NaN or infinite values")
        if controller.propose_step(error):
            x_prev = x_low
            x = x_high + sigma_up * s_noise * noise_sampler(time_sigma(s), time_sigma(t))
            s = t
        report(callback, x, attempts, time_sigma(s), time_sigma(s), denoised)
        attempts += 1
    return x
