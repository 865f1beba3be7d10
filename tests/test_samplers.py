"""A1111 sampler names and schedule types: k-diffusion samplers (run by backend.k_sampling) and the
timestep samplers behind diffusers schedulers."""

import diffusers
import pytest
import torch

from backend import model_detection, samplers
from backend.samplers import K_DIFFUSION, SamplerError

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
def test_resolve_k_diffusion_samplers(name, schedule, expected, expected_schedule):
    sampler, resolved = samplers.resolve(name, schedule)
    assert (sampler.name, resolved, sampler.scheduler) == (expected, expected_schedule, K_DIFFUSION)
    with pytest.raises(ValueError, match="k-diffusion sampler"):
        samplers.make_scheduler(sampler, resolved, model_detection.family_config("sd1")["scheduler"])


@pytest.mark.parametrize("name, cls", [("DDIM", diffusers.DDIMScheduler), ("PLMS", diffusers.PNDMScheduler),
                                       ("UniPC", diffusers.UniPCMultistepScheduler), ("LCM", diffusers.LCMScheduler)])
def test_timestep_samplers_build_their_diffusers_scheduler(name, cls):
    sampler, resolved = samplers.resolve(name, "Automatic")
    assert (sampler.name, resolved) == (name, "Uniform")
    scheduler = samplers.make_scheduler(sampler, resolved, model_detection.family_config("sd1")["scheduler"], seed=1)
    assert type(scheduler) is cls
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) >= 10


def test_every_a1111_sampler_and_schedule_type_is_listed():
    assert samplers.SAMPLER_NAMES == (
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
        "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "PLMS", "UniPC",
        "LCM")
    assert samplers.SCHEDULE_TYPES == ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential",
                                       "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM",
                                       "Beta")


def test_v_prediction_and_zero_snr_reach_a_timestep_scheduler():
    config = dict(model_detection.family_config("sd1")["scheduler"], prediction_type="v_prediction",
                  rescale_betas_zero_snr=True)
    scheduler = samplers.make_scheduler(*samplers.resolve("DDIM"), config)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    unipc = samplers.make_scheduler(*samplers.resolve("UniPC"), config)
    assert torch.allclose(unipc.alphas_cumprod.double(), scheduler.alphas_cumprod.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, schedule, message", [
    ("Euler b", "Automatic", "unknown sampler 'Euler b'; available: DPM\\+\\+ 2M, "),
    ("Euler", "Polyexp", "unknown schedule type 'Polyexp'; available: Automatic, Uniform"),
    ("DDIM", "Karras", "DDIM does not support the Karras schedule; use Automatic or one of: Uniform"),
])
def test_errors_list_the_choices(name, schedule, message):
    with pytest.raises(SamplerError, match=message):
        samplers.resolve(name, schedule)
