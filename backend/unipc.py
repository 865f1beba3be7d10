"""A1111's UniPC sampler, computing what A1111 v1.10 computes (`sd_samplers_timesteps_impl.unipc` on
`models/diffusion/uni_pc`): UniPC multistep with a data-prediction model over a discrete VP noise schedule,
its time steps, lower-order warm-up and final steps, and its callbacks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from backend.errors import InputError

VARIANTS = ("bh1", "bh2", "vary_coeff")
SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")


def _interpolate(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise linear through (xp, yp), xp ascending, the end segments extended past the ends, in A1111's
    arithmetic (`interpolate_fn`). At an exact knot A1111's unstable sort picks either adjoining segment
    (they agree to float32 rounding); this takes the one starting at the knot."""
    start = (torch.searchsorted(xp, x.contiguous(), right=True) - 1).clamp(0, len(xp) - 2)
    x0, y0 = xp[start], yp[start]
    return y0 + (x - x0) * (yp[start + 1] - y0) / (xp[start + 1] - x0)


class DiscreteSchedule:
    """The noise schedule of a model trained on N discrete timesteps, in continuous time: timestep n is
    t = (n + 1) / N, and log alpha_t (alpha_t = sqrt(alphas_cumprod)) is linear in t between timesteps.
    Everything is float32, as in A1111's NoiseScheduleVP('discrete') fed the model's float32 table."""

    def __init__(self, alphas_cumprod: torch.Tensor, device: torch.device | str):
        table = torch.as_tensor(alphas_cumprod).to(device=device, dtype=torch.float32)
        self.total_n = len(table)
        self.log_alphas = 0.5 * torch.log(table)
        self.times = torch.linspace(0.0, 1.0, self.total_n + 1)[1:].to(device)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return _interpolate(t, self.times, self.log_alphas)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def half_log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t = log(alpha_t / sigma_t)."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

    def time_of_half_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """The inverse of `half_log_snr`: t linear in log alpha between timesteps."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros(1, device=lam.device), -2.0 * lam)
        return _interpolate(log_alpha, self.log_alphas.flip(0), self.times.flip(0))

    def model_input_time(self, t: torch.Tensor) -> torch.Tensor:
        """The fractional timestep the UNet sees: (t - 1/N) x 1000, so t = 1 is 999.0."""
        return (t - 1.0 / self.total_n) * 1000.0


def time_steps(schedule: DiscreteSchedule, skip_type: str, steps: int, t_start: torch.Tensor | None = None):
    """The steps + 1 times UniPC visits (float32), from `t_start` (1 when None) down to 1/N.

    A1111's img2img `t_start` is a float32 tensor, so time_quadratic takes its square root in float32."""
    t_end = 1.0 / schedule.total_n
    top = 1.0 if t_start is None else t_start
    device = schedule.times.device
    if skip_type == "time_uniform":
        return torch.linspace(float(top), t_end, steps + 1).to(device)
    if skip_type == "time_quadratic":
        return torch.linspace(float(top**0.5), t_end**0.5, steps + 1).pow(2).to(device)
    ends = [schedule.half_log_snr(torch.tensor(float(t)).reshape(1).to(device)).item() for t in (top, t_end)]
    return schedule.time_of_half_log_snr(torch.linspace(*ends, steps + 1).to(device))


def img2img_t_start(timesteps: torch.Tensor) -> float:
    """Where A1111 starts img2img's UniPC: `timesteps[-1] / 1000 + 1 / 1000` over the timesteps it keeps, in
    float32 (an int64 tensor divided). That is the t of the last timestep kept, while the init image was
    noised to the timestep after it, so UniPC starts one step below the noise it is given ("likely off by a
    bit", A1111's comment says)."""
    last = torch.as_tensor(timesteps)[-1].long()
    return float(last / 1000 + 1 / 1000)


def _per_image(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *[1] * (x.dim() - 1))


