"""A1111 sampler names and schedule types as the UI, the API and infotexts give them."""

import pytest

from backend import k_sampling, samplers
from backend.samplers import SamplerError

CASES = [
    # (sampler, schedule, expected sampler, the schedule type A1111 writes)
    ("DPM++ 2M", "Automatic", "DPM++ 2M", "Karras"),
    ("DPM++ 2M Karras", "Automatic", "DPM++ 2M", "Karras"),
    ("DPM++ 2M SDE Exponential", "Automatic", "DPM++ 2M SDE", "Exponential"),
    ("DPM++ 2M SDE", "Automatic", "DPM++ 2M SDE", "Exponential"),  # A1111's Automatic, not Karras
    ("Euler a", "Automatic", "Euler a", "Automatic"),  # no default of its own: A1111 writes Automatic
    ("euler a", "sgm uniform", "Euler a", "SGM Uniform"),
    ("k_euler", "Karras", "Euler", "Karras"),
    ("Euler a", "Karras", "Euler a", "Karras"),
    ("Heun", "Align Your Steps", "Heun", "Align Your Steps"),
    ("Restart", "Automatic", "Restart", "Karras"),
    ("DPM++ 3M SDE", "Automatic", "DPM++ 3M SDE", "Exponential"),
    ("DPM fast", "Beta", "DPM fast", "Beta"),
]


@pytest.mark.parametrize("name, schedule, expected, expected_schedule", CASES)
def test_resolve_gives_the_sampler_and_the_schedule_type_a1111_writes(name, schedule, expected, expected_schedule):
    sampler, resolved = samplers.resolve(name, schedule)
    assert (sampler.name, resolved) == (expected, expected_schedule)


@pytest.mark.parametrize("name", ["DDIM", "ddim_cfgpp", "PLMS", "UniPC"])
def test_timestep_samplers_accept_and_ignore_any_schedule_type_as_a1111_does(name):
    sampler, resolved = samplers.resolve(name, "Karras")
    assert resolved == "Karras" and k_sampling.uses_timesteps(sampler.name)
    assert samplers.resolve(name)[1] == "Automatic"


def test_every_a1111_sampler_and_schedule_type_is_listed():
    assert samplers.SAMPLER_NAMES == (
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
        "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
        "PLMS", "UniPC", "LCM")
    assert samplers.SCHEDULE_TYPES == ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential",
                                       "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM",
                                       "Beta")


@pytest.mark.parametrize("name, schedule, message", [
    ("Euler b", "Automatic", "unknown sampler 'Euler b'; available: DPM\\+\\+ 2M, "),
    ("Euler", "Polyexp", "unknown schedule type 'Polyexp'; available: Automatic, Uniform"),
])
def test_errors_list_the_choices(name, schedule, message):
    with pytest.raises(SamplerError, match=message):
        samplers.resolve(name, schedule)
