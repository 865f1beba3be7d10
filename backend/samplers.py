"""A1111's sampler names and schedule types: k-diffusion samplers (`backend.k_sampling`, as A1111
computes them) and the timestep samplers DDIM, PLMS, UniPC and LCM (diffusers schedulers).

`resolve(sampler, schedule_type)` validates a pair (legacy names such as "DPM++ 2M Karras" split by
their suffix) and `make_scheduler` builds the diffusers scheduler of a timestep sampler.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import diffusers
import torch

from backend import schedules
from backend.errors import InputError

AUTOMATIC = "Automatic"
# Schedule type label -> scheduler options. "Uniform" spaces timesteps evenly in t, as k-diffusion does.
SCHEDULE_OPTIONS = {
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
SCHEDULE_TYPES = schedules.SCHEDULE_TYPES  # every one of A1111's, for the k-diffusion samplers
K_DIFFUSION = "k-diffusion"  # the `scheduler` of the samplers `backend.k_sampling` runs
K_SAMPLER_NAMES = ("DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
                   "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart")


class SamplerError(InputError):
    pass


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str
    options: dict = field(default_factory=dict)
    default_schedule: str = "Uniform"
    aliases: tuple[str, ...] = ()
    # k-diffusion style samplers space timesteps with linspace; DDIM/PLMS/LCM keep "leading" as in A1111.
    timestep_spacing: str = "linspace"


SAMPLERS = (  # A1111's order: the k-diffusion samplers (their aliases in backend.schedules), then the timestep ones
    *(Sampler(name, K_DIFFUSION, aliases=schedules.sampler_aliases(name)) for name in K_SAMPLER_NAMES),
    Sampler("DDIM", "DDIMScheduler", {"set_alpha_to_one": False}, "Uniform", ("ddim",), "leading"),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, "Uniform", ("plms", "pndm"), "leading"),
    Sampler("UniPC", "UniPCMultistepScheduler", {}, "Uniform", ("unipc",)),
    Sampler("LCM", "LCMScheduler", {}, "Uniform", ("lcm",), "leading"),
)
SAMPLER_NAMES = tuple(s.name for s in SAMPLERS)
_BY_NAME = {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}


def scheduler_class(sampler: Sampler) -> type:
    if sampler.scheduler == K_DIFFUSION:
        raise ValueError(f"{sampler.name} is a k-diffusion sampler: backend.k_sampling runs it, not a diffusers scheduler")
    return getattr(diffusers, sampler.scheduler)


def _scheduler_parameters(sampler: Sampler) -> set[str]:
    return set(inspect.signature(scheduler_class(sampler).__init__).parameters)


def supported_schedules(sampler: Sampler) -> list[str]:
    if sampler.scheduler == K_DIFFUSION:
        return [label for label in SCHEDULE_TYPES if label != AUTOMATIC]
    params = _scheduler_parameters(sampler)
    return [label for label, options in SCHEDULE_OPTIONS.items() if set(options) <= params]


def resolve(sampler_name: str, schedule_type: str = AUTOMATIC) -> tuple[Sampler, str]:
    """(sampler, concrete schedule type) for A1111 names; raises `SamplerError` listing valid ones."""
    name = (sampler_name or "").strip()
    schedule = (schedule_type or AUTOMATIC).strip()
    sampler = _BY_NAME.get(name.lower())
    if sampler is None:
        # Legacy infotexts join the two: "DPM++ 2M Karras", "Euler a SGM Uniform".
        for label in sorted(SCHEDULE_TYPES[1:], key=len, reverse=True):
            if name.lower().endswith(" " + label.lower()):
                sampler = _BY_NAME.get(name[: -len(label) - 1].strip().lower())
                if sampler is not None:
                    if schedule == AUTOMATIC:
                        schedule = label
                    break
    if sampler is None:
        raise SamplerError(f"unknown sampler '{sampler_name}'; available: {', '.join(SAMPLER_NAMES)}")
    labels = {label.lower(): label for label in SCHEDULE_TYPES}
    if schedule.lower() not in labels:
        raise SamplerError(f"unknown schedule type '{schedule_type}'; available: {', '.join(SCHEDULE_TYPES)}")
    schedule = labels[schedule.lower()]
    if sampler.scheduler == K_DIFFUSION:  # as A1111 writes it: Automatic stays Automatic without a default
        return sampler, schedules.sampler_schedule(sampler.name, schedule).infotext_schedule
    if schedule == AUTOMATIC:
        schedule = sampler.default_schedule
    supported = supported_schedules(sampler)
    if schedule not in supported:
        raise SamplerError(
            f"sampler {sampler.name} does not support the {schedule} schedule; use Automatic or one of: "
            + ", ".join(supported)
        )
    return sampler, schedule


def make_scheduler(sampler: Sampler, schedule: str, model_scheduler_config: dict, seed: int | None = None):
    """A fresh diffusers scheduler (they hold per-run state: one per image keeps batches reproducible)."""
    cls = scheduler_class(sampler)
    # A1111's timestep samplers ignore the schedule type (a hires pass may pass on the first pass's)
    options = {"timestep_spacing": sampler.timestep_spacing, **sampler.options, **SCHEDULE_OPTIONS.get(schedule, {})}
    if sampler.scheduler == "DPMSolverSDEScheduler":
        if seed is not None:
            options["noise_sampler_seed"] = seed
        # torchsde complains when float32 rounding puts a query a hair before the interval start.
        warnings.filterwarnings("ignore", message="Should have ta>=t0", module="torchsde")
    params = _scheduler_parameters(sampler)
    config = {k: v for k, v in model_scheduler_config.items() if k in params}
    if model_scheduler_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in params:
        config["trained_betas"] = zero_terminal_snr_betas(model_scheduler_config).tolist()
    return cls.from_config({**config, **options})


def zero_terminal_snr_betas(config: dict) -> torch.Tensor:
    """The model's betas rescaled to zero terminal SNR, for schedulers without that option.

    The last cumulative alpha is set to 2**-24 instead of 0, as diffusers' own schedulers do, so
    sigma-based samplers get a large but finite starting sigma.
    """
    from diffusers.schedulers.scheduling_euler_discrete import rescale_zero_terminal_snr

    steps = config["num_train_timesteps"]
    if config.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, steps, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(config["beta_start"], config["beta_end"], steps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - rescale_zero_terminal_snr(betas), dim=0)
    alphas_cumprod[-1] = 2**-24
    return 1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
