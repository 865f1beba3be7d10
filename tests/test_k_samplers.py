"""k-diffusion samplers in sigma space (backend.k_samplers): toy denoisers with known answers, steps
written out here from k-diffusion's equations (different code, same math), fixed noise for the
ancestral and SDE samplers, and the per-image Brownian tree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend import k_samplers, k_sampling, samplers
from backend.errors import InputError
from backend.k_samplers import K_SAMPLERS, BrownianTreeNoiseSampler, StopSampling, sample
from backend.k_samplers_sde import brownian_interval

F64 = torch.float64
MU = torch.tensor([0.5, -1.0, 2.0], dtype=F64).view(1, 3, 1, 1).expand(2, 3, 2, 2).clone()
S2 = 0.25  # the Gaussian toy's data variance
SIGMAS = torch.tensor([8.0, 2.5, 0.7], dtype=F64)  # two steps that stay above zero
X0 = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 8.0


def constant_model(x, sigma):
    """Data is exactly MU: the ODE's x(sigma) = MU + sigma / sigma_0 * (x_0 - MU)."""
    return MU.expand_as(x).clone()


def gaussian_model(x, sigma):
    """Data ~ N(MU, S2), the exact denoiser: the ODE's
    x(sigma) = MU + sqrt((S2 + sigma^2) / (S2 + sigma_0^2)) * (x_0 - MU)."""
    return denoise(x, sigma.view(-1, 1, 1, 1))


def denoise(x, sigma):
    return (x * S2 + MU * sigma**2) / (S2 + sigma**2)


def eps(x, sigma):
    return (x - denoise(x, sigma)) / sigma


def split(sigma, sigma_next, eta=1.0):
    """Ancestral split of a step: sigma_down for the ODE part, sigma_up of fresh noise."""
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


class FixedNoise:
    """Known noise tensors in call order, and the (sigma, sigma_next) of each call."""

    def __init__(self, shape=X0.shape, seed=1):
        self.generator = torch.Generator().manual_seed(seed)
        self.shape, self.calls, self.drawn = shape, [], []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        self.drawn.append(torch.randn(self.shape, generator=self.generator, dtype=F64))
        return self.drawn[-1]

    def replay(self):
        return iter([n.clone() for n in self.drawn])


def karras(n, low=0.03, high=10.0):
    return k_samplers.karras_sigmas(n, low, high).to(F64)


