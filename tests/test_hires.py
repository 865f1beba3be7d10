"""Hires fix on tiny models: sizes, the second pass's steps, upscaler modes, prompts, infotext, control."""

import numpy as np
import pytest
from PIL import Image

from backend import hires
from backend.generation import generate
from backend.infotext import parse_infotext, request_fields
from backend.progress import JobControl
from backend.request import GenerationRequest, RequestError
from backend.upscalers import UpscalerError

SMALL = dict(prompt="a red star", width=64, height=64, steps=4, seed=5, save_images=False)


def hires_request(**fields) -> GenerationRequest:
    return GenerationRequest(**{**SMALL, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 3,
                                "denoising_strength": 0.7, **fields})


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


def test_latent_hires_makes_the_large_image_and_records_the_first_pass(sd1_manager):
    events = []
    result = generate(sd1_manager, hires_request(), JobControl(on_progress=events.append))
    image = result.images[0]
    assert image.image.size == (96, 96)
    params = parse_infotext(image.infotext)
    assert params["Size"] == "64x64"  # A1111 records the first pass's size
    assert params["Hires upscale"] == "1.5" and params["Hires steps"] == "3" and params["Hires upscaler"] == "Latent"
    assert params["Denoising strength"] == "0.7"
    # 4 first-pass steps, then the 3 hires steps (A1111 runs exactly the hires steps, of a schedule of
    # int(3 / 0.7) = 4); the bar never goes back
    assert [(e.phase, e.step, e.steps) for e in events] == [("", 1, 4), ("", 2, 4), ("", 3, 4), ("", 4, 4),
                                                            ("Hires", 1, 3), ("Hires", 2, 3), ("Hires", 3, 3)]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_infotext_pastes_back_into_the_same_request(sd1_manager):
    first = generate(sd1_manager, hires_request(hr_upscaler="Latent (bicubic antialiased)", hr_sampler="Euler"))
    fields = request_fields(parse_infotext(first.images[0].infotext))
    assert fields["enable_hr"] is True
    assert (fields["hr_scale"], fields["hr_second_pass_steps"], fields["hr_sampler"]) == (1.5, 3, "Euler")
    assert fields["hr_upscaler"] == "Latent (bicubic antialiased)"
    again = generate(sd1_manager, GenerationRequest(**{**fields, "save_images": False}))
    assert np.array_equal(pixels(first), pixels(again))
    plain = request_fields(parse_infotext(generate(sd1_manager, GenerationRequest(**SMALL)).images[0].infotext))
    assert plain["enable_hr"] is False


def test_upscaler_mode_decodes_upscales_and_encodes(sd1_manager):
    result = generate(sd1_manager, hires_request(hr_upscaler="Lanczos", hr_resize_x=128, hr_scale=2.0))
    image = result.images[0]
    assert image.image.size == (128, 128)  # width given, height keeps the aspect
    params = parse_infotext(image.infotext)
    assert params["Hires resize"] == "128x0" and "Hires upscale" not in params
    assert params["Hires upscaler"] == "Lanczos"
    latent = generate(sd1_manager, hires_request(hr_resize_x=128, hr_scale=2.0))
    assert not np.array_equal(pixels(result), pixels(latent))


def test_target_size_rounds_to_multiples_of_8():
    request = GenerationRequest(width=64, height=96, hr_scale=1.3)
    assert hires.target_size(request) == (80, 120)
    assert hires.target_size(request.with_changes(hr_resize_y=200)) == (128, 200)
    assert hires.target_size(request.with_changes(hr_resize_x=100, hr_resize_y=100)) == (96, 96)


def test_hires_prompt_changes_only_the_second_pass(sd1_manager):
    base = pixels(generate(sd1_manager, hires_request()))
    same = generate(sd1_manager, hires_request(hr_prompt="a red star"))
    other = generate(sd1_manager, hires_request(hr_prompt="a blue circle", hr_negative_prompt="red"))
    assert np.array_equal(base, pixels(same))
    assert np.abs(base - pixels(other)).max() > 0
    params = parse_infotext(other.images[0].infotext)
    assert params["Prompt"] == "a red star"
    assert params["Hires prompt"] == "a blue circle" and params["Hires negative prompt"] == "red"


def test_hires_sampler_is_used_and_recorded(sd1_manager):
    base = generate(sd1_manager, hires_request(sampler="Euler"))
    other = generate(sd1_manager, hires_request(sampler="Euler", hr_sampler="DDIM"))
    assert "Hires sampler" not in parse_infotext(base.images[0].infotext)
    assert parse_infotext(other.images[0].infotext)["Hires sampler"] == "DDIM"
    assert np.abs(pixels(base) - pixels(other)).max() > 0


def test_batch_images_each_get_their_own_second_pass(sd1_manager):
    batch = generate(sd1_manager, hires_request(batch_size=2))
    single = generate(sd1_manager, hires_request(seed=6))
    assert [i.image.size for i in batch.images] == [(96, 96)] * 2
    assert np.abs(np.asarray(batch.images[1].image, dtype=np.int16) - pixels(single)).max() <= 2


def test_img2img_ignores_hires_as_a1111_does(sd1_manager):
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    result = generate(sd1_manager, hires_request(init_image=init, denoising_strength=0.5))
    assert result.images[0].image.size == (64, 64)
    assert "Hires upscale" not in parse_infotext(result.images[0].infotext)


def test_interrupt_in_the_hires_pass_keeps_the_first_pass_image(sd1_manager):
    control = JobControl()
    control.on_progress = lambda p: control.interrupt() if p.phase == "Hires" else None
    result = generate(sd1_manager, hires_request(batch_count=2), control)
    assert result.interrupted and [i.image.size for i in result.images] == [(64, 64)]
    assert "first pass" in result.warnings[0]


def test_skip_in_the_hires_pass_drops_only_that_batch(sd1_manager):
    control = JobControl()
    control.on_progress = lambda p: control.skip() if (p.batch, p.phase) == (0, "Hires") else None
    result = generate(sd1_manager, hires_request(batch_count=2), control)
    assert not result.interrupted and result.seeds == [6]


@pytest.mark.parametrize("fields, error, message", [
    (dict(hr_upscaler="R-ESRGAN 9x"), UpscalerError, "R-ESRGAN 9x"),
    (dict(hr_upscaler="None"), RequestError, "hires upscaler is required"),
    (dict(hr_scale=0.5), RequestError, "hires upscale must be between 1 and 8"),
    (dict(hr_scale=80.0), RequestError, "hires upscale"),
    (dict(hr_resize_x=20), RequestError, "hr_resize_x must be 0"),
])
def test_bad_hires_settings_fail_before_denoising(sd1_manager, fields, error, message):
    control = JobControl()
    events = []
    control.on_progress = events.append
    with pytest.raises(error, match=message):
        generate(sd1_manager, hires_request(**fields), control)
    assert events == []
