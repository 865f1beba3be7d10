"""A1111's noise schedules in k-diffusion's sigma space: every "Schedule type" of A1111 v1.10, computed from a
model's `alphas_cumprod` with the same float32 operations A1111 runs, and A1111's per-sampler choices
(what "Automatic" means, the discarded penultimate sigma, LCM's sub-sampled table, timestep samplers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from backend.errors import InputError

AUTOMATIC = "Automatic"
SCHEDULE_TYPES = (AUTOMATIC, "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                  "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
# Labels, A1111's internal names ("sgm_uniform", what its API also accepts) and its one alias.
_SCHEDULE_KEYS = {
    **{label.lower(): label for label in SCHEDULE_TYPES},
    **{label.lower().replace(" ", "_"): label for label in SCHEDULE_TYPES},
    "sgmuniform": "SGM Uniform",
}
FAMILIES = ("sd1", "sd2", "sdxl")

KARRAS_RHO = 7.0
POLYEXPONENTIAL_RHO = 1.0
BETA_ALPHA = 0.6
BETA_BETA = 0.6
# A1111's "Zero Terminal SNR" noise schedule (rescale_zero_terminal_snr_abar) puts this in place of the final 0,
# so sigma_max is about 4519 instead of infinite. Diffusers' schedulers use 2**-24 (sigma_max 4096) instead.
ZTSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08
# NVIDIA's Align Your Steps sigmas for 10 steps, as A1111 lists them (ComfyUI's more precise lists differ
# in the third decimal: 3.8637 here is 3.861).
AYS_SIGMAS = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}
TRAIN_TIMESTEPS = 1000
LCM_ORIGINAL_STEPS = 50


@dataclass(frozen=True)
class _SamplerOptions:
    """One row of A1111's sampler table (the options dict of sd_samplers_kdiffusion.py and friends)."""

    default_schedule: str | None = None  # what "Automatic" means; None: the model's own spacing (Uniform)
    discard_penultimate_sigma: bool = False
    second_order: bool = False
    uses_ensd: bool = False
    brownian_noise: bool = False
    sigma_input: str = "sigmas"
    aliases: tuple[str, ...] = ()


_SAMPLERS = {
    "DPM++ 2M": _SamplerOptions("Karras", aliases=("k_dpmpp_2m",)),
    "DPM++ SDE": _SamplerOptions("Karras", second_order=True, brownian_noise=True, aliases=("k_dpmpp_sde",)),
    "DPM++ 2M SDE": _SamplerOptions("Exponential", brownian_noise=True, aliases=("k_dpmpp_2m_sde",)),
    "DPM++ 2M SDE Heun": _SamplerOptions("Exponential", brownian_noise=True, aliases=("k_dpmpp_2m_sde_heun",)),
    "DPM++ 2S a": _SamplerOptions("Karras", second_order=True, uses_ensd=True, aliases=("k_dpmpp_2s_a",)),
    "DPM++ 3M SDE": _SamplerOptions("Exponential", discard_penultimate_sigma=True, brownian_noise=True,
                                    aliases=("k_dpmpp_3m_sde",)),
    "Euler a": _SamplerOptions(uses_ensd=True, aliases=("k_euler_a", "k_euler_ancestral")),
    "Euler": _SamplerOptions(aliases=("k_euler",)),
    "LMS": _SamplerOptions(aliases=("k_lms",)),
    "Heun": _SamplerOptions(second_order=True, aliases=("k_heun",)),
    "DPM2": _SamplerOptions("Karras", discard_penultimate_sigma=True, second_order=True, aliases=("k_dpm_2",)),
    "DPM2 a": _SamplerOptions("Karras", discard_penultimate_sigma=True, second_order=True, uses_ensd=True,
                              aliases=("k_dpm_2_a",)),
    # In txt2img these two take only (model sigma_min, model sigma_max, steps); img2img takes the schedule's range.
    "DPM fast": _SamplerOptions(uses_ensd=True, sigma_input="range", aliases=("k_dpm_fast",)),
    "DPM adaptive": _SamplerOptions(uses_ensd=True, sigma_input="range", aliases=("k_dpm_ad",)),
    "Restart": _SamplerOptions("Karras", second_order=True, aliases=("restart",)),
    # CompVis timestep samplers: the schedule type is ignored; see compvis_timesteps.
    "DDIM": _SamplerOptions(sigma_input="timesteps", aliases=("ddim",)),
    "DDIM CFG++": _SamplerOptions(sigma_input="timesteps", aliases=("ddim_cfgpp",)),
    "PLMS": _SamplerOptions(sigma_input="timesteps", aliases=("plms",)),
    "UniPC": _SamplerOptions(sigma_input="timesteps", aliases=("unipc",)),
    # LCM runs k-diffusion style over a 50-entry sub-table of the model's sigmas (LCMCompVisDenoiser).
    "LCM": _SamplerOptions(aliases=("k_lcm",)),
}
SAMPLER_NAMES = tuple(_SAMPLERS)
_SAMPLER_KEYS = {key.lower(): name for name, row in _SAMPLERS.items() for key in (name, *row.aliases)}