@pytest.fixture
def float64_times():
    """DPM fast/adaptive build their time grid in the default dtype, as k-diffusion does."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(previous)


# -- every sampler on the toys ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in K_SAMPLERS if not n.startswith("DPM fast") and n != "DPM adaptive"])
def test_every_sampler_lands_on_the_data_when_the_data_is_one_point(name):
    sigmas = karras(12)
    out = sample(name, constant_model, X0 * sigmas[0], sigmas, noise_sampler=FixedNoise())
    torch.testing.assert_close(out, MU, rtol=0, atol=1e-9)


DETERMINISTIC = [("Euler", {}), ("Heun", {}), ("DPM2", {}), ("LMS", {}), ("DPM++ 2M", {}), ("Restart", {}),
                 ("Euler a", {"eta": 0.0}), ("DPM2 a", {"eta": 0.0}), ("DPM++ 2S a", {"eta": 0.0}),
                 ("DPM++ SDE", {"eta": 0.0}), ("DPM++ 2M SDE", {"eta": 0.0}), ("DPM++ 2M SDE Heun", {"eta": 0.0}),
                 ("DPM++ 3M SDE", {"eta": 0.0}), ("DPM fast", {"eta": 0.0}), ("DPM adaptive", {"eta": 0.0})]


@pytest.mark.parametrize("name, options", DETERMINISTIC)
def test_deterministic_samplers_follow_the_exact_trajectory(name, options, float64_times):
    sigmas = karras(12)
    x_start, seen = X0 * sigmas[0], []
    out = sample(name, constant_model, x_start, sigmas, noise_sampler=FixedNoise(), callback=seen.append, **options)
    assert seen
    for info in seen:  # the x each callback reports sits on the line from x_start to MU
        expected = MU + float(info["sigma_hat"]) / float(sigmas[0]) * (x_start - MU)
        torch.testing.assert_close(info["x"], expected, rtol=0, atol=1e-9)
    end = 0.03 if name in ("DPM fast", "DPM adaptive") else 0.0  # these stop at the smallest non-zero sigma
    torch.testing.assert_close(out, MU + end / float(sigmas[0]) * (x_start - MU), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name, ratio", [("Euler", 0.6), ("Heun", 0.3), ("DPM2", 0.3), ("LMS", 0.3), ("DPM++ 2M", 0.3)])
def test_error_against_the_exact_solution_shrinks_with_the_order(name, ratio):
    errors = []
    for steps in (10, 20, 40):
        sigmas = karras(steps)
        x_start = X0 * sigmas[0]
        exact = MU + math.sqrt(S2 / (S2 + float(sigmas[0]) ** 2)) * (x_start - MU)
        errors.append(float((sample(name, gaussian_model, x_start, sigmas) - exact).abs().max()))
    assert errors[1] < ratio * errors[0] and errors[2] < ratio * errors[1]


# -- one or two steps written out ---------------------------------------------------------------------------


def run(name, sigmas=SIGMAS, **options):
    noise = FixedNoise()
    return sample(name, gaussian_model, X0.clone(), sigmas, noise_sampler=noise, **options), noise


def expected_first_order(x, sigmas):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (x - denoise(x, sigma)) / sigma * (sigma_next - sigma)
    return x


def test_euler():
    out, _ = run("Euler")
    torch.testing.assert_close(out, expected_first_order(X0, [8.0, 2.5, 0.7]), rtol=1e-12, atol=1e-6)


@pytest.mark.parametrize("s_tmin, churned", [(0.0, (True, True)), (3.0, (True, False))])
def test_euler_with_churn_raises_sigma_first_and_draws_noise_every_step(s_tmin, churned):
    out, noise = run("Euler", s_churn=0.6, s_tmin=s_tmin, s_noise=0.9)
    gamma = min(0.6 / 2, math.sqrt(2) - 1)
    draws, x = noise.replay(), X0
    for (sigma, sigma_next), churn in zip(((8.0, 2.5), (2.5, 0.7)), churned):
        drawn = next(draws)  # taken whether it is used or not, as k-diffusion takes it
        sigma_hat = sigma * (1 + gamma) if churn else sigma
        x = x + drawn * 0.9 * math.sqrt(sigma_hat**2 - sigma**2)
        x = x + (x - denoise(x, sigma_hat)) / sigma_hat * (sigma_next - sigma_hat)
    assert noise.calls == [(8.0, 2.5), (2.5, 0.7)]
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)


def test_heun():
    out, _ = run("Heun")
    x = X0
    for sigma, sigma_next in ((8.0, 2.5), (2.5, 0.7)):
        d = eps(x, sigma)
        x_euler = x + d * (sigma_next - sigma)
        x = x + (d + eps(x_euler, sigma_next)) / 2 * (sigma_next - sigma)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)


def test_dpm2_steps_through_the_geometric_midpoint():
    out, _ = run("DPM2")
    x = X0
    for sigma, sigma_next in ((8.0, 2.5), (2.5, 0.7)):
        sigma_mid = math.sqrt(sigma * sigma_next)
        x_mid = x + eps(x, sigma) * (sigma_mid - sigma)
        x = x + eps(x_mid, sigma_mid) * (sigma_next - sigma)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)


def test_lms_integrates_the_lagrange_polynomial_through_past_derivatives():
    sigmas = [10.0, 6.0, 3.5, 2.0, 1.1, 0.5, 0.2]
    out, _ = run("LMS", sigmas=torch.tensor(sigmas, dtype=F64))
    x, history = X0, []
    for i in range(len(sigmas) - 1):
        history.append(eps(x, sigmas[i]))
        order = min(i + 1, 4)
        for j in range(order):  # numpy's polynomial algebra, not quadrature
            nodes = [sigmas[i - k] for k in range(order) if k != j]
            basis = np.poly1d(nodes, r=True) / np.prod([sigmas[i - j] - n for n in nodes])
            integral = np.polyint(basis)
            x = x + (integral(sigmas[i + 1]) - integral(sigmas[i])) * history[-1 - j]
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-6)


def test_dpmpp_2m_extrapolates_the_denoised_estimate():
    out, _ = run("DPM++ 2M")
    d0 = denoise(X0, 8.0)
    x1 = 2.5 / 8.0 * X0 + (1 - 2.5 / 8.0) * d0
    r = math.log(8.0 / 2.5) / math.log(2.5 / 0.7)
    d1 = denoise(x1, 2.5)
    x2 = 0.7 / 2.5 * x1 + (1 - 0.7 / 2.5) * ((1 + 1 / (2 * r)) * d1 - d0 / (2 * r))
    torch.testing.assert_close(out, x2, rtol=1e-12, atol=1e-6)


@pytest.mark.parametrize("eta, s_noise", [(1.0, 1.0), (0.6, 0.8)])
def test_euler_ancestral(eta, s_noise):
    out, noise = run("Euler a", sigmas=torch.tensor([8.0, 2.5, 0.7, 0.0], dtype=F64), eta=eta, s_noise=s_noise)
    draws, x = noise.replay(), X0
    for sigma, sigma_next in ((8.0, 2.5), (2.5, 0.7)):
        down, up = split(sigma, sigma_next, eta)
        x = x + eps(x, sigma) * (down - sigma) + next(draws) * s_noise * up
    x = denoise(x, 0.7)  # the last step goes down to zero without noise
    assert noise.calls == [(8.0, 2.5), (2.5, 0.7)]
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)


def test_dpm2_ancestral():
    out, noise = run("DPM2 a")
    draws, x = noise.replay(), X0
    for sigma, sigma_next in ((8.0, 2.5), (2.5, 0.7)):
        down, up = split(sigma, sigma_next)
        sigma_mid = math.sqrt(sigma * down)
        x_mid = x + eps(x, sigma) * (sigma_mid - sigma)
        x = x + eps(x_mid, sigma_mid) * (down - sigma) + next(draws) * up
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)


def test_dpmpp_2s_ancestral():
    out, noise = run("DPM++ 2S a")
    draws, x = noise.replay(), X0
    for sigma, sigma_next in ((8.0, 2.5), (2.5, 0.7)):
        down, up = split(sigma, sigma_next)
        sigma_mid = math.sqrt(sigma * down)
        x_mid = sigma_mid / sigma * x + (1 - sigma_mid / sigma) * denoise(x, sigma)
        x = down / sigma * x + (1 - down / sigma) * denoise(x_mid, sigma_mid) + next(draws) * up
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)


def test_dpmpp_sde_noises_both_stages():
    out, noise = run("DPM++ SDE")
    draws, x = noise.replay(), X0
    for sigma, sigma_next in ((8.0, 2.5), (2.5, 0.7)):
        sigma_mid = math.sqrt(sigma * sigma_next)
        down, up = split(sigma, sigma_mid)
        x_mid = down / sigma * x + (1 - down / sigma) * denoise(x, sigma) + next(draws) * up
        down, up = split(sigma, sigma_next)
        x = down / sigma * x + (1 - down / sigma) * denoise(x_mid, sigma_mid) + next(draws) * up
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)
    expected_calls = [(8.0, math.sqrt(8 * 2.5)), (8.0, 2.5), (2.5, math.sqrt(2.5 * 0.7)), (2.5, 0.7)]
    np.testing.assert_allclose(noise.calls, expected_calls, rtol=1e-12)


@pytest.mark.parametrize("name", ["DPM++ 2M SDE", "DPM++ 2M SDE Heun"])
def test_dpmpp_2m_sde(name):
    out, noise = run(name)
    draws, x, previous = noise.replay(), X0, None
    for sigma, sigma_next in ((8.0, 2.5), (2.5, 0.7)):
        h, d = math.log(sigma / sigma_next), denoise(x, sigma)
        fade = 1 - math.exp(-2 * h)  # with eta = 1 the exponent doubles
        x = sigma_next / sigma * math.exp(-h) * x + fade * d
        if previous is not None:
            d_prev, h_prev = previous
            weight = 0.5 * fade if name == "DPM++ 2M SDE" else 1 - fade / (2 * h)
            x = x + weight * (d - d_prev) * h / h_prev
        x = x + next(draws) * sigma_next * math.sqrt(fade)
        previous = d, h
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)
    assert noise.calls == [(8.0, 2.5), (2.5, 0.7)]


def test_dpmpp_3m_sde_over_three_steps():
    sigmas = [8.0, 2.5, 0.7, 0.2]
    out, noise = run("DPM++ 3M SDE", sigmas=torch.tensor(sigmas, dtype=F64))
    draws, x, ds, hs = noise.replay(), X0, [], []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        h, d = math.log(sigma / sigma_next), denoise(x, sigma)
        phi_2 = 1 - (1 - math.exp(-2 * h)) / (2 * h)
        x = math.exp(-2 * h) * x + (1 - math.exp(-2 * h)) * d
        if len(ds) == 1:
            x = x + phi_2 * (d - ds[0]) * h / hs[0]
        elif len(ds) == 2:
            r0, r1 = hs[1] / h, hs[0] / h
            slope_0, slope_1 = (d - ds[1]) / r0, (ds[1] - ds[0]) / r1
            curvature = (slope_0 - slope_1) / (r0 + r1)
            x = x + phi_2 * (slope_0 + curvature * r0) - (phi_2 / (2 * h) - 0.5) * curvature
        x = x + next(draws) * sigma_next * math.sqrt(1 - math.exp(-2 * h))
        ds, hs = [*ds, d][-2:], [*hs, h][-2:]
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)


def test_dpm_fast_spends_its_calls_on_a_second_then_a_first_order_step(float64_times):
    sigmas = torch.tensor([8.0, 2.5, 0.7, 0.0], dtype=F64)  # three calls: orders 2 and 1
    out, _ = run("DPM fast", sigmas=sigmas, eta=0.0)
    sigma_mid = math.sqrt(8.0 * 0.7)  # the grid is even in log sigma from 8 to the smallest non-zero sigma
    x_half = X0 - (8.0 - math.sqrt(8.0 * sigma_mid)) * eps(X0, 8.0)
    x = X0 - (8.0 - sigma_mid) * eps(x_half, math.sqrt(8.0 * sigma_mid))  # DPM-Solver-2 is the midpoint rule
    x = x - (sigma_mid - 0.7) * eps(x, sigma_mid)  # DPM-Solver-1 is an Euler step
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)


def test_dpm_fast_ancestral_third_order_step(float64_times):
    sigmas = torch.tensor([8.0, 2.5, 1.2, 0.7, 0.0], dtype=F64)  # four calls: orders 3 and 1
    out, noise = run("DPM fast", sigmas=sigmas)  # A1111 runs it with eta 1
    sigma_b = math.sqrt(8.0 * 0.7)
    down, _ = split(8.0, sigma_b)
    target = max(down, 0.7)  # never below sigma_min
    h = math.log(8.0 / target)
    e = eps(X0, 8.0)
    sigma_1, sigma_2 = 8.0 * math.exp(-h / 3), 8.0 * math.exp(-2 * h / 3)
    e1 = eps(X0 - (8.0 - sigma_1) * e, sigma_1)
    u2 = X0 - (8.0 - sigma_2) * e - sigma_2 * 2 * (math.expm1(2 * h / 3) / (2 * h / 3) - 1) * (e1 - e)
    e2 = eps(u2, sigma_2)
    x = X0 - (8.0 - target) * e - target * 1.5 * (math.expm1(h) / h - 1) * (e2 - e)
    draws = noise.replay()
    x = x + math.sqrt(sigma_b**2 - target**2) * next(draws)
    x = x - (sigma_b - 0.7) * eps(x, sigma_b)  # the closing Euler step: its sigma_up is 0
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-6)
    np.testing.assert_allclose(noise.calls, [(8.0, sigma_b), (sigma_b, 0.7)], rtol=1e-12)


def test_dpm_adaptive_first_attempt_and_final_accuracy(float64_times):
    sigmas = torch.tensor([8.0, 4.0, 1.0, 0.3, 0.03, 0.0], dtype=F64)
    seen = []
    out = sample("DPM adaptive", gaussian_model, X0.clone(), sigmas, callback=seen.append, eta=0.0)
    # 1. The first attempt: h = 0.05 in log sigma, DPM-Solver-2 (r1 = 1/3) against DPM-Solver-3.
    h = 0.05
    sigma_t, sigma_1, sigma_2 = 8.0 * math.exp(-h), 8.0 * math.exp(-h / 3), 8.0 * math.exp(-2 * h / 3)
    e = eps(X0, 8.0)
    e1 = eps(X0 - (8.0 - sigma_1) * e, sigma_1)
    x_low = X0 - (8.0 - sigma_t) * e - sigma_t * 1.5 * math.expm1(h) * (e1 - e)
    u2 = X0 - (8.0 - sigma_2) * e - sigma_2 * 2 * (math.expm1(2 * h / 3) / (2 * h / 3) - 1) * (e1 - e)
    x_high = X0 - (8.0 - sigma_t) * e - sigma_t * 1.5 * (math.expm1(h) / h - 1) * (eps(u2, sigma_2) - e)
    scale = torch.maximum(torch.tensor(0.0078), 0.05 * torch.maximum(x_low.abs(), X0.abs()))
    error = float(torch.linalg.norm((x_low - x_high) / scale)) / math.sqrt(X0.numel())
    assert 1 + math.atan((1 / (error + 1e-8)) ** (1 / 3) - 1) >= 0.81  # accepted
    torch.testing.assert_close(seen[0]["x"], x_high, rtol=1e-12, atol=1e-6)
    assert float(seen[0]["sigma"]) == pytest.approx(sigma_t, rel=1e-12)
    # 2. It adapts its way to sigma_min, within its tolerance (5% of x) of the exact solution there;
    #    tighter tolerances cost more steps and buy accuracy.
    exact = MU + math.sqrt((S2 + 0.03**2) / (S2 + 64.0)) * (X0 - MU)
    assert len(seen) > 5 and float(seen[-1]["sigma"]) == pytest.approx(0.03, rel=1e-6)
    assert float((out - exact).abs().max()) < 0.05 * float(exact.abs().max())
    tight = []
    out = sample("DPM adaptive", gaussian_model, X0.clone(), sigmas, callback=tight.append, eta=0.0,
                 rtol=1e-5, atol=1e-6)
    assert len(tight) > 2 * len(seen) and float((out - exact).abs().max()) < 1e-4


# -- eta = 0 and noise ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stochastic, deterministic", [("Euler a", "Euler"), ("DPM2 a", "DPM2"),
                                                       ("DPM++ 2M SDE", "DPM++ 2M"), ("DPM++ SDE", "DPM++ 2S a")])
def test_eta_zero_is_the_deterministic_counterpart(stochastic, deterministic):
    sigmas = karras(9)
    x = X0 * sigmas[0]
    options = {"eta": 0.0} if "eta" in K_SAMPLERS[deterministic].defaults else {}
    expected = sample(deterministic, gaussian_model, x, sigmas, **options)
    noisy = FixedNoise()
    torch.testing.assert_close(sample(stochastic, gaussian_model, x, sigmas, noise_sampler=noisy, eta=0.0),
                               expected, rtol=1e-12, atol=1e-9)
    assert not torch.equal(sample(stochastic, gaussian_model, x, sigmas, noise_sampler=FixedNoise()), expected)


@pytest.mark.parametrize("name", ["DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_multistep_sde_samplers_draw_no_noise_at_eta_zero(name):
    noise = FixedNoise()
    sample(name, gaussian_model, X0 * 10, karras(6), noise_sampler=noise, eta=0.0)
    assert noise.calls == []


# -- Restart --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, restarts, restart_steps", [(10, 0, 0), (19, 0, 0), (20, 1, 9), (35, 1, 9),
                                                            (36, 2, 9), (40, 2, 10)])
def test_restart_plan_keeps_a1111s_step_count(steps, restarts, restart_steps):
    sigmas = karras(steps)
    plan = [(float(a), float(b)) for a, b in k_samplers.restart_plan(sigmas)]
    assert len(plan) == steps
    jumps = [i for i in range(1, len(plan)) if plan[i][0] > plan[i - 1][1]]
    assert len(jumps) == restarts
    if not restarts:
        assert plan == [(float(a), float(b)) for a, b in zip(sigmas[:-1], sigmas[1:])]
        return
    main = karras(steps - restarts * restart_steps, float(sigmas[-2]), float(sigmas[0]))
    low = float(main[torch.argmin((main - 0.1).abs())])
    high = float(main[torch.argmin((main - 2.0).abs())])
    for jump in jumps:
        assert plan[jump - 1][1] == pytest.approx(low) and plan[jump][0] == pytest.approx(high)
        assert plan[jump + restart_steps - 1][1] == pytest.approx(low)


def test_restart_lifts_x_with_fresh_noise_at_each_restart():
    sigmas = karras(20)
    noise, seen = FixedNoise(), []
    x_start = X0 * sigmas[0]
    sample("Restart", constant_model, x_start, sigmas, noise_sampler=noise, callback=seen.append)
    (low, high), = noise.calls
    assert low == pytest.approx(0.1, abs=0.05) and high == pytest.approx(2.0, abs=0.5)
    jump = next(i for i in range(1, len(seen)) if seen[i]["sigma_hat"] > seen[i - 1]["sigma"])
    assert float(seen[jump]["sigma_hat"]) == high
    expected = MU + low / float(sigmas[0]) * (x_start - MU) + noise.drawn[0] * math.sqrt(high**2 - low**2)
    torch.testing.assert_close(seen[jump]["x"], expected, rtol=0, atol=1e-6)  # Restart's own float32 schedule


# -- matches k-diffusion itself ------------------------------------------------------------------------------

# Values from k-diffusion's own samplers (A1111's sd_samplers_extra for Restart) on this toy, float32 on the
# CPU, with A1111's options and noise drawn from one seeded generator (Brownian tree seed 3 for the SDE ones).
K_DIFFUSION = {
    "Euler": [-0.122147, 0.393920, -0.873850, -0.357784],
    "Euler a": [0.791871, 0.238158, -0.553864, -0.436224],
    "Heun": [-0.347897, 0.355428, -0.828076, -0.124751],
    "DPM2": [-0.315195, 0.361004, -0.834707, -0.158509],
    "DPM2 a": [1.142866, 0.124536, -0.169896, 0.065243],
    "LMS": [-0.207191, 0.379419, -0.856606, -0.269996],
    "DPM++ 2S a": [0.914720, 0.196564, -0.421565, -0.261554],
    "DPM++ 2M": [-0.319162, 0.360327, -0.833903, -0.154413],
    "DPM++ SDE": [0.765585, -0.777320, -1.123648, -0.741816],
    "DPM++ 2M SDE": [0.638912, -0.913344, -1.283042, -0.538385],
    "DPM++ 2M SDE Heun": [0.631708, -1.184491, -1.349437, -0.449352],
    "DPM++ 3M SDE": [0.640452, -1.602349, -1.231021, -0.276219],
    "DPM fast": [0.340702, 0.698535, -1.237229, -0.694088],
    "DPM adaptive": [0.397701, -0.271463, 0.077866, -0.207785],
    "Restart": [0.426116, 0.570990, -1.494780, -1.064127],  # 20 steps, so that it restarts
}


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde: DPM++ SDE asks just past sigma_max
@pytest.mark.parametrize("name", K_DIFFUSION)
def test_matches_k_diffusion_values(name):
    mu = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)

    def model(x, sigma):
        variance = sigma.view(-1, 1, 1, 1) ** 2
        return (x * S2 + mu * variance) / (S2 + variance)

    sigmas = k_samplers.karras_sigmas(20 if name == "Restart" else 8, 0.03, 10.0)
    x = torch.linspace(-1.5, 1.5, 8).view(1, 2, 2, 2) * sigmas[0]
    generator = torch.Generator().manual_seed(42)
    noise = lambda sigma, sigma_next: torch.randn(x.shape, generator=generator)  # noqa: E731
    if K_SAMPLERS[name].brownian_noise:
        noise = BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seeds=[3])
    out = sample(name, model, x, sigmas, noise_sampler=noise)
    torch.testing.assert_close(out.flatten()[[0, 3, 4, 7]], torch.tensor(K_DIFFUSION[name]), rtol=0, atol=2e-6)


# -- the Brownian tree ---------------------------------------------------------------------------------------


def test_brownian_tree_is_deterministic_per_seed_and_independent_per_image():
    x = torch.zeros(3, 4, 5, 5)
    batch = BrownianTreeNoiseSampler(x, 0.03, 10.0, seeds=[11, 22, 33])
    again = BrownianTreeNoiseSampler(x, 0.03, 10.0, seeds=[11, 22, 33])
    alone = BrownianTreeNoiseSampler(x[:1], 0.03, 10.0, seeds=[22])
    other = BrownianTreeNoiseSampler(x, 0.03, 10.0, seeds=[11, 99, 33])
    for sigma, sigma_next in ((10.0, 6.0), (6.0, 2.0), (2.0, 0.5)):
        noise = batch(sigma, sigma_next)
        assert noise.shape == x.shape
        assert torch.equal(noise, again(sigma, sigma_next))
        assert torch.equal(noise[1:2], alone(sigma, sigma_next))
        assert torch.equal(noise[[0, 2]], other(sigma, sigma_next)[[0, 2]])
        assert not torch.allclose(noise[1], other(sigma, sigma_next)[1])


def test_brownian_tree_increments_have_the_variance_of_their_interval():
    x = torch.zeros(1, 20000, dtype=F64)
    tree = BrownianTreeNoiseSampler(x, 0.1, 10.0, seeds=[5])

    def increment(a, b):  # W(b) - W(a), undoing the sampler's normalisation
        return tree(a, b) * math.sqrt(abs(b - a))

    for a, b in ((10.0, 6.0), (6.0, 5.5), (2.0, 0.1)):
        assert float(increment(a, b).var()) == pytest.approx(abs(b - a), rel=0.05)
        assert float(tree(a, b).var()) == pytest.approx(1.0, rel=0.05)
    torch.testing.assert_close(increment(10.0, 2.0), increment(10.0, 6.0) + increment(6.0, 2.0))
    torch.testing.assert_close(tree(2.0, 6.0), -tree(6.0, 2.0))
    disjoint = torch.corrcoef(torch.cat([increment(10.0, 6.0), increment(6.0, 2.0)]))[0, 1]
    assert abs(float(disjoint)) < 0.05


def test_brownian_tree_uses_the_injected_normal_source_and_restores_torchsdes():
    x = torch.zeros(2, 3, 4)
    original = brownian_interval._randn
    cpu = lambda seed, shape: torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    shifted = lambda seed, shape: cpu(seed + 1, shape)  # noqa: E731
    default = BrownianTreeNoiseSampler(x, 0.1, 5.0, seeds=[1, 2])(5.0, 1.0)
    assert torch.equal(BrownianTreeNoiseSampler(x, 0.1, 5.0, seeds=[1, 2], randn=cpu)(5.0, 1.0), default)
    assert not torch.allclose(BrownianTreeNoiseSampler(x, 0.1, 5.0, seeds=[1, 2], randn=shifted)(5.0, 1.0), default)
    assert brownian_interval._randn is original


def test_brownian_tree_wants_one_seed_per_image():
    with pytest.raises(ValueError, match="one seed per image: got 2 seeds for a batch of 3"):
        BrownianTreeNoiseSampler(torch.zeros(3, 2), 0.1, 1.0, seeds=[1, 2])


# -- the entry point -------------------------------------------------------------------------------------------


def test_a1111_defaults():
    assert set(K_SAMPLERS) == {"Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2S a", "DPM++ 2M",
                               "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM fast",
                               "DPM adaptive", "Restart", "LCM"}
    for name in ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "DPM fast",
                 "DPM adaptive"):
        assert K_SAMPLERS[name].defaults["eta"] == 1.0 and K_SAMPLERS[name].defaults["s_noise"] == 1.0
    assert K_SAMPLERS["Euler"].defaults == {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
    adaptive = K_SAMPLERS["DPM adaptive"].defaults
    assert (adaptive["order"], adaptive["rtol"], adaptive["atol"], adaptive["h_init"]) == (3, 0.05, 0.0078, 0.05)
    assert K_SAMPLERS["DPM++ 2M SDE Heun"].defaults["solver_type"] == "heun"
    assert [n for n, s in K_SAMPLERS.items() if s.brownian_noise] == ["DPM++ SDE", "DPM++ 2M SDE",
                                                                       "DPM++ 2M SDE Heun", "DPM++ 3M SDE"]
    assert [*K_SAMPLERS] == [n for n in samplers.SAMPLER_NAMES if not k_sampling.uses_timesteps(n)]  # one list of names
    assert {n for n, s in K_SAMPLERS.items() if s.discard_penultimate_sigma} == {"DPM2", "DPM2 a", "DPM++ 3M SDE"}


def test_names_aliases_and_options_are_checked():
    assert k_samplers.find_k_sampler("k_euler_a").name == "Euler a"
    assert k_samplers.find_k_sampler("dpm++ 2m").name == "DPM++ 2M"
    with pytest.raises(InputError, match="unknown k-diffusion sampler 'DDIM'; available: DPM\\+\\+ 2M, "):
        sample("DDIM", constant_model, X0, SIGMAS)
    with pytest.raises(InputError, match="'Euler' has no option eta; its options: s_churn, s_tmin"):
        sample("Euler", constant_model, X0, SIGMAS, eta=0.5)


def test_stop_sampling_returns_the_latest_estimate_and_calls_the_model_no_more():
    calls, seen = [], []

    def model(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_model(x, sigma)

    def callback(info):
        seen.append(info)
        assert set(info) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        if info["i"] == 2:
            raise StopSampling

    out = sample("DPM++ 2M", model, X0 * 10, karras(8), callback=callback)
    assert len(calls) == 3 and [info["i"] for info in seen] == [0, 1, 2]
    assert torch.equal(out, seen[-1]["denoised"])

    def interrupted(x, sigma):
        raise StopSampling

    assert torch.equal(sample("Euler", interrupted, X0, karras(8)), X0)  # nothing denoised yet: x as given
