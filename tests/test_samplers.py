"""A1111 sampler names and schedule types -> diffusers schedulers."""

import diffusers
import pytest
import torch

from backend import model_detection, samplers
from backend.samplers import SamplerError

CASES = [
    # (sampler, schedule, expected sampler, expected schedule, scheduler class)
    ("DPM++ 2M", "Automatic", "DPM++ 2M", "Karras", diffusers.DPMSolverMultistepScheduler),
    ("DPM++ 2M Karras", "Automatic", "DPM++ 2M", "Karras", diffusers.DPMSolverMultistepScheduler),
    ("DPM++ 2M SDE Exponential", "Automatic", "DPM++ 2M SDE", "Exponential", diffusers.DPMSolverMultistepScheduler),
    ("Euler a", "Automatic", "Euler a", "Uniform", diffusers.EulerAncestralDiscreteScheduler),
    ("euler a", "sgm uniform", "Euler a", "SGM Uniform", diffusers.EulerAncestralDiscreteScheduler),
    ("k_euler", "Karras", "Euler", "Karras", diffusers.EulerDiscreteScheduler),
    ("DPM++ 3M SDE", "Automatic", "DPM++ 3M SDE", "Exponential", diffusers.DPMSolverMultistepScheduler),
    ("DDIM", "Automatic", "DDIM", "Uniform", diffusers.DDIMScheduler),
    ("PLMS", "Uniform", "PLMS", "Uniform", diffusers.PNDMScheduler),
    ("UniPC", "Automatic", "UniPC", "Uniform", diffusers.UniPCMultistepScheduler),
    ("LCM", "Automatic", "LCM", "Uniform", diffusers.LCMScheduler),
]


@pytest.mark.parametrize("name, schedule, expected, expected_schedule, cls", CASES)
def test_resolve_and_build(name, schedule, expected, expected_schedule, cls):
    sampler, resolved = samplers.resolve(name, schedule)
    assert (sampler.name, resolved) == (expected, expected_schedule)
    config = model_detection.family_config("sd1")["scheduler"]
    scheduler = samplers.make_scheduler(sampler, resolved, config, seed=1)
    assert type(scheduler) is cls
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) >= 10
    if resolved == "Karras":
        assert scheduler.config.use_karras_sigmas
    if cls is diffusers.DPMSolverMultistepScheduler:
        assert scheduler.config.algorithm_type == ("sde-dpmsolver++" if "SDE" in expected else "dpmsolver++")
        assert scheduler.config.solver_order == (3 if "3M" in expected else 2)


def test_every_listed_sampler_is_available():
    assert set(samplers.SAMPLER_NAMES) >= {
        "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
        "DPM++ 2S a", "DPM++ 3M SDE", "DDIM", "PLMS", "UniPC", "LCM"}


def test_v_prediction_and_zero_snr_reach_the_scheduler():
    config = dict(model_detection.family_config("sd1")["scheduler"], prediction_type="v_prediction",
                  rescale_betas_zero_snr=True)
    sampler, schedule = samplers.resolve("Euler")
    scheduler = samplers.make_scheduler(sampler, schedule, config)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    # Schedulers without the option get the same schedule as explicit betas.
    lms = samplers.make_scheduler(*samplers.resolve("LMS"), config)
    assert torch.allclose(lms.alphas_cumprod.double(), scheduler.alphas_cumprod.double(), rtol=1e-4, atol=1e-7)
    assert lms.alphas_cumprod[-1] > 0


@pytest.mark.parametrize("name, schedule, message", [
    ("Euler b", "Automatic", "unknown sampler 'Euler b'; available: DPM\\+\\+ 2M, "),
    ("Euler", "Polyexp", "unknown schedule type 'Polyexp'; available: Automatic, Uniform"),
    ("Euler a", "Karras", "Euler a does not support the Karras schedule; use Automatic or one of: Uniform, SGM"),
])
def test_errors_list_the_choices(name, schedule, message):
    with pytest.raises(SamplerError, match=message):
        samplers.resolve(name, schedule)


def test_dpmpp_2s_ancestral_follows_k_diffusion():
    """One step of our DPM++ 2S a against k-diffusion's formulas, written out here with a toy denoiser."""
    from backend.ancestral_scheduler import DPMSolverSinglestepAncestralScheduler

    config = model_detection.family_config("sd1")["scheduler"]
    scheduler = samplers.make_scheduler(*samplers.resolve("DPM++ 2S a"), config)
    assert isinstance(scheduler, DPMSolverSinglestepAncestralScheduler)
    scheduler.set_timesteps(5)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = lambda sample, sigma: 0.3 * sample / (sigma**2 + 1) ** 0.5  # noqa: E731  a toy epsilon model
    sigma, sigma_mid = scheduler.sigmas[0], scheduler.sigmas_interpol[0]
    sigma_up, sigma_down = scheduler.sigmas_up[0], scheduler.sigmas_down[0]
    generator = torch.Generator().manual_seed(7)
    t0, t_mid = scheduler.timesteps[0], scheduler.timesteps[1]
    x_mid = scheduler.step(eps(x, sigma), t0, x, generator=generator).prev_sample
    out = scheduler.step(eps(x_mid, sigma_mid), t_mid, x_mid, generator=generator).prev_sample
    # k-diffusion, by hand: t = -log(sigma), h = t_next - t, s = t + h/2
    denoised = x - sigma * eps(x, sigma)
    expected_mid = (sigma_mid / sigma) * x - torch.expm1(-(torch.log(sigma / sigma_down)) / 2) * denoised
    assert torch.allclose(x_mid, expected_mid, atol=1e-5)
    denoised_2 = x_mid - sigma_mid * eps(x_mid, sigma_mid)
    h = torch.log(sigma / sigma_down)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    expected = (sigma_down / sigma) * x - torch.expm1(-h) * denoised_2 + noise * sigma_up
    assert torch.allclose(out, expected, atol=1e-5)