@dataclass(frozen=True)
class SamplerSchedule:
    """How A1111 runs a sampler with a schedule type.

    schedule: the schedule A1111 computes (never "Automatic"); None for timestep samplers, which ignore it.
    infotext_schedule: the "Schedule type" A1111 writes (the resolved label, or "Automatic" when the sampler has
        no default of its own).
    discard_penultimate_sigma: A1111 computes steps + 1 sigmas and drops the next-to-last one.
    second_order: two model calls a step; A1111's progress bar counts 2 x steps. The schedule is unchanged.
    sigma_input: "sigmas" (the whole list), "range" (DPM fast / adaptive) or "timesteps" (DDIM, PLMS, UniPC,
        DDIM CFG++).
    lcm_table: sigmas come from LCM's 50-step sub-table of the model's schedule.
    """

    sampler: str
    schedule: str | None
    infotext_schedule: str
    discard_penultimate_sigma: bool
    second_order: bool
    uses_ensd: bool
    brownian_noise: bool
    sigma_input: str
    lcm_table: bool


def sampler_aliases(sampler_name: str) -> tuple[str, ...]:
    """A1111's other names of a sampler (`k_euler_a`, ...)."""
    return _SAMPLERS[sampler_schedule(sampler_name).sampler].aliases


def schedule_label(schedule_type: str) -> str:
    """A1111's label for a schedule type given as a label or as A1111's internal name, any case."""
    label = _SCHEDULE_KEYS.get((schedule_type or AUTOMATIC).strip().lower())
    if label is None:
        raise InputError(f"unknown schedule type '{schedule_type}'; available: {', '.join(SCHEDULE_TYPES)}")
    return label


