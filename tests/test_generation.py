"""End-to-end generation on tiny models: samplers, seeds, batches, img2img, inpainting, control."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend import images, samplers, vae_codec
from backend.generation import generate
from backend.infotext import parse_infotext
from backend.progress import JobControl
from backend.request import GenerationRequest, RequestError
from backend.vae_codec import NonFiniteOutputError
from tests.conftest import install

SMALL = dict(width=64, height=64, steps=4, save_images=False)


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(result.images[index].image, dtype=np.int16)


def txt2img(manager, **fields):
    return generate(manager, GenerationRequest(**{"prompt": "a red star", **SMALL, **fields}))


@pytest.mark.parametrize("sampler", samplers.SAMPLER_NAMES)
def test_every_sampler_gives_finite_images_of_the_right_size(sd1_manager, sampler):
    result = txt2img(sd1_manager, sampler=sampler, width=64, height=96, seed=3)
    image = result.images[0].image
    assert image.size == (64, 96) and image.mode == "RGB"
    assert 0 < pixels(result).mean() < 255
    assert result.request.sampler == sampler


def test_schedule_types_change_the_result(sd1_manager):
    karras = pixels(txt2img(sd1_manager, sampler="Euler", schedule_type="Karras", seed=1))
    uniform = pixels(txt2img(sd1_manager, sampler="Euler", schedule_type="Uniform", seed=1))
    legacy = pixels(txt2img(sd1_manager, sampler="Euler Karras", seed=1))
    assert np.array_equal(karras, legacy)
    assert not np.array_equal(karras, uniform)


def test_same_request_gives_identical_pixels_and_another_seed_does_not(sd1_manager):
    a = pixels(txt2img(sd1_manager, seed=42))
    b = pixels(txt2img(sd1_manager, seed=42))
    c = pixels(txt2img(sd1_manager, seed=43))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE"])
def test_image_i_of_a_batch_equals_a_single_generation_with_seed_plus_i(sd1_manager, sampler):
    batch = txt2img(sd1_manager, sampler=sampler, seed=100, batch_size=3)
    assert batch.seeds == [100, 101, 102]
    for i in range(3):
        single = txt2img(sd1_manager, sampler=sampler, seed=100 + i)
        # The UNet runs batched vs alone: allow one level of float rounding, nothing more.
        assert np.abs(pixels(batch, i) - pixels(single)).max() <= 1, i


def test_batch_count_continues_the_seeds(sd1_manager):
    result = txt2img(sd1_manager, seed=7, batch_size=2, batch_count=2)
    assert result.seeds == [7, 8, 9, 10]


def test_random_seed_is_resolved_and_reported(sd1_manager):
    result = generate(sd1_manager, GenerationRequest(prompt="x", seed=-1, **SMALL), rng=random.Random(5))
    expected = random.Random(5).randrange(0, 2**32 - 1)
    assert result.request.seed == expected and result.seeds == [expected]
    assert f"Seed: {expected}," in result.images[0].infotext


def test_variation_seed(sd1_manager):
    base = pixels(txt2img(sd1_manager, sampler="Euler", seed=10))
    other = pixels(txt2img(sd1_manager, sampler="Euler", seed=11))
    zero = txt2img(sd1_manager, sampler="Euler", seed=10, subseed=11, subseed_strength=0.0)
    half = txt2img(sd1_manager, sampler="Euler", seed=10, subseed=11, subseed_strength=0.5)
    full = txt2img(sd1_manager, sampler="Euler", seed=10, subseed=11, subseed_strength=1.0)
    assert np.array_equal(pixels(zero), base)
    assert np.abs(pixels(full) - other).max() <= 1  # all the way to the variation seed's noise
    assert np.abs(pixels(half) - base).max() > 0 and np.abs(pixels(half) - other).max() > 0
    text = parse_infotext(half.images[0].infotext)
    assert (text["Seed"], text["Variation seed"], text["Variation seed strength"]) == ("10", "11", "0.5")
    batch = txt2img(sd1_manager, sampler="Euler", seed=10, subseed=11, subseed_strength=0.5, batch_size=2)
    assert [(i.seed, i.subseed) for i in batch.images] == [(10, 11), (10, 12)]


def make_input(size=64) -> Image.Image:
    image = Image.new("RGB", (size, size), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((12, 12, 52, 52), fill=(230, 40, 30))
    draw.rectangle((0, 0, 20, 20), fill=(250, 250, 0))
    return image


def test_img2img_runs_the_strength_share_of_steps_and_stays_near_the_input(sd1_manager, monkeypatch):
    """Measured in latent space: the tiny model's random VAE amplifies any latent change in pixels."""
    source = make_input()
    model = sd1_manager.activate()
    init = vae_codec.encode(model, images.to_tensor(source)[None])
    final, calls = {}, []
    decode = vae_codec.decode
    monkeypatch.setattr(vae_codec, "decode", lambda m, latents, *rest: final.update(x=latents) or decode(m, latents, *rest))
    hook = model.unet.register_forward_hook(lambda *args: calls.append(1))
    deviation = {}
    for strength in (0.1, 0.3, 1.0):
        calls.clear()
        generate(sd1_manager, GenerationRequest(
            prompt="a red star", init_image=source, denoising_strength=strength, sampler="Euler", seed=1,
            steps=20, width=64, height=64, save_images=False))
        assert len(calls) == int(20 * min(strength, 0.999)) + 1  # A1111: t_enc + 1 steps (1.0: all 20)
        deviation[strength] = (final["x"] - init).abs().mean().item()
    hook.remove()
    assert deviation[0.1] < deviation[0.3] < deviation[1.0]
    assert deviation[0.1] < 0.05 * deviation[1.0]
    assert "Denoising strength: 0.1," in generate(sd1_manager, GenerationRequest(
        prompt="x", init_image=source, denoising_strength=0.1, seed=1, **SMALL)).images[0].infotext


