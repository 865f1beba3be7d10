"""DDIM, DDIM CFG++, PLMS and LCM as A1111 v1.10 computes them (sd_samplers_timesteps_impl.py and
sd_samplers_lcm.py), against A1111's loops written out a second time here, plus their runs in Easel:
model calls, img2img's timesteps, inpainting's blend before the model, ENSD in the infotext."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend import k_samplers, k_sampling, schedules, timestep_samplers
from backend.generation import generate
from backend.infotext import parse_infotext, request_fields
from backend.request import GenerationRequest

ALPHAS = schedules.scaled_linear_alphas_cumprod()
SHAPE = (2, 4, 6, 6)


class ToyEps:
    """A guided noise prediction with a separate negative one, as CFGDenoiserTimesteps gives both."""

    def __init__(self, cfg=7.0, multiplier=1.0):
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.randn(4, 4, generator=generator) * 0.3
        self.cfg, self.multiplier, self.calls, self.last_uncond = cfg, multiplier, [], None

    def __call__(self, x, t):
        self.calls.append(float(t[0]))
        scale = t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        cond = torch.einsum("bchw,cd->bdhw", x, self.weights) * (1 - scale) + 0.1
        uncond = torch.tanh(x) * 0.25 * scale
        self.last_uncond = uncond
        return uncond + (cond - uncond) * (self.cfg * self.multiplier)


def start(seed=1):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def a1111_ddim(model, x, timesteps, eta=0.0, noise=None, cfgpp=False):
    """A1111's ddim / ddim_cfgpp loop: float32 step scalars from `.item()`, float64 previous alphas."""
    alphas = ALPHAS[timesteps]
    alphas_prev = ALPHAS[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * np.sqrt((1 - alphas_prev.numpy()) / (1 - alphas.numpy()) * (1 - alphas.numpy() / alphas_prev.numpy()))
    s_in, s_x = x.new_ones([x.shape[0]]), x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        direction = model.last_uncond if cfgpp else e_t
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        sigma_t, sqrt_one_minus_at = sigmas[index].item() * s_x, sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * direction
        x = a_prev.sqrt() * pred_x0 + dir_xt + (sigma_t * noise() if noise else 0)
    return x


def a1111_plms(model, x, timesteps):
    alphas = ALPHAS[timesteps]
    alphas_prev = ALPHAS[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in, s_x = x.new_ones([x.shape[0]]), x.new_ones((x.shape[0], 1, 1, 1))
    old_eps = []

    def x_prev_of(e_t, index):
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * s_x * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        if len(old_eps) == 0:
            e_prime = (e_t + model(x_prev_of(e_t, index), timesteps[max(index - 1, 0)].item() * s_in)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_new = x_prev_of(e_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_new
    return x


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 30])
def test_ddim_equals_a1111s_loop_and_makes_one_call_fewer_than_its_steps(steps):
    timesteps = schedules.compvis_timesteps(steps)
    ours_model, reference_model = ToyEps(), ToyEps()
    ours = timestep_samplers.sample_ddim(ours_model, start(), timesteps, ALPHAS)
    reference = a1111_ddim(reference_model, start(), timesteps)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert len(ours_model.calls) == len(timesteps) - 1  # 20 steps: 19 calls, from t=951 down to 51
    if steps == 20:
        assert ours_model.calls[0] == 951 and ours_model.calls[-1] == 51


def test_ddim_with_eta_draws_noise_each_step_as_a1111():
    timesteps = schedules.compvis_timesteps(10)
    draws = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)) for i in range(9)]
    ours_draws, reference_draws = iter(draws), iter(draws)
    ours = timestep_samplers.sample_ddim(ToyEps(), start(), timesteps, ALPHAS, lambda: next(ours_draws), eta=0.7)
    reference = a1111_ddim(ToyEps(), start(), timesteps, eta=0.7, noise=lambda: next(reference_draws))
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6)