def _combine(weights: torch.Tensor, diffs: list[torch.Tensor]) -> torch.Tensor:
    """sum_k weights[k] * diffs[k], per image (A1111's einsum over the stacked differences)."""
    return torch.einsum("k,bk...->b...", weights, torch.stack(diffs, dim=1))


def _bh_rhos(rks: torch.Tensor, hh: torch.Tensor, b_h: torch.Tensor, order: int, use_corrector: bool):
    """UniPC-B(h)'s weights: R rho = b with R[i][k] = r_k^i and b[i] = (i+1)! hh phi_{i+2}(hh) / B(h). The
    predictor uses the first order - 1 rows (just 1/2 at order 2); the corrector all of them (1/2 at order 1)."""
    rows, rhs = [], []
    h_phi_k = torch.expm1(hh) / hh - 1
    factorial = 1
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(rows), torch.stack(rhs)
    half = torch.tensor([0.5], device=rks.device)
    rhos_p = None if order == 1 else half if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
    rhos_c = None if not use_corrector else half if order == 1 else torch.linalg.solve(R, b)
    return rhos_p, rhos_c


class _UniPC:
    """One multistep update at a time; `times` and `values` hold the previous times and x0 predictions."""

    def __init__(self, model: Callable, schedule: DiscreteSchedule, variant: str):
        self.model, self.schedule, self.variant = model, schedule, variant

    def data_prediction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.model(x, self.schedule.model_input_time(t))
        return (x - _per_image(self.schedule.sigma(t), x) * eps) / _per_image(self.schedule.alpha(t), x)

    def update(self, x, times, values, t, order, use_corrector):
        """x at time t and the x0 prediction at the predictor's x (None without the corrector)."""
        ns = self.schedule
        lambda_prev = ns.half_log_snr(times[-1])
        h = ns.half_log_snr(t) - lambda_prev
        rks, diffs = [], []
        for i in range(1, order):
            rk = ((ns.half_log_snr(times[-(i + 1)]) - lambda_prev) / h)[0]
            rks.append(rk)
            diffs.append((values[-(i + 1)] - values[-1]) / rk)
        hh = -h[0]  # data prediction: phi functions of -h
        alpha_t = ns.alpha(t)
        x_base = (_per_image(ns.sigma(t) / ns.sigma(times[-1]), x) * x
                  - _per_image(alpha_t * torch.expm1(hh), x) * values[-1])
        rks = torch.stack([*rks, torch.ones((), device=x.device)])
        if self.variant == "vary_coeff":
            return self._vary_coeff(x_base, values[-1], diffs, t, rks, hh, alpha_t, use_corrector)
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        rhos_p, rhos_c = _bh_rhos(rks, hh, b_h, order, use_corrector)
        step = _per_image(alpha_t * b_h, x)
        x_t = x_base - step * _combine(rhos_p, diffs) if diffs else x_base
        if not use_corrector:
            return x_t, None
        model_t = self.data_prediction(x_t, t)
        correction = rhos_c[-1] * (model_t - values[-1])
        if diffs:
            correction = _combine(rhos_c[:-1], diffs) + correction
        return x_base - step * correction, model_t

    def _vary_coeff(self, x_base, model_prev, diffs, t, rks, hh, alpha_t, use_corrector):
        """UniPC with varying coefficients: weights from the inverse of C[j][k] = r_j^k / (k+1)!. A1111's
        corrector applies the new value's weight from row K-2 of C^-1 (its loop variable left over; row 0
        at order 1) with h phi_{K+1}, and so does this."""
        K = len(rks)
        columns, column = [], torch.ones_like(rks)
        for k in range(1, K + 1):
            columns.append(column)
            column = column * rks / (k + 1)
        C = torch.stack(columns, dim=1)
        h_phi_ks, h_phi_k, factorial = [], torch.expm1(hh), 1
        for k in range(1, K + 2):
            h_phi_ks.append(h_phi_k)
            h_phi_k = h_phi_k / hh - 1 / factorial
            factorial *= k + 1
        coefficient = [_per_image(alpha_t * h_phi, x_base) for h_phi in h_phi_ks]
        x_t = x_base
        if diffs:
            A_p = torch.linalg.inv(C[:-1, :-1])
            for k in range(K - 1):
                x_t = x_t - coefficient[k + 1] * _combine(A_p[k], diffs)
        if not use_corrector:
            return x_t, None
        model_t = self.data_prediction(x_t, t)
        A_c = torch.linalg.inv(C)
        x_t = x_base
        for k in range(K - 1):
            x_t = x_t - coefficient[k + 1] * _combine(A_c[k][:-1], diffs)
        x_t = x_t - coefficient[K] * ((model_t - model_prev) * A_c[max(K - 2, 0)][-1])
        return x_t, model_t