def circle_mask(size=64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((24, 24, 40, 40), fill=255)
    return mask


@pytest.mark.parametrize("area", ["Whole picture", "Only masked"])
@pytest.mark.parametrize("content", ["original", "fill", "latent noise", "latent nothing"])
def test_inpainting_leaves_pixels_outside_the_mask_untouched(sd1_manager, area, content):
    source = make_input()
    result = generate(sd1_manager, GenerationRequest(
        prompt="a cat", init_image=source, mask=circle_mask(), mask_blur=2, inpaint_area=area,
        masked_content=content, denoising_strength=0.9, seed=5, **SMALL))
    out, original = pixels(result), np.asarray(source, dtype=np.int16)
    outside = np.ones((64, 64), dtype=bool)
    outside[16:49, 16:49] = False  # the mask (24..40) plus well beyond its blur
    assert np.array_equal(out[outside], original[outside])
    assert np.abs(out[28:37, 28:37] - original[28:37, 28:37]).mean() > 5
    text = parse_infotext(result.images[0].infotext)
    assert text["Mask blur"] == "2"


def test_inverted_mask_repaints_the_outside(sd1_manager):
    source = make_input()
    result = generate(sd1_manager, GenerationRequest(
        prompt="a cat", init_image=source, mask=circle_mask(), mask_blur=0, invert_mask=True, seed=5, **SMALL))
    out, original = pixels(result), np.asarray(source, dtype=np.int16)
    assert np.array_equal(out[28:37, 28:37], original[28:37, 28:37])
    assert np.abs(out[:8] - original[:8]).mean() > 5


def test_inpainting_model_uses_its_extra_channels(settings, model_files):
    from backend.model_manager import ModelManager

    install(settings, model_files["sd1-inpaint"])
    manager = ModelManager(settings)
    source = make_input()
    result = generate(manager, GenerationRequest(prompt="a cat", init_image=source, mask=circle_mask(),
                                                 mask_blur=0, seed=5, **SMALL))
    assert manager.active.is_inpainting
    out, original = pixels(result), np.asarray(source, dtype=np.int16)
    assert np.array_equal(out[:16], original[:16])
    assert txt2img(manager, seed=1).images[0].image.size == (64, 64)


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_other_families_generate(settings, model_files, name):
    from backend.model_manager import ModelManager

    install(settings, model_files[name])
    manager = ModelManager(settings)
    result = txt2img(manager, seed=9, batch_size=2, negative_prompt="blurry")
    assert manager.active.family == name
    assert [i.image.size for i in result.images] == [(64, 64), (64, 64)]
    assert np.abs(pixels(result, 0) - pixels(result, 1)).max() > 0
    img2img = generate(manager, GenerationRequest(prompt="x", init_image=make_input(), seed=1, **SMALL))
    assert img2img.images[0].image.size == (64, 64)


def test_progress_is_reported_every_step_with_previews(sd1_manager):
    events = []
    control = JobControl(on_progress=events.append, preview_every=2)
    generate(sd1_manager, GenerationRequest(prompt="x", seed=1, batch_count=2, **SMALL), control)
    assert [(e.batch, e.step) for e in events] == [(b, s) for b in range(2) for s in range(1, 5)]
    assert [e.preview is not None for e in events[:4]] == [False, True, False, True]
    assert events[-1].fraction == 1.0
    assert events[1].preview.size == (32, 32)


def test_interrupt_keeps_finished_images(sd1_manager):
    control = JobControl()
    control.on_progress = lambda p: control.interrupt() if (p.batch, p.step) == (1, 2) else None
    result = generate(sd1_manager, GenerationRequest(prompt="x", seed=1, batch_count=3, **SMALL), control)
    assert result.interrupted and result.seeds == [1]


def test_skip_abandons_only_the_current_batch(sd1_manager):
    control = JobControl()
    control.on_progress = lambda p: control.skip() if (p.batch, p.step) == (0, 2) else None
    result = generate(sd1_manager, GenerationRequest(prompt="x", seed=1, batch_count=3, **SMALL), control)
    assert not result.interrupted and result.seeds == [2, 3]


def test_a_skip_that_leaves_no_image_says_so(sd1_manager):
    control = JobControl()
    control.on_progress = lambda p: control.skip() if p.step == 1 else None  # every batch
    result = generate(sd1_manager, GenerationRequest(prompt="x", seed=1, batch_count=2, **SMALL), control)
    assert result.images == [] and not result.interrupted
    assert result.warnings == ["skipped before the first image finished: no image was made"]


def test_an_interrupt_before_the_first_image_says_so(sd1_manager):
    control = JobControl()
    control.interrupt()
    result = generate(sd1_manager, GenerationRequest(prompt="x", seed=1, **SMALL), control)
    assert result.images == [] and result.interrupted
    assert result.warnings == ["interrupted before the first image finished: no image was made"]


def test_a_skip_after_an_image_adds_no_warning(sd1_manager):
    control = JobControl()
    control.on_progress = lambda p: control.skip() if (p.batch, p.step) == (1, 1) else None
    result = generate(sd1_manager, GenerationRequest(prompt="x", seed=1, batch_count=2, **SMALL), control)
    assert result.seeds == [1] and result.warnings == []


def test_nan_output_is_an_error_with_the_remedy(sd1_manager):
    unet = sd1_manager.activate().unet

    def poison(module, args, output):
        return type(output)(sample=output.sample * float("nan"))

    handle = unet.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteOutputError, match="--no-half"):
            txt2img(sd1_manager, seed=1)
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(width=65), "width must be a multiple of 8 .* try 64"),
        (dict(height=8192), "height must be a multiple of 8 between 64 and 4096"),
        (dict(steps=0), "steps must be between 1"),
        (dict(batch_size=0), "batch size"),
        (dict(denoising_strength=1.5), "denoising strength"),
        (dict(sampler="Euler b"), "unknown sampler 'Euler b'; available: DPM\\+\\+ 2M"),
        (dict(sampler="DDIM", schedule_type="Karas"), "unknown schedule type 'Karas'; available: Automatic"),
        (dict(mask=Image.new("L", (64, 64))), "a mask needs an init image"),
    ],
)
def test_bad_requests_get_clear_errors(sd1_manager, fields, message):
    with pytest.raises((RequestError, samplers.SamplerError), match=message):
        txt2img(sd1_manager, **fields)


