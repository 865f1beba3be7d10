"""backend.unipc against UniPC's equations written out a second time here (one plain loop, numpy float64
for the solver, the noise schedule in float32 as A1111 keeps it), the model times and call counts A1111
makes, a Gaussian toy whose probability-flow ODE has a closed form, and a zero-terminal-SNR table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend import schedules, unipc
from backend.errors import InputError

ALPHAS = schedules.scaled_linear_alphas_cumprod()
ZTSNR = schedules.zero_terminal_snr(ALPHAS)
WEIGHTS = np.random.default_rng(0).normal(size=(4, 4)) * 0.4
START = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1))


def toy_eps(x: np.ndarray, t_input: float) -> np.ndarray:
    """A smooth nonlinear noise prediction, mostly x (as a denoiser's is near pure noise) plus tanh of a fixed
    channel mix scaled by the timestep, so that x stays of order 1."""
    return 0.8 * x + 0.3 * np.tanh(np.einsum("ij,bjhw->bihw", WEIGHTS, x) * (0.5 + t_input / 1000))


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    assert torch.all(t == t[0]), "every image of the batch is at the same time"
    return torch.from_numpy(toy_eps(x.double().numpy(), float(t[0]))).to(x.dtype)


# --- the reference -----------------------------------------------------------------------------------------


class RefSchedule:
    """log alpha_t = 0.5 log(alphas_cumprod), linear in t between t_n = (n + 1) / N; float32 like A1111."""

    def __init__(self, alphas_cumprod):
        self.log_alphas = (0.5 * np.log(np.asarray(alphas_cumprod, dtype=np.float32))).astype(np.float32)
        self.n = len(self.log_alphas)
        self.knots = (np.arange(1, self.n + 1) / self.n).astype(np.float32)

    def log_alpha(self, t):
        t = np.float32(t)
        k = int(np.clip(np.searchsorted(self.knots, t, side="right") - 1, 0, self.n - 2))
        slope = (self.log_alphas[k + 1] - self.log_alphas[k]) / (self.knots[k + 1] - self.knots[k])
        return np.float32(self.log_alphas[k] + (t - self.knots[k]) * slope)

    def alpha_sigma_lambda(self, t):
        la = self.log_alpha(t)
        one_minus = np.float32(1) - np.exp(np.float32(2) * la)
        return float(np.exp(la)), float(np.sqrt(one_minus)), float(la - np.float32(0.5) * np.log(one_minus))

    def t_of_lambda(self, lam):
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)
        return np.interp(log_alpha, self.log_alphas[::-1], self.knots[::-1])

    def times(self, skip_type, steps, t_start=None):
        top, end = (1.0 if t_start is None else t_start), 1.0 / self.n
        if skip_type == "time_uniform":
            return top + (end - top) * np.arange(steps + 1) / steps
        if skip_type == "time_quadratic":
            return (math.sqrt(top) + (math.sqrt(end) - math.sqrt(top)) * np.arange(steps + 1) / steps) ** 2
        lam_top, lam_end = self.alpha_sigma_lambda(top)[2], self.alpha_sigma_lambda(end)[2]
        return self.t_of_lambda(lam_top + (lam_end - lam_top) * np.arange(steps + 1) / steps)


def h_phi(z: float, k: int) -> float:
    """z * phi_k(z), phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z, in closed form."""
    return (math.expm1(z) - sum(z**j / math.factorial(j) for j in range(1, k))) / z ** (k - 1)


def reference_unipc(x, alphas_cumprod, steps, variant="bh1", skip_type="time_uniform", order=3,
                    lower_order_final=True, t_start=None, eps=toy_eps):
    """UniPC multistep, data prediction, float64: predictor UniP-p and corrector UniC-p over the last p
    x0 predictions; warm-up at orders 1, 2, ...; no corrector on the last step; the corrector's model
    value (taken at the predicted x) is reused by the next steps."""
    ns = RefSchedule(alphas_cumprod)
    ts = ns.times(skip_type, steps, t_start)
    order = min(order, steps)
    x = x.double().numpy()
    alpha, sigma, lam = ns.alpha_sigma_lambda(ts[0])
    lams, x0s = [lam], [(x - sigma * eps(x, (ts[0] - 1 / ns.n) * 1000)) / alpha]
    for i in range(1, steps + 1):
        p = i if i < order else (min(order, steps + 1 - i) if lower_order_final else order)
        alpha_t, sigma_t, lam_t = ns.alpha_sigma_lambda(ts[i])
        sigma_s = ns.alpha_sigma_lambda(ts[i - 1])[1]
        h = lam_t - lams[-1]
        z = -h
        r = [(lams[-1 - k] - lams[-1]) / h for k in range(1, p)]
        d = [(x0s[-1 - k] - x0s[-1]) / r[k - 1] for k in range(1, p)]
        base = sigma_t / sigma_s * x - alpha_t * math.expm1(z) * x0s[-1]
        if variant == "vary_coeff":
            predicted, correct = vary_coeff_terms(base, d, r, z, alpha_t)
        else:
            predicted, correct = bh_terms(base, d, r, z, alpha_t, p, variant)
        if i == steps:
            return predicted
        x0_t = (predicted - sigma_t * eps(predicted, (ts[i] - 1 / ns.n) * 1000)) / alpha_t
        x = correct(x0_t - x0s[-1])
        lams, x0s = [*lams, lam_t][-order:], [*x0s, x0_t][-order:]
    raise AssertionError("unreachable")


def bh_terms(base, d, r, z, alpha_t, p, variant):
    """UniP / UniC with z = -h, B = z (bh1) or e^z - 1 (bh2): weights a solve
    sum_m a_m r_m^(k-1) = k! z phi_{k+1}(z) / B, k = 1 .. p - 1 for the predictor (a = 1/2 at p = 2),
    k = 1 .. p with r_p = 1 for the corrector (1/2 at p = 1)."""
    b_h = z if variant == "bh1" else math.expm1(z)
    g = np.array([math.factorial(k) * h_phi(z, k + 1) / b_h for k in range(1, p + 1)])
    rs = np.array([*r, 1.0])
    vandermonde = np.array([rs**k for k in range(p)])
    a = [0.5] if p == 2 else np.linalg.solve(vandermonde[:-1, :-1], g[:-1]) if p > 2 else []
    c = [0.5] if p == 1 else np.linalg.solve(vandermonde, g)
    predicted = base - alpha_t * b_h * sum((a_m * d_m for a_m, d_m in zip(a, d)), np.zeros_like(base))
    def correct(d_t):
        return base - alpha_t * b_h * (sum((c_m * d_m for c_m, d_m in zip(c, d)), np.zeros_like(base)) + c[-1] * d_t)
    return predicted, correct


def vary_coeff_terms(base, d, r, z, alpha_t):
    """UniPC-v: C[j][k] = r_j^k / (k+1)!; the predictor's k-th term h phi_{k+2} (C_p^-1 D)_k, the corrector's the
    same with C^-1, the new value weighted by row K-2 of C^-1 and h phi_{K+1} (as A1111's code does)."""
    rs = np.array([*r, 1.0])
    n = len(rs)
    C = np.array([[rs[j] ** k / math.factorial(k + 1) for k in range(n)] for j in range(n)])
    predicted = base.copy()
    if d:
        a = np.linalg.inv(C[:-1, :-1])
        for k in range(n - 1):
            predicted -= alpha_t * h_phi(z, k + 2) * sum(a[k][m] * d[m] for m in range(n - 1))
    c = np.linalg.inv(C)
    def correct(d_t):
        x = base.copy()
        for k in range(n - 1):
            x -= alpha_t * h_phi(z, k + 2) * sum(c[k][m] * d[m] for m in range(n - 1))
        return x - alpha_t * h_phi(z, n + 1) * c[max(n - 2, 0)][-1] * d_t
    return predicted, correct


# --- against the reference --------------------------------------------------------------------------------

CASES = [  # (steps, variant, skip_type, order, lower_order_final)
    *[(steps, "bh1", "time_uniform", 3, True) for steps in (1, 2, 3, 5, 10, 20)],
    *[(steps, "bh2", "time_uniform", 3, True) for steps in (1, 2, 3, 5, 10, 20)],
    *[(steps, "bh1", skip, 3, True) for steps in (3, 10, 20) for skip in ("time_quadratic", "logSNR")],
    *[(10, variant, "time_uniform", order, False) for variant in ("bh1", "bh2") for order in (1, 2, 3)],
    (20, "bh2", "logSNR", 2, True), (20, "bh1", "time_uniform", 4, True), (5, "bh1", "time_uniform", 5, True),
]


@pytest.mark.parametrize(("steps", "variant", "skip_type", "order", "lower_order_final"), CASES)
def test_matches_reference(steps, variant, skip_type, order, lower_order_final):
    got = unipc.sample_unipc(toy_model, START.clone(), ALPHAS, steps, variant=variant, skip_type=skip_type,
                             order=order, lower_order_final=lower_order_final)
    want = reference_unipc(START, ALPHAS, steps, variant, skip_type, order, lower_order_final)
    assert got.dtype == torch.float32
    assert np.abs(got.double().numpy() - want).max() < 1e-5


@pytest.mark.parametrize(("steps", "order"), [(1, 1), (2, 2), (3, 3), (10, 3), (20, 3), (20, 2)])
@pytest.mark.parametrize("skip_type", unipc.SKIP_TYPES)
def test_vary_coeff_matches_reference_at_batch_size_one(steps, order, skip_type):
    x = START[:1].clone()
    got = unipc.sample_unipc(toy_model, x, ALPHAS, steps, variant="vary_coeff", skip_type=skip_type, order=order)
    want = reference_unipc(x, ALPHAS, steps, "vary_coeff", skip_type, order)
    assert np.abs(got.double().numpy() - want).max() < 1e-5


@pytest.mark.parametrize(("steps", "kept", "skip_type"), [(20, 12, "time_uniform"), (20, 3, "time_uniform"),
                                                          (30, 20, "time_quadratic"), (10, 5, "logSNR")])
def test_img2img_matches_reference(steps, kept, skip_type):
    timesteps = schedules.compvis_timesteps(steps)[:kept]
    t_start = unipc.img2img_t_start(timesteps)
    got = unipc.sample_unipc(toy_model, START.clone(), ALPHAS, kept, t_start=t_start, skip_type=skip_type)
    want = reference_unipc(START, ALPHAS, kept, skip_type=skip_type, t_start=t_start)
    assert np.abs(got.double().numpy() - want).max() < 1e-5


@pytest.mark.parametrize("last", [4, 551, 951])
def test_img2img_t_start_is_computed_in_float32(last):
    # A1111 divides an int64 tensor: float32 all the way; for 4 (and 269 other timesteps) the float64 sum
    # rounded to float32 is one ulp away
    in_float32 = float(np.float32(np.float32(last) / np.float32(1000)) + np.float32(0.001))
    assert unipc.img2img_t_start(torch.tensor([1, last])) == in_float32
    assert in_float32 == pytest.approx((last + 1) / 1000, abs=1e-7)
    if last == 4:
        assert in_float32 != float(np.float32(last / 1000 + 1 / 1000))


def test_img2img_starts_at_the_last_kept_timestep():
    timesteps = schedules.compvis_timesteps(20)[:12]  # 1, 51, ..., 551; the init image is noised to 601
    calls = []
    unipc.sample_unipc(lambda x, t: calls.append(float(t[0])) or 0.1 * x, START.clone(), ALPHAS, 12,
                       t_start=unipc.img2img_t_start(timesteps))
    assert calls[0] == pytest.approx(551.0, abs=1e-4) and len(calls) == 12


# --- model times, call counts, callbacks ------------------------------------------------------------------


def recording_model(calls):
    def model(x, t):
        calls.append(t.clone())
        return 0.1 * x
    return model


def test_model_times_for_20_uniform_steps():
    calls = []
    unipc.sample_unipc(recording_model(calls), START.clone(), ALPHAS, 20)
    times = torch.stack(calls)
    assert times.shape == (20, 2) and times.dtype == torch.float32
    assert torch.equal(times[:, 0], times[:, 1])
    # t_i = 1 - i * 0.999 / 20, the model's input (t_i - 1/1000) * 1000 = 999 - 49.95 i; t = 1/1000 is never evaluated
    assert times[0, 0].item() == 999.0
    assert times[1, 0].item() == pytest.approx(949.05, abs=1e-4)
    assert times[2, 0].item() == pytest.approx(899.1, abs=1e-4)
    assert times[10, 0].item() == pytest.approx(499.5, abs=1e-4)
    assert times[19, 0].item() == pytest.approx(49.95, abs=1e-4)
    linspace = torch.linspace(1.0, 0.001, 21)[:20]
    assert torch.equal(times[:, 0], (linspace - 0.001) * 1000)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 20])