def _check(steps: int, order: int, variant: str, skip_type: str) -> None:
    if variant not in VARIANTS:
        raise InputError(f"unknown UniPC variant '{variant}'; available: {', '.join(VARIANTS)}")
    if skip_type not in SKIP_TYPES:
        raise InputError(f"unknown UniPC skip type '{skip_type}'; available: {', '.join(SKIP_TYPES)}")
    if steps < 1 or order < 1:
        raise InputError(f"UniPC needs at least one step and order 1 or more; got steps={steps}, order={order}")


@torch.no_grad()
def sample_unipc(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 alphas_cumprod: torch.Tensor, steps: int, *, t_start: float | torch.Tensor | None = None,
                 variant: str = "bh1", skip_type: str = "time_uniform", order: int = 3,
                 lower_order_final: bool = True, callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Run UniPC from `x` at `t_start` (1, pure noise, when None; img2img: `img2img_t_start`) down to
    t = 1/N in `steps` updates, with `steps` calls of `model(x, t) -> eps`, t the float32 fractional
    timestep per image (999.0 first in txt2img). Defaults are A1111's options (uni_pc_variant,
    uni_pc_skip_type, uni_pc_order, uni_pc_lower_order_final).

    As in A1111: the first `order - 1` updates warm up at orders 1, 2, ... (with corrector); with
    `lower_order_final` the order then drops to the number of updates left; the last update has no
    corrector, and the x0 prediction the corrector evaluates (at the predicted, uncorrected x) is what the
    next updates use, so no model call is spent after the last update. A1111 fails when steps < order;
    here the order is lowered to `steps`. vary_coeff fails in A1111 at batch size > 1; here each image
    gets what batch size 1 gives.

    `callback` gets {'x', 'i', 't', 'denoised'} after each update: 'denoised' is the x0 prediction of that
    update's corrector, None after the last update (as A1111's after_update passes it); 't' is the
    model input time reached. It may raise to stop; it may change 'x' in place.
    """
    # 1. Check inputs. A1111 asserts steps >= order ("UniPC order must be < sampling steps"); lower the order instead
    _check(steps, order, variant, skip_type)
    order = min(order, steps)
    # 2. The noise schedule and the times visited
    schedule = DiscreteSchedule(alphas_cumprod, x.device)
    top = None if t_start is None else torch.as_tensor(t_start, dtype=torch.float32)
    times_visited = time_steps(schedule, skip_type, steps, top)
    solver = _UniPC(model, schedule, variant)
    # 3. The x0 prediction at the start
    t = times_visited[0].expand(x.shape[0])
    times, values = [t], [solver.data_prediction(x, t)]
    # 4. Warm-up at orders 1 .. order - 1, then `order` (lower towards the end with lower_order_final)
    for step in range(1, steps + 1):
        t = times_visited[step].expand(x.shape[0])
        if step < order:
            step_order = step
        else:
            step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, model_x = solver.update(x, times, values, t, step_order, use_corrector=step < steps)
        if callback is not None:
            callback({"x": x, "i": step - 1, "t": float(schedule.model_input_time(t[0])), "denoised": model_x})
        times, values = [*times, t][-order:], [*values, model_x][-order:]
    return x