def sampler_schedule(sampler_name: str, schedule_type: str = AUTOMATIC, *,
                     always_discard_penultimate_sigma: bool = False) -> SamplerSchedule:
    """What A1111 v1.10 does for this sampler and schedule type ("Automatic" resolved per sampler).

    `always_discard_penultimate_sigma` is A1111's setting of that name (infotext "Discard penultimate sigma").
    """
    name = _SAMPLER_KEYS.get((sampler_name or "").strip().lower())
    if name is None:
        raise InputError(f"unknown sampler '{sampler_name}'; available: {', '.join(SAMPLER_NAMES)}")
    row = _SAMPLERS[name]
    label = schedule_label(schedule_type)
    if row.sigma_input == "timesteps":
        schedule = None
    elif label == AUTOMATIC:
        schedule = row.default_schedule or "Uniform"
    else:
        schedule = label
    infotext = label
    if label == AUTOMATIC and schedule is not None and row.default_schedule is not None:
        infotext = row.default_schedule
    return SamplerSchedule(
        sampler=name, schedule=schedule, infotext_schedule=infotext,
        discard_penultimate_sigma=row.discard_penultimate_sigma or always_discard_penultimate_sigma,
        second_order=row.second_order, uses_ensd=row.uses_ensd, brownian_noise=row.brownian_noise,
        sigma_input=row.sigma_input, lcm_table=name == "LCM",
    )


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """SD1/SD2/SDXL's alphas_cumprod as the CompVis and SGM code build it: float64 throughout, float32 at the end.

    Diffusers builds the same schedule in float32 and lands a few 1e-6 away; use this one for A1111's sigmas.
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas.numpy())).to(torch.float32)


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """A1111's "Zero Terminal SNR" noise schedule: sqrt(alphas_cumprod) shifted to end at 0 and rescaled to keep
    its first value, in float32, then the final 0 replaced by ZTSNR_LAST_ALPHA_CUMPROD."""
    root = torch.as_tensor(alphas_cumprod, dtype=torch.float32).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = ((root - last) * (first / (first - last))) ** 2
    rescaled[-1] = ZTSNR_LAST_ALPHA_CUMPROD
    return rescaled


def model_sigmas(alphas_cumprod) -> torch.Tensor:
    """The model's discrete sigmas, ascending in t, float32 (k-diffusion's DiscreteSchedule.sigmas).

    A final alphas_cumprod of 0 (zero terminal SNR) becomes ZTSNR_LAST_ALPHA_CUMPROD, as A1111 does.
    """
    alphas = _checked_alphas_cumprod(alphas_cumprod)
    return ((1 - alphas) / alphas) ** 0.5


def sigma_to_t(sigma, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of a sigma, interpolating linearly in log sigma (the model input of
    k-diffusion's CompVisDenoiser, unquantized). Clamped to [0, T-1]."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    log_sigma = sigma.log()
    above = (log_sigma - log_sigmas[:, None]).ge(0)
    # The last table entry at or below sigma: the running count of such entries peaks first there.
    low = above.cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    low_log, high_log = log_sigmas[low], log_sigmas[high]
    weight = ((low_log - log_sigma) / (low_log - high_log)).clamp(0, 1)
    return ((1 - weight) * low + weight * high).view(sigma.shape)


def t_to_sigma(t, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The sigma of a fractional timestep, interpolating linearly in log sigma between table entries."""
    t = torch.as_tensor(t).float()
    low, high, frac = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - frac) * log_sigmas[low] + frac * log_sigmas[high]).exp()