@pytest.mark.parametrize(("order", "variant"), [(1, "bh1"), (2, "bh2"), (3, "bh1"), (3, "vary_coeff")])
def test_one_model_call_and_one_callback_per_step(steps, order, variant):
    calls, seen = [], []
    x = START[:1].clone()
    out = unipc.sample_unipc(recording_model(calls), x, ALPHAS, steps, order=order, variant=variant,
                             callback=seen.append)
    assert len(calls) == steps
    assert [info["i"] for info in seen] == list(range(steps))
    assert seen[-1]["x"] is out and seen[-1]["denoised"] is None  # A1111: no corrector, so no x0, at the end
    assert all(info["denoised"].shape == x.shape for info in seen[:-1])
    assert [info["t"] for info in seen] == pytest.approx([float(t[0]) for t in calls[1:]] + [0.0], abs=1e-4)


def test_a_callback_exception_stops_sampling():
    calls = []

    def stop_at_third(info):
        if info["i"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unipc.sample_unipc(recording_model(calls), START.clone(), ALPHAS, 20, callback=stop_at_third)
    assert len(calls) == 4  # the start's, then one per update (its corrector's) before the callback


def test_bad_options_name_the_choices():
    with pytest.raises(InputError, match="bh1, bh2, vary_coeff"):
        unipc.sample_unipc(toy_model, START.clone(), ALPHAS, 5, variant="bh3")
    with pytest.raises(InputError, match="time_uniform, time_quadratic, logSNR"):
        unipc.sample_unipc(toy_model, START.clone(), ALPHAS, 5, skip_type="karras")
    with pytest.raises(InputError, match="at least one step"):
        unipc.sample_unipc(toy_model, START.clone(), ALPHAS, 0)


# --- a Gaussian toy with a closed-form ODE solution -------------------------------------------------------

MU, S = 0.6, 1.0  # data ~ N(MU, S^2 I)


def gaussian_eps(alphas_cumprod):
    """The exact noise prediction of N(MU, S^2) data noised to x_t = alpha_t x_0 + sigma_t eps, with alpha_t
    from the same interpolated schedule (float64): eps = sigma_t (x - alpha_t MU) / (alpha_t^2 S^2 + sigma_t^2)."""
    ns = RefSchedule(alphas_cumprod)

    def eps(x, t_input):
        log_alpha = np.interp(t_input / 1000 + 1 / ns.n, ns.knots.astype(np.float64), ns.log_alphas.astype(np.float64))
        alpha2 = math.exp(2 * log_alpha)
        return math.sqrt(1 - alpha2) * (x - math.sqrt(alpha2) * MU) / (alpha2 * S**2 + 1 - alpha2)
    return ns, eps


def ode_solution(ns, x_start, t_start, t_end):
    """The probability-flow ODE keeps (x - alpha_t MU) / sqrt(alpha_t^2 S^2 + sigma_t^2) constant."""
    def spread(t):
        alpha2 = math.exp(2 * float(np.interp(t, ns.knots, ns.log_alphas)))
        return math.sqrt(alpha2), math.sqrt(alpha2 * S**2 + 1 - alpha2)
    (a0, s0), (a1, s1) = spread(t_start), spread(t_end)
    return a1 * MU + s1 * (x_start - a0 * MU) / s0


def ddim(eps, ns, x, times):
    for t, t_next in zip(times[:-1], times[1:]):
        alpha, sigma, _ = ns.alpha_sigma_lambda(t)
        alpha_next, sigma_next, _ = ns.alpha_sigma_lambda(t_next)
        e = eps(x, (t - 1 / ns.n) * 1000)
        x = alpha_next * (x - sigma * e) / alpha + sigma_next * e
    return x


# Measured on the CPU with 20 steps, max abs error (values up to 4.9):
#   table, skip type         UniPC final  DDIM final   UniPC before its last step  DDIM there
#   SD, time_uniform         6.2e-2       2.9e-1       4.0e-3                      2.1e-1
#   SD, logSNR               2.2e-4       3.3e-1       5.3e-5                      3.3e-1
#   zero terminal SNR, time_uniform  6.2e-2  3.1e-1    9.2e-3                      2.2e-1
# time_uniform's last step (t 0.051 -> 0.001, a long way in log SNR) is first order without corrector in
# A1111 (lower_order_final), so it dominates the final error; before it the order-3 steps are 20-50x closer.
GAUSSIAN_CASES = [  # (table, skip type, bound on UniPC's final error, on its error before the last step)
    (ALPHAS, "time_uniform", 0.07, 5e-3), (ALPHAS, "logSNR", 3e-4, 1e-4), (ZTSNR, "time_uniform", 0.07, 1e-2)]


@pytest.mark.parametrize(("alphas_cumprod", "skip_type", "final_bound", "before_last_bound"), GAUSSIAN_CASES)
def test_gaussian_data_lands_near_the_ode_solution(alphas_cumprod, skip_type, final_bound, before_last_bound):
    ns, eps = gaussian_eps(alphas_cumprod)
    x = START.double().numpy() * 1.3
    times = ns.times(skip_type, 20)
    seen = []

    def model(x, t):
        return torch.from_numpy(eps(x.double().numpy(), float(t[0]))).to(x.dtype)

    got = unipc.sample_unipc(model, torch.from_numpy(x).float(), alphas_cumprod, 20, skip_type=skip_type,
                             callback=lambda info: seen.append(info["x"].double().numpy().copy()))
    errors = {}
    for name, reached, end in (("final", got.double().numpy(), 20), ("before last", seen[18], 19)):
        exact = ode_solution(ns, x, times[0], times[end])
        errors[name] = np.abs(reached - exact).max(), np.abs(ddim(eps, ns, x, times[: end + 1]) - exact).max()
    assert np.isfinite(got).all()
    assert errors["final"][0] < final_bound and errors["before last"][0] < before_last_bound
    assert errors["final"][1] > 4 * errors["final"][0]
    assert errors["before last"][1] > 20 * errors["before last"][0]


# --- zero terminal SNR ----------------------------------------------------------------------------------


def test_zero_terminal_snr_table_is_the_one_this_test_means():
    assert ZTSNR[-1].item() == pytest.approx(schedules.ZTSNR_LAST_ALPHA_CUMPROD, rel=1e-6)
    assert ZTSNR.dtype == torch.float32


@pytest.mark.parametrize(("variant", "skip_type"), [("bh1", "time_uniform"), ("bh2", "time_quadratic"),
                                                    ("bh1", "logSNR"), ("vary_coeff", "time_uniform")])
def test_zero_terminal_snr_runs_without_nan(variant, skip_type):
    x = START[:1].clone() if variant == "vary_coeff" else START.clone()
    seen = []
    got = unipc.sample_unipc(toy_model, x, ZTSNR, 20, variant=variant, skip_type=skip_type, callback=seen.append)
    assert torch.isfinite(got).all()
    assert all(torch.isfinite(info["denoised"]).all() for info in seen[:-1])
    want = reference_unipc(x, ZTSNR, 20, variant, skip_type)
    # measured up to 6.3e-5: at t = 1, alpha = 2.2e-4 and x0 = (x - sigma eps) / alpha loses float32 digits
    assert np.abs(got.double().numpy() - want).max() < 1e-4