def test_default_size_is_the_models_native_size(sd1_manager):
    request = GenerationRequest(prompt="x", steps=1, save_images=False)
    model = sd1_manager.activate()
    assert model.native_size == 512
    # The run request records the size that was used (checked without running 512x512).
    with pytest.raises(RequestError):
        generate(sd1_manager, request.with_changes(width=60))


def test_saved_png_carries_the_infotext(sd1_manager):
    result = generate(sd1_manager, GenerationRequest(prompt="a (red) star, big", negative_prompt="blurry",
                                                     seed=77, width=64, height=64, steps=3, clip_skip=2))
    path = result.paths[0]
    assert path.name == "00000-77.png" and path.parent.parent.name == "txt2img-images"
    text = Image.open(path).info["parameters"]
    assert text == result.images[0].infotext
    parsed = parse_infotext(text)
    model = sd1_manager.active
    assert parsed["Prompt"] == "a (red) star, big" and parsed["Negative prompt"] == "blurry"
    assert (parsed["Steps"], parsed["Sampler"], parsed["Schedule type"], parsed["Seed"]) == (
        "3", "DPM++ 2M", "Karras", "77")
    assert (parsed["Size-1"], parsed["Model hash"], parsed["Model"]) == ("64", model.model_hash, "tiny-sd1")
    assert parsed["Clip skip"] == "2"
    assert torch.is_tensor(model.unet.conv_in.weight)


def test_vae_file_is_named_in_the_infotext_as_a1111_does(settings, model_files, tiny_models):
    from safetensors.torch import save_file

    from backend import ldm_layout
    from backend.model_manager import ModelManager

    install(settings, model_files["sd1"])
    vae_dir = settings.model_dir("vae")
    vae_dir.mkdir(parents=True)
    state = ldm_layout.vae_to_ldm(tiny_models["sd1"]["vae"].state_dict(), prefix="")
    save_file({k: v.contiguous() for k, v in state.items()}, vae_dir / "vae-ft-mse.safetensors")
    manager = ModelManager(settings)
    result = txt2img(manager, seed=1, vae="vae-ft-mse.safetensors")
    parsed = parse_infotext(result.images[0].infotext)
    assert parsed["VAE"] == "vae-ft-mse.safetensors" and parsed["VAE hash"] == manager.active.vae_hash
    assert "VAE" not in parse_infotext(txt2img(manager, seed=1, vae="None").images[0].infotext)