def compvis_timesteps(steps: int, *, discard_penultimate_sigma: bool = False) -> torch.Tensor:
    """The timesteps A1111's DDIM, DDIM CFG++, PLMS and UniPC step through, ascending: 1, 1 + 1000 // steps, ...

    There can be more than `steps` of them (30 steps gives 31), exactly as in A1111.
    """
    n = _checked_steps(steps) + (1 if discard_penultimate_sigma else 0)
    return torch.arange(0, TRAIN_TIMESTEPS, TRAIN_TIMESTEPS // n).add(1).clamp(0, TRAIN_TIMESTEPS - 1)


def sigmas(alphas_cumprod, steps: int, schedule: str = AUTOMATIC, family: str = "sd1", sampler: str | None = None,
           *, sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
           beta_alpha: float = BETA_ALPHA, beta_beta: float = BETA_BETA,
           always_discard_penultimate_sigma: bool = False) -> torch.Tensor:
    """The float32 sigmas A1111 v1.10 samples with, on the CPU.

    Usually steps + 1 values ending in 0. Exceptions, all A1111's: DDIM can give more (30 steps: 31 + 1),
    KL Optimal ends at sigma_min instead of 0, and AYS at 1 step is [0.029, 0].
    `sampler` resolves "Automatic", applies the discarded penultimate sigma and LCM's table; without it the
    schedule must be named. `sigma_min` / `sigma_max` / `rho` are A1111's "Schedule min sigma" / "Schedule max
    sigma" / "Schedule rho" overrides (rho: Karras and Polyexponential only); `beta_alpha` / `beta_beta` its
    "Beta schedule alpha" / "beta".
    """
    # 1. Check inputs and resolve the sampler's choices
    steps = _checked_steps(steps)
    if family not in FAMILIES:
        raise InputError(f"unknown model family '{family}'; available: {', '.join(FAMILIES)}")
    if sampler is None:
        label = schedule_label(schedule)
        if label == AUTOMATIC:
            raise InputError("schedule type 'Automatic' depends on the sampler: pass sampler=... or name a schedule")
        discard, lcm = always_discard_penultimate_sigma, False
    else:
        plan = sampler_schedule(sampler, schedule, always_discard_penultimate_sigma=always_discard_penultimate_sigma)
        if plan.schedule is None:
            raise InputError(f"{plan.sampler} steps through timesteps, not sigmas: use compvis_timesteps(steps)")
        label, discard, lcm = plan.schedule, plan.discard_penultimate_sigma, plan.lcm_table

    # 2. The model's sigma table, and the range A1111 hands the schedule functions (python floats)
    table = SigmaTable.build(alphas_cumprod, lcm=lcm)
    low = table.sigmas[0].item() if sigma_min is None else float(sigma_min)
    high = table.sigmas[-1].item() if sigma_max is None else float(sigma_max)

    # 3. One extra step when the penultimate sigma is dropped afterwards
    n = steps + 1 if discard else steps
    result = _schedule(label, n, low, high, table, family=family, rho=rho, beta_alpha=beta_alpha,
                       beta_beta=beta_beta)
    if discard:
        result = torch.cat([result[:-2], result[-1:]])
    return result


def _schedule(label, n, low, high, table, *, family, rho, beta_alpha, beta_beta) -> torch.Tensor:
    if label == "Uniform":
        return table.uniform(n)
    if label == "Karras":
        return karras(n, low, high, KARRAS_RHO if rho is None else float(rho))
    if label == "Exponential":
        return _append_zero(torch.linspace(math.log(high), math.log(low), n).exp())
    if label == "Polyexponential":
        ramp = torch.linspace(1, 0, n) ** (POLYEXPONENTIAL_RHO if rho is None else float(rho))
        return _append_zero(torch.exp(ramp * (math.log(high) - math.log(low)) + math.log(low)))
    if label == "SGM Uniform":
        return _spaced_in_t(table, n, low, high, skip_last=True)
    if label == "Normal":
        return _spaced_in_t(table, n, low, high, skip_last=False)
    if label == "KL Optimal":
        return _kl_optimal(n, low, high)
    if label == "Align Your Steps":
        return _align_your_steps(n, family)
    if label == "Simple":
        stride = len(table.sigmas) / n
        return _append_zero(table.sigmas[[len(table.sigmas) - 1 - int(x * stride) for x in range(n)]])
    if label == "DDIM":
        picks = list(range(1, len(table.sigmas), max(len(table.sigmas) // n, 1)))[::-1]
        return _append_zero(table.sigmas[picks])
    if label == "Beta":
        return _beta(n, low, high, beta_alpha, beta_beta)
    raise AssertionError(label)


def karras(n, sigma_min, sigma_max, rho=KARRAS_RHO) -> torch.Tensor:
    # Karras et al. (2022), eq. 5: evenly spaced in sigma ** (1 / rho).
    low_root, high_root = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    ramp = torch.linspace(0, 1, n)
    return _append_zero((high_root + ramp * (low_root - high_root)) ** rho)


def _spaced_in_t(table, n, sigma_min, sigma_max, *, skip_last):
    # A1111 maps the range to timesteps and back one 0-d tensor at a time; so do we, for the same float32 bits.
    start, end = table.to_t(torch.tensor(sigma_max)), table.to_t(torch.tensor(sigma_min))
    ts = torch.linspace(start, end, n + 1)[:-1] if skip_last else torch.linspace(start, end, n)
    return _append_zero(torch.stack([table.to_sigma(t) for t in ts]))


def _kl_optimal(n, sigma_min, sigma_max):
    # "Align Your Steps" appendix: evenly spaced in arctan(sigma). A1111 appends no 0: it ends at sigma_min.
    angle_min, angle_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    fraction = torch.arange(n + 1) / n
    return torch.tan(fraction * angle_min + (1.0 - fraction) * angle_max)


def _align_your_steps(n, family):
    # NVIDIA's recipe: interpolate log sigma (ascending) linearly over [0, 1]. With n == 11 that is the list
    # itself (A1111 skips the interpolation; the float32 result is the same). With n == 1 the single point
    # lands on the smallest sigma, so A1111's one-step AYS is [0.029, 0].
    levels = AYS_SIGMAS["sdxl" if family == "sdxl" else "sd1"]
    ascending = np.log(levels[::-1])
    values = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(levels)), ascending))[::-1]
    return torch.tensor([*values, 0.0], dtype=torch.float32)


def _beta(n, sigma_min, sigma_max, alpha, beta):
    # Lee et al. (2024), "Beta Sampling is All You Need". A1111 spaces sigma itself (not t) by the inverse
    # Beta CDF. scipy comes with torchsde; imported here because scipy.stats is slow to import.
    from scipy import stats

    quantiles = [stats.beta.ppf(q, alpha, beta) for q in 1 - np.linspace(0, 1, n)]
    return torch.tensor([sigma_min + x * (sigma_max - sigma_min) for x in quantiles] + [0.0], dtype=torch.float32)


@dataclass(frozen=True)
class SigmaTable:
    """The model's discrete schedule as the sampler's denoiser sees it: k-diffusion's DiscreteSchedule, or
    A1111's LCMCompVisDenoiser (every 20th entry, quantized timesteps). `to_t` is the UNet's timestep for
    a sigma."""

    sigmas: torch.Tensor
    log_sigmas: torch.Tensor
    lcm: bool

    @classmethod
    def build(cls, alphas_cumprod, *, lcm: bool) -> SigmaTable:
        alphas = _checked_alphas_cumprod(alphas_cumprod)
        if lcm:
            if len(alphas) != TRAIN_TIMESTEPS:
                raise InputError(f"LCM needs a {TRAIN_TIMESTEPS}-step noise schedule, not {len(alphas)}")
            alphas = alphas[cls._skip() - 1::cls._skip()].clone()
        table = ((1 - alphas) / alphas) ** 0.5
        return cls(table, table.log(), lcm)

    @staticmethod
    def _skip() -> int:
        return TRAIN_TIMESTEPS // LCM_ORIGINAL_STEPS

    def to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        if not self.lcm:
            return sigma_to_t(sigma, self.log_sigmas)
        nearest = (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)
        return nearest * self._skip() + (self._skip() - 1)

    def to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        if self.lcm:
            t = ((t - (self._skip() - 1)) / self._skip()).float().clamp(min=0, max=len(self.sigmas) - 1)
        return t_to_sigma(t, self.log_sigmas)

    def uniform(self, n: int) -> torch.Tensor:
        """k-diffusion's get_sigmas(n): n timesteps evenly spaced from the top of the table down to its bottom."""
        if self.lcm:
            ts = torch.linspace(self.to_t(self.sigmas[-1]), self.to_t(self.sigmas[0]), n)
        else:
            ts = torch.linspace(len(self.sigmas) - 1, 0, n)
        return _append_zero(self.to_sigma(ts))


def _append_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values, values.new_zeros(1)])


def _checked_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a whole number of at least 1, not {steps!r}")
    return steps


def _checked_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    alphas = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32).clone()
    if alphas.ndim != 1 or len(alphas) < 2:
        raise InputError(f"alphas_cumprod must be a 1-D tensor of the training timesteps, got shape "
                         f"{tuple(alphas.shape)}")
    if alphas[-1] == 0:
        alphas[-1] = ZTSNR_LAST_ALPHA_CUMPROD
    if not torch.isfinite(alphas).all() or (alphas <= 0).any() or (alphas > 1).any():
        raise InputError("alphas_cumprod must lie in (0, 1] (only the last may be 0, for zero terminal SNR)")
    if not (alphas[1:] < alphas[:-1]).all():
        raise InputError("alphas_cumprod must decrease strictly from the first timestep to the last")
    return alphas