def test_ddim_cfgpp_steps_along_the_negative_prediction():
    timesteps = schedules.compvis_timesteps(12)
    model = ToyEps(cfg=7.0, multiplier=timestep_samplers.CFGPP_SCALE)
    ours = timestep_samplers.sample_ddim(model, start(), timesteps, ALPHAS, uncond_direction=True)
    reference = a1111_ddim(ToyEps(cfg=7.0 / 12.5), start(), timesteps, cfgpp=True)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    plain = timestep_samplers.sample_ddim(ToyEps(cfg=7.0 / 12.5), start(), timesteps, ALPHAS)
    assert (ours - plain).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 20])
def test_plms_equals_a1111s_loop(steps):
    timesteps = schedules.compvis_timesteps(steps)
    model = ToyEps()
    ours = timestep_samplers.sample_plms(model, start(), timesteps, ALPHAS)
    torch.testing.assert_close(ours, a1111_plms(ToyEps(), start(), timesteps), rtol=0, atol=0)
    assert len(model.calls) == max(0, len(timesteps) - 1) + (1 if len(timesteps) > 1 else 0)


@pytest.mark.parametrize("steps, strength, fixed, expected_last, noised_to", [
    (20, 0.5, False, 451, 501),  # A1111 noises one entry above where it starts sampling
    (20, 0.75, False, 701, 751),
    (10, 0.3, True, 901, 1000),  # the hires fix: int(10 / 0.3) = 33 steps, t_enc 9
])
def test_img2img_timesteps_are_a1111s(steps, strength, fixed, expected_last, noised_to):
    run = k_sampling.KRun("DDIM", "Automatic", "sd1", steps, [(1, 0)], "CPU", strength, fixed)
    timesteps, start_t = k_sampling.timesteps_for(run)
    if fixed:
        full = schedules.compvis_timesteps(int(steps / strength))
        assert torch.equal(timesteps, full[: steps - 1]) and start_t == int(full[steps - 1])
    else:
        assert int(timesteps[-1]) == expected_last and start_t == noised_to


class RecordingUNet:
    """A model standing in for the UNet behind guidance: records inputs, predicts a fixed function."""

    def __init__(self, prediction_type="epsilon"):
        self.scheduler_config = {"prediction_type": prediction_type}
        self.dtype, self.device = torch.float32, torch.device("cpu")
        self.inputs = []


class Guide:
    keep_uncond = False

    def __init__(self, unet: RecordingUNet):
        self.unet = unet

    def predict(self, model_input, t, step):
        self.unet.inputs.append((model_input.clone(), float(t)))
        return model_input * 0.5 + t / 1000


def test_inpainting_blends_the_init_image_into_the_models_input_not_its_output():
    unet = RecordingUNet()
    init, mask = torch.full(SHAPE, 3.0), torch.zeros(SHAPE)
    mask[..., :3] = 1  # repaint the left half
    denoiser = k_sampling.TimestepDenoiser(unet, Guide(unet), ALPHAS, blend=(init, mask))
    x = start()
    eps = denoiser(x, torch.full((2,), 501.0))
    seen = unet.inputs[0][0]
    assert torch.equal(seen[..., 3:], init[..., 3:]) and torch.equal(seen[..., :3], x[..., :3])
    torch.testing.assert_close(eps, seen * 0.5 + 0.501)


def test_v_prediction_becomes_noise_at_the_whole_timestep():
    unet = RecordingUNet("v_prediction")
    denoiser = k_sampling.TimestepDenoiser(unet, Guide(unet), ALPHAS)
    x = start()
    eps = denoiser(x, torch.full((2,), 250.6))  # UniPC's fractional times: A1111 truncates for the conversion
    v = x * 0.5 + 0.2506
    alpha = ALPHAS[250]
    torch.testing.assert_close(eps, alpha.sqrt() * v + (1 - alpha).sqrt() * x)


