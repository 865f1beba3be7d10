"""A1111's sampler settings: eta, the sigma churn / tmin / tmax / noise of the k-diffusion samplers, the
schedule's min and max sigma and rho, the Beta schedule's alpha and beta, discarding the penultimate sigma,
and UniPC's variant, skip type, order and lower-order final step.

The field names are A1111's option names, so `override_settings` and config.json keys carry over.
`infotext_parameters` gives the keys A1111 writes when a setting is in effect for a sampler (and only then);
`INFOTEXT_KEYS` reads them back, as A1111's paste maps them onto its options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from backend import schedules
from backend.errors import InputError

UNIPC_VARIANTS = ("bh1", "bh2", "vary_coeff")
UNIPC_SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")
# The k-diffusion samplers' extra options A1111 passes on (its sampler_extra_params): Euler a takes none.
_EXTRA_PARAMS = {
    "Euler": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "Heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "DPM2": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    **dict.fromkeys(("DPM fast", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun",
                     "DPM++ 3M SDE"), ("s_noise",)),
}
# Samplers that take an eta: A1111's default is 1 for the k-diffusion ones and 0 for DDIM ("Eta DDIM")
_ETA_SAMPLERS = {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun",
                 "DPM++ 3M SDE", "DPM fast", "DPM adaptive", "DDIM", "DDIM CFG++"}
_SIGMA_INFOTEXT = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
_UNIPC_INFOTEXT = {"uni_pc_variant": "UniPC variant", "uni_pc_skip_type": "UniPC skip type",
                   "uni_pc_order": "UniPC order", "uni_pc_lower_order_final": "UniPC lower order final"}
_DEFAULT_RHO = {"Karras": schedules.KARRAS_RHO, "Polyexponential": 1.0}


@dataclass
class SamplerSettings:
    eta_ancestral: float = 1.0  # the k-diffusion samplers' eta ("Eta")
    eta_ddim: float = 0.0  # DDIM's ("Eta DDIM")
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0  # 0: infinity
    s_noise: float = 1.0
    sigma_min: float = 0.0  # 0: the model's ("Schedule min sigma")
    sigma_max: float = 0.0  # 0: the model's ("Schedule max sigma")
    rho: float = 0.0  # 0: the schedule's own (Karras 7, Polyexponential 1) ("Schedule rho")
    beta_dist_alpha: float = 0.6
    beta_dist_beta: float = 0.6
    always_discard_next_to_last_sigma: bool = False
    uni_pc_variant: str = "bh1"
    uni_pc_skip_type: str = "time_uniform"
    uni_pc_order: int = 3
    uni_pc_lower_order_final: bool = True

    def validate(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value) or isinstance(value, (int, float)) and value < 0:
                raise InputError(f"sampler setting {name} must be a finite number of 0 or more, not {value!r}")
        if not (self.beta_dist_alpha > 0 and self.beta_dist_beta > 0):
            raise InputError("the Beta schedule's alpha and beta must be above 0")
        if self.uni_pc_variant not in UNIPC_VARIANTS:
            raise InputError(f"uni_pc_variant must be one of: {', '.join(UNIPC_VARIANTS)}")
        if self.uni_pc_skip_type not in UNIPC_SKIP_TYPES:
            raise InputError(f"uni_pc_skip_type must be one of: {', '.join(UNIPC_SKIP_TYPES)}")
        if not 1 <= self.uni_pc_order <= 5:
            raise InputError("uni_pc_order must be between 1 and 5")

    def eta(self, sampler: str, requested: float | None = None) -> float | None:
        """The eta `sampler` runs with (a request's own `eta` first, as A1111's `p.eta`), or None when it
        takes none."""
        name = schedules.sampler_schedule(sampler).sampler
        if name not in _ETA_SAMPLERS:
            return None
        if requested is not None:
            return float(requested)
        return self.eta_ddim if schedules.sampler_schedule(name).sigma_input == "timesteps" else self.eta_ancestral

    def k_options(self, sampler: str, requested_eta: float | None = None) -> dict:
        """Options for `k_samplers.sample` beyond A1111's defaults: eta and the sigma extras it passes."""
        options = {}
        eta = self.eta(sampler, requested_eta)
        if eta is not None:
            options["eta"] = eta
        for name in _EXTRA_PARAMS.get(schedules.sampler_schedule(sampler).sampler, ()):
            value = getattr(self, name)
            options[name] = math.inf if name == "s_tmax" and value == 0 else value
        return options

    def schedule_overrides(self, schedule: str | None) -> dict:
        """`schedules.sigmas` keyword arguments for the settings that change this schedule (the one A1111
        computes, `SamplerSchedule.schedule`)."""
        overrides: dict = {"always_discard_penultimate_sigma": self.always_discard_next_to_last_sigma}
        if schedule in (None, "Uniform"):  # the model's own spacing: A1111 passes it no range
            return overrides
        overrides.update(sigma_min=self.sigma_min or None, sigma_max=self.sigma_max or None,
                         beta_alpha=self.beta_dist_alpha, beta_beta=self.beta_dist_beta)
        if schedule in _DEFAULT_RHO and self.rho:
            overrides["rho"] = self.rho
        return overrides

    def infotext_parameters(self, sampler: str, schedule: str | None, requested_eta: float | None = None,
                            model_sigma_range: tuple[float, float] | None = None) -> dict:
        """The infotext keys A1111 writes for these settings with this sampler and schedule."""
        plan = schedules.sampler_schedule(sampler, schedule or schedules.AUTOMATIC)
        params: dict = {}
        eta = self.eta(plan.sampler, requested_eta)
        timestep_sampler = plan.sigma_input == "timesteps"
        if eta is not None and eta != (0.0 if timestep_sampler else 1.0):
            params["Eta DDIM" if timestep_sampler else "Eta"] = eta
        defaults = SamplerSettings()
        for name in _EXTRA_PARAMS.get(plan.sampler, ()):
            if getattr(self, name) != getattr(defaults, name):
                params[_SIGMA_INFOTEXT[name]] = getattr(self, name)
        if plan.schedule not in (None, "Uniform"):
            low, high = model_sigma_range or (None, None)
            if self.sigma_min and self.sigma_min != low:
                params["Schedule min sigma"] = self.sigma_min
            if self.sigma_max and self.sigma_max != high:
                params["Schedule max sigma"] = self.sigma_max
            if plan.schedule in _DEFAULT_RHO and self.rho and self.rho != _DEFAULT_RHO[plan.schedule]:
                params["Schedule rho"] = self.rho
            if plan.schedule == "Beta":
                params.update({"Beta schedule alpha": self.beta_dist_alpha, "Beta schedule beta": self.beta_dist_beta})
        if self.always_discard_next_to_last_sigma and not schedules.sampler_schedule(plan.sampler).discard_penultimate_sigma:
            params["Discard penultimate sigma"] = True
        if plan.sampler == "UniPC":
            params.update({key: getattr(self, name) for name, key in _UNIPC_INFOTEXT.items()
                           if getattr(self, name) != getattr(defaults, name)})
        return params

    def settings(self) -> SamplerSettings:
        """These settings alone (from an object that holds them among others, such as the options)."""
        return SamplerSettings(**{name: getattr(self, name) for name in FIELDS})


