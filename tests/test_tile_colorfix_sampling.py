"""tile_colorfix and tile_colorfix+sharp during sampling (backend.tile_colorfix, control_pass.color_fixed): the
prediction <-> clean latent conversions for epsilon and v models, the fix on the rounded timestep's alpha, and
whole generations with a tiny ControlNet whose final latents take the control image's low frequencies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from backend import control_pass, denoiser, images, random_controlnets, schedules, vae_codec
from backend.control_units import ControlUnit
from backend.generation import generate
from backend.request import GenerationRequest
from backend.tile_colorfix import (
    ColorFix,
    box_blur,
    clean_from_prediction,
    color_fixed_noise,
    color_fixed_prediction,
    prediction_from_clean,
)

ALPHAS = [schedules.ZTSNR_LAST_ALPHA_CUMPROD, 0.0047, 0.5, 0.99915]  # t=999 under ZTSNR and as trained, t=0


def tensors(seed: int, count: int, dtype=torch.float64, side: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, side, side, generator=generator, dtype=dtype) for _ in range(count)]


# -- the conversions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_prediction_to_clean_latent_and_back_is_exact(kind, alpha):
    prediction, x_t = tensors(0, 2)
    a = torch.tensor(alpha, dtype=torch.float64)
    x0 = clean_from_prediction(prediction, x_t, a, kind)
    assert torch.allclose(prediction_from_clean(x0, x_t, a, kind), prediction, rtol=0, atol=1e-9)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_v_and_epsilon_imply_the_same_clean_latent(alpha):
    v, x_t = tensors(1, 2)
    a = torch.tensor(alpha, dtype=torch.float64)
    eps = a.sqrt() * v + (1 - a).sqrt() * x_t
    # and back, as the brief writes it: v = (eps - sqrt(1 - a) x_t) / sqrt(a)
    assert torch.allclose((eps - (1 - a).sqrt() * x_t) / a.sqrt(), v, rtol=0, atol=1e-6)
    x0 = clean_from_prediction(v, x_t, a, "v_prediction")
    assert torch.allclose(x0, clean_from_prediction(eps, x_t, a, "epsilon"), rtol=0, atol=1e-6)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0047, 0.5, 0.99])
def test_a_v_model_gets_the_fix_an_epsilon_model_gets_for_the_same_clean_latent(alpha):
    v, x_t, control = tensors(2, 3, torch.float32)
    a = torch.tensor(alpha)
    eps = a.sqrt() * v + (1 - a).sqrt() * x_t
    for weight in (1.0, 0.4):
        fixed_v = color_fixed_prediction(v, x_t, alpha, control, 2, weight, prediction_type="v_prediction")
        fixed_eps = color_fixed_noise(eps, x_t, alpha, control, 2, weight)
        assert torch.allclose(a.sqrt() * fixed_v + (1 - a).sqrt() * x_t, fixed_eps, atol=1e-4)
        assert not torch.allclose(fixed_v, v, atol=1e-2)


def test_a_v_model_is_fixed_at_zero_terminal_snr_where_its_clean_latent_is_minus_v():
    v, x_t, control = tensors(3, 3, torch.float32)
    alpha = schedules.ZTSNR_LAST_ALPHA_CUMPROD
    fixed = color_fixed_prediction(v, x_t, alpha, control, 2, 1.0, prediction_type="v_prediction")
    assert torch.isfinite(fixed).all()
    x0 = clean_from_prediction(fixed, x_t, torch.tensor(alpha), "v_prediction")
    expected = -v - box_blur(-v, 2) + box_blur(control, 2)
    assert torch.allclose(x0, expected, atol=1e-3)


def colorfix(sharpness=None, kind="epsilon", alphas=None) -> ColorFix:
    control = torch.full((1, 4, 8, 8), 0.5)
    return ColorFix(control, 2, 1.0, sharpness, torch.linspace(0.99, 0.01, 1000) if alphas is None else alphas, kind)


@pytest.mark.parametrize("t, index", [(499.4, 499), (499.6, 500), (torch.tensor([12.5]), 12), (0.2, 0), (1200.0, 999),
                                      (-3.0, 0)])
def test_the_alpha_is_the_rounded_timesteps(t, index):
    fix = colorfix()
    assert fix.alpha_at(t) == float(fix.alphas_cumprod[index])


def test_apply_blurs_the_negative_rows_for_sharp_and_keeps_the_prediction_where_alpha_is_0_or_1():
    prediction, sample = tensors(4, 2, torch.float32)
    plain = colorfix().apply(prediction, sample, 500.0, slice(0, 1))
    sharp = colorfix(sharpness=2.0).apply(prediction, sample, 500.0, slice(0, 1))
    assert torch.equal(sharp[1], plain[1])  # the prompt's row
    assert (sharp[0] - plain[0]).abs().max() > 1e-3  # the negative prompt's row
    assert torch.equal(colorfix(sharpness=2.0).apply(prediction, sample, 500.0, None), plain)  # no negative rows
    # an inpainting model's input: its first 4 channels are x_t
    wide = torch.cat([sample, torch.ones(2, 5, 8, 8)], dim=1)
    assert torch.equal(colorfix().apply(prediction, wide, 500.0, None), colorfix().apply(prediction, sample, 500.0, None))
    ends = torch.tensor([0.0] * 500 + [1.0] * 500)
    assert torch.equal(colorfix(alphas=ends).apply(prediction, sample, 10.0, None), prediction)
    assert torch.equal(colorfix(alphas=ends).apply(prediction, sample, 900.0, None), prediction)


def test_a_units_mask_confines_the_fix_and_units_without_one_leave_the_prediction_alone():
    prediction, sample = tensors(6, 2, torch.float32)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1  # the left half
    tile = ControlUnit("tile", "tile_colorfix")
    masked = control_pass.ActiveControl(tile, None, None, mask, False, colorfix=colorfix())
    out = control_pass.color_fixed([masked], prediction, sample, 500.0, None)
    full = colorfix().apply(prediction, sample, 500.0, None)
    assert torch.allclose(out[..., :4], full[..., :4], atol=1e-6) and torch.equal(out[..., 4:], prediction[..., 4:])
    other = control_pass.ActiveControl(ControlUnit("canny", "canny"), None, None, None, False)
    assert control_pass.color_fixed([other], prediction, sample, 500.0, None) is prediction


# -- whole generations --------------------------------------------------------------------------------
def two_colours(size=(64, 64)) -> Image.Image:
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:, : size[0] // 2] = (220, 40, 30)
    array[:, size[0] // 2 :] = (20, 60, 230)
    return Image.fromarray(array)


@pytest.fixture
def manager(sd1_manager):
    folder = sd1_manager.settings.model_dir("controlnet")
    folder.mkdir(parents=True, exist_ok=True)
    unet = sd1_manager.activate(None).unet  # a hint at the image's size (the tiny VAE downsamples 2x)
    random_controlnets.save_lllyasviel(random_controlnets.for_unet(unet, 3, (16, 32)), folder / "tiny_tile.safetensors")
    random_controlnets.save_lllyasviel(random_controlnets.build("sd1", seed=1), folder / "tiny_tile8.safetensors")
    sd1_manager.controlnets.library.refresh()
    return sd1_manager


BASE = dict(prompt="a flag", negative_prompt="blur", width=64, height=64, steps=3, seed=5, save_images=False,
            sampler="Euler", cfg_scale=5.0)


def unit(module="tile_colorfix", **fields) -> ControlUnit:
    return ControlUnit("tiny_tile", module, two_colours(), **{"threshold_a": 3.0, **fields})


def final_latents(manager, monkeypatch, *units, **fields) -> torch.Tensor:
    found = []
    real = denoiser.denoise

    def recording(*args, **kwargs):
        found.append(real(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(denoiser, "denoise", recording)
    generate(manager, GenerationRequest(**{**BASE, **fields}, control_units=tuple(units)))
    monkeypatch.setattr(denoiser, "denoise", real)
    return found[-1].float()


def colour_distance(manager, latents: torch.Tensor, radius: int = 8) -> float:
    """The mean distance of the latents' low frequencies from the control image's, on a wider window than the
    fix's (variation 3): the fix leaves blur(x0) - blur(blur(x0)) of the UNet's own, which this one smooths."""
    control = vae_codec.encode(manager.activate(None), images.to_tensor(two_colours())[None]).float()
    return float((box_blur(latents, radius) - box_blur(control, radius)).abs().mean())


def test_colorfix_pulls_the_low_frequencies_to_the_control_images_and_resample_does_not(manager, monkeypatch):
    fixed = final_latents(manager, monkeypatch, unit())
    resampled = final_latents(manager, monkeypatch, unit("tile_resample"))
    plain = final_latents(manager, monkeypatch)
    assert colour_distance(manager, fixed) < 0.25 * colour_distance(manager, resampled)
    assert colour_distance(manager, resampled) > 0.5 * colour_distance(manager, plain)
    # the detail is the generation's own: fixed minus its blur is not the control image's
    assert (fixed - box_blur(fixed, 8)).abs().mean() > 0.05
    # weight 0 is no unit at all
    assert torch.equal(final_latents(manager, monkeypatch, unit(weight=0.0)), plain)


def test_a_v_prediction_model_with_zero_terminal_snr_is_fixed_too(manager, monkeypatch):
    config = manager.activate(None).scheduler_config
    monkeypatch.setitem(config, "prediction_type", "v_prediction")
    monkeypatch.setitem(config, "rescale_betas_zero_snr", True)
    fixed = final_latents(manager, monkeypatch, unit())
    resampled = final_latents(manager, monkeypatch, unit("tile_resample"))
    assert torch.isfinite(fixed).all()
    assert colour_distance(manager, fixed) < 0.25 * colour_distance(manager, resampled)
    # the first call, t=999 (alpha 4.9e-8): x0 = sqrt(a) x_t - sqrt(1 - a) v is about -v and takes the control's
    # low frequencies (read as epsilon, v would imply x0 = (x_t - v) / 2.2e-4 and barely move)
    (active,), _ = control_pass.prepare((unit(),), manager.controlnets, manager.activate(None), (64, 64), None, False)
    fix = active.colorfix
    assert fix.prediction_type == "v_prediction" and fix.alpha_at(999.0) == pytest.approx(4.8973e-08, rel=1e-4)
    v, x_t = tensors(5, 2, torch.float32, side=32)
    x0 = clean_from_prediction(fix.apply(v, x_t, 999.0, None), x_t, torch.tensor(fix.alpha_at(999.0)), "v_prediction")
    assert torch.allclose(x0, -v - box_blur(-v, 3) + box_blur(fix.control_latent.float(), 3), atol=1e-3)


def test_sharp_differs_from_plain_colorfix_only_through_the_negative_prompts_rows(manager, monkeypatch):
    plain = final_latents(manager, monkeypatch, unit())
    sharp = final_latents(manager, monkeypatch, unit("tile_colorfix+sharp", threshold_b=2.0))
    assert (sharp - plain).abs().mean() > 1e-3
    # at CFG 1 there is no negative prompt to blur: +sharp is plain tile_colorfix
    at_one = final_latents(manager, monkeypatch, unit(), cfg_scale=1.0)
    assert torch.equal(final_latents(manager, monkeypatch, unit("tile_colorfix+sharp", threshold_b=2.0), cfg_scale=1.0),
                       at_one)


def test_the_guidance_range_stops_the_controlnet_but_the_fix_runs_at_every_step(manager, monkeypatch):
    # 3 steps: fractions 0, 1/3, 2/3, none inside [0.9, 1]: the ControlNet never acts
    late = dict(guidance_start=0.9, guidance_end=1.0)
    plain = final_latents(manager, monkeypatch)
    assert torch.equal(final_latents(manager, monkeypatch, unit("tile_resample", **late)), plain)
    outside = final_latents(manager, monkeypatch, unit(**late))
    assert colour_distance(manager, outside) < 0.25 * colour_distance(manager, plain)  # sd-webui-controlnet's way
    inside = final_latents(manager, monkeypatch, unit())
    assert (inside - outside).abs().mean() > 1e-3  # with the ControlNet acting


def test_prepare_encodes_the_control_image_at_the_latents_size_and_doubles_the_variation_in_hires(manager):
    model = manager.activate(None)
    teal = Image.new("RGB", (40, 40), (30, 160, 150))  # one colour: any resizing keeps it
    units = (ControlUnit("tiny_tile8", "tile_colorfix", teal, threshold_a=5.0),
             ControlUnit("tiny_tile", "tile_colorfix+sharp", two_colours(), threshold_b=1.5),
             ControlUnit("tiny_tile", "tile_resample", two_colours()))
    first, _ = control_pass.prepare(units, manager.controlnets, model, (64, 64), None, False)
    hires, _ = control_pass.prepare(units, manager.controlnets, model, (64, 64), None, True)
    # a ControlNet whose hint is 8x the latents' size (resized for the VAE), and one whose hint is the image's
    for active, image in ((first[0], teal.resize((64, 64))), (first[1], two_colours())):
        expected = vae_codec.encode(model, images.to_tensor(image)[None])
        assert active.colorfix.control_latent.shape == (1, 4, 32, 32)
        assert torch.allclose(active.colorfix.control_latent, expected, atol=1e-4)
    assert (first[0].colorfix.variation, hires[0].colorfix.variation) == (5, 10)
    assert (first[1].colorfix.variation, first[1].colorfix.sharpness) == (8, 1.5)  # the default variation
    assert first[0].colorfix.sharpness is None and first[2].colorfix is None
    assert first[0].colorfix.prediction_type == model.scheduler_config.get("prediction_type", "epsilon")