def test_lcm_samples_as_a1111_with_its_boundary_scalings():
    table = schedules.SigmaTable.build(ALPHAS, lcm=True)
    sigmas = schedules.sigmas(ALPHAS, 4, sampler="LCM")
    unet = RecordingUNet()
    denoiser = k_sampling.SigmaDenoiser(unet, Guide(unet).predict, table)
    draws = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    it = iter(draws)
    x0 = start() * sigmas[0]
    out = k_samplers.sample("LCM", denoiser, x0, sigmas, noise_sampler=lambda s, n: next(it))
    # A1111's loop: whole LCM timesteps (index x 20 + 19) into the UNet, c_skip / c_out of t x 10
    x = x0
    for i in range(4):
        sigma = sigmas[i]
        t = int((sigma.log() - table.log_sigmas).abs().argmin()) * 20 + 19
        assert unet.inputs[i][1] == t
        eps = (x / (sigma**2 + 1) ** 0.5) * 0.5 + t / 1000
        scaled = t * 10.0
        x = scaled / (scaled**2 + 0.25) ** 0.5 * (x - eps * sigma) + 0.25 / (scaled**2 + 0.25) * x
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * draws[i]
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-5)
    assert [t for _, t in unet.inputs] == [999.0, 679.0, 339.0, 19.0]  # linspace(999, 19, 4), snapped to the table


def count_unet_calls(manager, request):
    model = manager.activate()
    calls = []
    handle = model.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        return generate(manager, request), calls
    finally:
        handle.remove()


BASE = dict(prompt="a red star", negative_prompt="blur", width=64, height=64, seed=11, save_images=False)


@pytest.mark.parametrize("sampler, steps, calls", [("DDIM", 20, 19), ("DDIM", 30, 30), ("PLMS", 10, 10),
                                                   ("DDIM CFG++", 8, 7), ("UniPC", 10, 10), ("LCM", 4, 4)])
def test_generation_makes_as_many_unet_calls_as_a1111(sd1_manager, sampler, steps, calls):
    result, batches = count_unet_calls(sd1_manager, GenerationRequest(**BASE, sampler=sampler, steps=steps))
    assert len(batches) == calls and set(batches) == {2}  # negative and positive together, every call
    assert 0 < np.asarray(result.images[0].image).mean() < 255


def test_ddim_cfgpp_keeps_the_negative_pass_at_cfg_1(sd1_manager):
    _, plain = count_unet_calls(sd1_manager, GenerationRequest(**BASE, sampler="DDIM", steps=4, cfg_scale=1))
    _, cfgpp = count_unet_calls(sd1_manager, GenerationRequest(**BASE, sampler="DDIM CFG++", steps=4, cfg_scale=1))
    assert set(plain) == {1} and set(cfgpp) == {2}


def test_ensd_changes_ancestral_images_and_travels_in_the_infotext(sd1_manager):
    request = dict(BASE, sampler="Euler a", steps=3)
    plain = generate(sd1_manager, GenerationRequest(**request)).images[0]
    ensd = generate(sd1_manager, GenerationRequest(**request, eta_noise_seed_delta=31337)).images[0]
    assert not np.array_equal(np.asarray(plain.image), np.asarray(ensd.image))
    assert parse_infotext(ensd.infotext)["ENSD"] == "31337" and "ENSD" not in parse_infotext(plain.infotext)
    pasted = request_fields(parse_infotext(ensd.infotext))
    assert pasted["eta_noise_seed_delta"] == 31337
    # a sampler without per-step noise: the same image, and no ENSD written (A1111's uses_ensd)
    euler = [generate(sd1_manager, GenerationRequest(**dict(request, sampler="Euler"), eta_noise_seed_delta=d))
             .images[0] for d in (0, 31337)]
    assert np.array_equal(np.asarray(euler[0].image), np.asarray(euler[1].image))
    assert "ENSD" not in parse_infotext(euler[1].infotext)


@pytest.mark.parametrize("sampler", ["DDIM", "DDIM CFG++", "PLMS", "UniPC"])
def test_img2img_with_timestep_samplers_runs_a1111s_share_of_the_steps(sd1_manager, sampler):
    from PIL import Image

    gradient = np.linspace(0, 255, 64, dtype=np.uint8)
    init = Image.fromarray(np.stack([np.tile(gradient, (64, 1))] * 3, axis=-1))
    request = GenerationRequest(**BASE, sampler=sampler, steps=10, init_image=init, denoising_strength=0.3)
    result, calls = count_unet_calls(sd1_manager, request)
    # A1111: int(0.3 x 10) = 3 timesteps kept; DDIM steps between them (2 calls), PLMS adds its extra first
    # call, UniPC makes one per timestep
    assert len(calls) == {"UniPC": 3, "PLMS": 3}.get(sampler, 2)
    assert 0 < np.asarray(result.images[0].image).mean() < 255