def from_infotext(parameters) -> dict:
    """The settings an infotext records (A1111's keys), typed; unreadable values are skipped."""
    defaults, found = SamplerSettings(), {}
    for key, name in INFOTEXT_KEYS.items():
        if key not in parameters:
            continue
        text, kind = str(parameters[key]).strip(), type(getattr(defaults, name))
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    continue
                found[name] = text.lower() == "true"
            else:
                found[name] = kind(text) if kind is str else kind(float(text)) if kind is int else float(text)
        except ValueError:
            continue
        if isinstance(found[name], float) and not math.isfinite(found[name]):
            del found[name]
    return found


FIELDS = tuple(f.name for f in fields(SamplerSettings))
# infotext key -> setting, as A1111 pastes them
INFOTEXT_KEYS = {
    "Eta": "eta_ancestral", "Eta DDIM": "eta_ddim", **{key: name for name, key in _SIGMA_INFOTEXT.items()},
    "Schedule min sigma": "sigma_min", "Schedule max sigma": "sigma_max", "Schedule rho": "rho",
    "Beta schedule alpha": "beta_dist_alpha", "Beta schedule beta": "beta_dist_beta",
    "Discard penultimate sigma": "always_discard_next_to_last_sigma",
    **{key: name for name, key in _UNIPC_INFOTEXT.items()},
}
