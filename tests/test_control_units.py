"""ControlNet units in generation (backend.control_units): residuals as sd-webui-controlnet scales and
confines them, and whole generations with tiny ControlNets written in the formats users have."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend import random_controlnets
from backend.control_pass import ActiveControl, SamplingProgress, residuals
from backend.control_units import ControlError, ControlUnit, infotext_parameters, units_from_infotext
from backend.generation import generate
from backend.infotext import parse_infotext
from backend.request import GenerationRequest, RequestError


class ConstantNet:
    """Residuals of ones (12 down, 1 mid) whatever the input; counts its calls."""

    def __init__(self, value: float = 1.0):
        self.value, self.calls = value, 0

    def __call__(self, sample, t, encoder_hidden_states, controlnet_cond, added_cond_kwargs, return_dict):
        self.calls += 1
        shape = (sample.shape[0], 2, 4, 4)
        return [torch.full(shape, self.value) for _ in range(12)], torch.full(shape, self.value)


def active(unit: ControlUnit, net=None, mask=None, soft=False) -> ActiveControl:
    return ActiveControl(unit, net or ConstantNet(), torch.zeros(1, 3, 32, 32), mask, soft)


SAMPLE = torch.zeros(4, 4, 4, 4)  # rows 0-1: the negative prompt's, 2-3: the prompt's


def run(*controls, progress=None, uncond=slice(0, 2)):
    return residuals(list(controls), progress or SamplingProgress(0, 10), SAMPLE, torch.tensor(500.0),
                     torch.zeros(4, 77, 8), None, uncond)


def test_balanced_scales_every_residual_by_the_weight_and_units_add():
    found = run(active(ControlUnit("a", weight=0.5)), active(ControlUnit("b", weight=1.5), ConstantNet(2.0)))
    assert len(found.down) == 12 and all(torch.all(d == 0.5 + 3.0) for d in found.down) and torch.all(found.mid == 3.5)
    assert found.intrablock is None and set(found.unet_kwargs()) == {"down_block_additional_residuals",
                                                                      "mid_block_additional_residual"}


def test_my_prompt_is_more_important_decays_towards_the_shallow_blocks():
    found = run(active(ControlUnit("a", weight=2.0), soft=True))
    expected = [2.0 * 0.825 ** (12 - i) for i in range(13)]
    assert [round(float(d[0, 0, 0, 0]), 6) for d in [*found.down, found.mid]] == [round(e, 6) for e in expected]


def test_controlnet_is_more_important_leaves_the_negative_rows_alone():
    mid = run(active(ControlUnit("a", control_mode="ControlNet is more important"))).mid
    assert torch.all(mid[:2] == 0) and torch.all(mid[2:] == 1)
    # a call holding only the prompt's rows is all control
    alone = run(active(ControlUnit("a", control_mode="ControlNet is more important")), uncond=None).mid
    assert torch.all(alone == 1)


def test_a_units_mask_confines_it():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1  # the left half of the latents
    mid = run(active(ControlUnit("a"), mask=mask)).mid
    assert torch.all(mid[..., :2] == 1) and torch.all(mid[..., 2:] == 0)


def test_guidance_start_and_end_as_fractions_of_the_steps():
    net = ConstantNet()
    unit = active(ControlUnit("a", guidance_start=0.3, guidance_end=0.6), net)
    acting = [run(unit, progress=SamplingProgress(step, 10)) is not None for step in range(10)]
    assert acting == [False, False, False, True, True, True, True, False, False, False] and net.calls == 4
    assert run(active(ControlUnit("a", weight=0.0))) is None  # weight 0: not even run


@pytest.mark.parametrize("fields, message", [
    (dict(weight=3.0), "unit 0: weight must be between 0 and 2"),
    (dict(guidance_start=0.8, guidance_end=0.2), "unit 0: guidance start and end"),
    (dict(control_mode="Loud"), "unit 0: control mode must be one of: Balanced"),
    (dict(resize_mode="Stretch"), "unit 0: resize mode must be one of: Just Resize"),
])
def test_bad_units_are_named(fields, message):
    with pytest.raises((ControlError, RequestError), match=message):
        GenerationRequest(prompt="x", control_units=(ControlUnit("a", **fields),)).validate()


def test_infotext_entries_read_back():
    unit = ControlUnit("tiny [abcd1234]", "canny", weight=0.8, guidance_end=0.9, control_mode="My prompt is more important")
    params = infotext_parameters((unit,))
    assert params["ControlNet 0"].startswith("Module: canny, Model: tiny [abcd1234], Weight: 0.8, Resize Mode: "
                                             "Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200")
    back = units_from_infotext(params)[0]
    assert back["model"] == "tiny [abcd1234]" and back["weight"] == 0.8 and back["guidance_end"] == 0.9
    assert back["control_mode"] == "My prompt is more important" and back["threshold_a"] == 100


# -- whole generations -------------------------------------------------------------------------------------
def edges() -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((10, 12, 40, 44), outline="black", width=3)
    return image


@pytest.fixture
def control_manager(sd1_manager):
    folder = sd1_manager.settings.model_dir("controlnet")
    (folder / "sub").mkdir(parents=True)
    net = random_controlnets.build("sd1", seed=1)
    random_controlnets.save_lllyasviel(net, folder / "tiny_canny.safetensors")
    random_controlnets.save_diffusers(net, folder / "sub" / "tiny_canny_diffusers")
    sd1_manager.controlnets.library.refresh()
    return sd1_manager


BASE = dict(prompt="a star", negative_prompt="blur", width=64, height=64, steps=3, seed=3, save_images=False,
            sampler="Euler")


def pixels(manager, *units, **fields) -> np.ndarray:
    result = generate(manager, GenerationRequest(**{**BASE, **fields}, control_units=tuple(units)))
    return np.asarray(result.images[0].image).astype(int)


def test_a_unit_steers_weight_0_changes_nothing_and_both_layouts_agree(control_manager):
    plain = pixels(control_manager)
    steered = pixels(control_manager, ControlUnit("tiny_canny", "canny", edges()))
    assert np.abs(steered - plain).mean() > 1
    assert np.array_equal(pixels(control_manager, ControlUnit("tiny_canny", "canny", edges(), weight=0.0)), plain)
    assert np.array_equal(pixels(control_manager, ControlUnit("tiny_canny_diffusers", "canny", edges())), steered)


def test_img2img_uses_the_init_image_and_the_infotext_names_the_model(control_manager):
    result = generate(control_manager, GenerationRequest(**BASE, init_image=edges(), denoising_strength=0.6,
                                                         control_units=(ControlUnit("tiny_canny", "canny"),)))
    entry = parse_infotext(result.images[0].infotext)["ControlNet 0"]
    title = control_manager.controlnets.library.resolve("tiny_canny").title
    assert f"Model: {title}" in entry and "Module: canny" in entry


def test_a_unit_without_an_image_in_txt2img_and_an_unknown_model_are_refused(control_manager):
    with pytest.raises(ControlError, match="ControlNet unit 0 has no image"):
        pixels(control_manager, ControlUnit("tiny_canny", "canny"))
    with pytest.raises(Exception, match="ControlNet unit 0: ControlNet model 'nope' not found"):
        pixels(control_manager, ControlUnit("nope", "canny", edges()))


def test_an_sdxl_controlnet_steers_an_sdxl_model_and_an_sd1_one_is_refused(settings, model_files):
    from backend.model_manager import ModelManager
    from tests.conftest import install

    install(settings, model_files["sdxl"])
    folder = settings.model_dir("controlnet")
    folder.mkdir(parents=True)
    random_controlnets.save_lllyasviel(random_controlnets.build("sdxl", seed=3), folder / "tiny_xl.safetensors")
    random_controlnets.save_lllyasviel(random_controlnets.build("sd1", seed=1), folder / "tiny_sd15.safetensors")
    manager = ModelManager(settings)
    plain = pixels(manager)
    assert np.abs(pixels(manager, ControlUnit("tiny_xl", "canny", edges())) - plain).mean() > 1
    assert np.array_equal(pixels(manager, ControlUnit("tiny_xl", "canny", edges(), weight=0.0)), plain)
    with pytest.raises(Exception, match="ControlNet unit 0: .*SD 1.x.*SDXL"):
        pixels(manager, ControlUnit("tiny_sd15", "canny", edges()))
