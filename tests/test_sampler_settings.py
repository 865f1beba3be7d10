"""A1111's sampler parameters (eta, sigma churn/tmin/tmax/noise, the schedule's range and rho, Beta's
alpha/beta, discarding the penultimate sigma, UniPC's options): which sampler takes which, what the
infotext records, reading it back, and their effect on generation and the API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend import k_sampling, schedules
from backend.errors import InputError
from backend.generation import generate
from backend.infotext import parse_infotext
from backend.request import GenerationRequest
from backend.sampler_settings import SamplerSettings, from_infotext

SD_RANGE = (0.0292, 14.6146)


@pytest.mark.parametrize("sampler, settings, eta, expected", [
    ("Euler a", {}, None, {"eta": 1.0}),
    ("Euler a", {"eta_ancestral": 0.5, "s_noise": 1.1}, None, {"eta": 0.5}),  # A1111 passes Euler a no s_noise
    ("Euler a", {"eta_ancestral": 0.5}, 0.2, {"eta": 0.2}),  # the request's own eta first
    ("Euler", {"s_churn": 0.3, "s_tmax": 0.0}, None, {"s_churn": 0.3, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}),
    ("DPM++ 2M SDE", {"s_noise": 0.9}, None, {"eta": 1.0, "s_noise": 0.9}),
    ("DPM++ 2M", {"eta_ancestral": 0.1, "s_churn": 5.0}, None, {}),
    ("LMS", {}, 0.5, {}),
])
def test_each_sampler_gets_the_parameters_a1111_passes_it(sampler, settings, eta, expected):
    assert SamplerSettings(**settings).k_options(sampler, eta) == expected


def test_ddim_takes_eta_ddim_and_plms_none():
    settings = SamplerSettings(eta_ddim=0.3, eta_ancestral=0.7)
    assert settings.eta("DDIM") == 0.3 and settings.eta("DDIM CFG++") == 0.3 and settings.eta("PLMS") is None
    assert settings.eta("DDIM", 1.0) == 1.0  # A1111's API body eta


@pytest.mark.parametrize("sampler, schedule, settings, eta, expected", [
    ("Euler a", "Automatic", {}, None, {}),
    ("Euler a", "Automatic", {"eta_ancestral": 0.5}, None, {"Eta": 0.5}),
    ("DDIM", "Automatic", {}, 1.0, {"Eta DDIM": 1.0}),
    ("Euler", "Automatic", {"s_churn": 1.5, "s_noise": 1.0}, None, {"Sigma churn": 1.5}),
    ("Euler a", "Automatic", {"s_churn": 1.5}, None, {}),
    ("DPM++ 2M", "Automatic", {"rho": 5.0, "sigma_max": 10.0}, None, {"Schedule max sigma": 10.0, "Schedule rho": 5.0}),
    ("DPM++ 2M", "Automatic", {"sigma_max": SD_RANGE[1]}, None, {}),  # the model's own: not written
    ("Euler", "Uniform", {"sigma_min": 0.1, "rho": 5.0}, None, {}),  # Uniform takes no range
    ("Euler", "Exponential", {"rho": 5.0}, None, {}),  # no rho of its own
    ("Euler", "Beta", {}, None, {"Beta schedule alpha": 0.6, "Beta schedule beta": 0.6}),
    ("Euler", "Automatic", {"always_discard_next_to_last_sigma": True}, None, {"Discard penultimate sigma": True}),
    ("DPM2", "Automatic", {"always_discard_next_to_last_sigma": True}, None, {}),  # discards anyway
    ("UniPC", "Automatic", {"uni_pc_variant": "bh2", "uni_pc_order": 2}, None,
     {"UniPC variant": "bh2", "UniPC order": 2}),
])
def test_the_infotext_records_what_a1111_records(sampler, schedule, settings, eta, expected):
    assert SamplerSettings(**settings).infotext_parameters(sampler, schedule, eta, SD_RANGE) == expected


def test_infotext_keys_read_back_typed():
    text = ("a cat\nSteps: 20, Sampler: UniPC, Eta: 0.5, Eta DDIM: 0.25, Sigma churn: 1.5, Schedule rho: 5, "
            "Discard penultimate sigma: True, UniPC variant: bh2, UniPC order: 2, UniPC lower order final: False, "
            "Sigma noise: nan, Schedule max sigma: lots")
    assert from_infotext(parse_infotext(text)) == {
        "eta_ancestral": 0.5, "eta_ddim": 0.25, "s_churn": 1.5, "rho": 5.0, "always_discard_next_to_last_sigma": True,
        "uni_pc_variant": "bh2", "uni_pc_order": 2, "uni_pc_lower_order_final": False}


@pytest.mark.parametrize("settings, message", [
    ({"eta_ancestral": -1.0}, "eta_ancestral must be a finite number of 0 or more"),
    ({"s_noise": math.nan}, "s_noise must be a finite number"),
    ({"uni_pc_variant": "bh3"}, "uni_pc_variant must be one of: bh1, bh2, vary_coeff"),
    ({"beta_dist_alpha": 0.0}, "alpha and beta must be above 0"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(InputError, match=message):
        SamplerSettings(**settings).validate()


def test_schedule_settings_change_the_sigmas():
    alphas = schedules.scaled_linear_alphas_cumprod()
    run = k_sampling.KRun("DPM++ 2M", "Automatic", "sd1", 6, [(1, 0)], "CPU", None, False,
                          settings=SamplerSettings(sigma_max=10.0, sigma_min=0.1, rho=3.0))
    expected = schedules.sigmas(alphas, 6, "Karras", sigma_min=0.1, sigma_max=10.0, rho=3.0)
    assert torch.equal(k_sampling.schedule_for(run, alphas), expected)
    discard = k_sampling.KRun("DDIM", "Automatic", "sd1", 10, [(1, 0)], "CPU", None, False,
                              settings=SamplerSettings(always_discard_next_to_last_sigma=True))
    assert torch.equal(k_sampling.timesteps_for(discard)[0], schedules.compvis_timesteps(11))


BASE = dict(prompt="a red star", width=64, height=64, seed=21, steps=3, save_images=False)


def test_euler_a_at_eta_0_is_euler_and_says_so(sd1_manager):
    euler = generate(sd1_manager, GenerationRequest(**BASE, sampler="Euler")).images[0]
    ancestral = generate(sd1_manager, GenerationRequest(**BASE, sampler="Euler a",
                                                        sampler_settings=SamplerSettings(eta_ancestral=0.0))).images[0]
    assert np.array_equal(np.asarray(euler.image), np.asarray(ancestral.image))
    assert parse_infotext(ancestral.infotext)["Eta"] == "0"


def test_request_eta_must_be_a_finite_non_negative_number():
    with pytest.raises(InputError, match="eta must be a finite number of 0 or more"):
        GenerationRequest(prompt="x", eta=-0.5).validate()
