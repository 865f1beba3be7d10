"""ControlNet units across the generation features they must combine with: batches and batch count,
`AND` subprompts, and inpainting of "Only masked", where the control image is cropped as the init image is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend import controlnet_library, random_controlnets
from backend.control_units import ControlUnit
from backend.generation import generate
from backend.init_image import prepare
from backend.request import GenerationRequest


def edges(box=(10, 12, 40, 44), size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle(box, outline="black", width=3)
    return image


@pytest.fixture
def manager(sd1_manager):
    folder = sd1_manager.settings.model_dir("controlnet")
    folder.mkdir(parents=True, exist_ok=True)
    random_controlnets.save_lllyasviel(random_controlnets.build("sd1", seed=1), folder / "tiny_canny.safetensors")
    sd1_manager.controlnets.library.refresh()
    return sd1_manager


BASE = dict(prompt="a star", negative_prompt="blur", width=64, height=64, steps=3, seed=3, save_images=False,
            sampler="Euler")
UNIT = ControlUnit("tiny_canny", "canny", edges())


def images(manager, *units, **fields) -> list[np.ndarray]:
    result = generate(manager, GenerationRequest(**{**BASE, **fields}, control_units=tuple(units)))
    return [np.asarray(item.image).astype(int) for item in result.images]


def test_every_image_of_a_batch_and_of_a_batch_count_is_the_image_of_its_seed_alone(manager):
    batch = images(manager, UNIT, batch_size=2, batch_count=2)
    assert len(batch) == 4
    for offset, image in enumerate(batch):
        # the UNet and ControlNet run batched vs alone: one level of float rounding, nothing more
        assert np.abs(image - images(manager, UNIT, seed=3 + offset)[0]).max() <= 1, offset
    assert np.abs(batch[0] - images(manager, seed=3)[0]).mean() > 1  # and the unit acted


class Recorder(torch.nn.Module):
    """Wraps a ControlNet and records the rows of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, []
        self.config = net.config

    def forward(self, sample, *args, **kwargs):
        self.rows.append(sample.shape[0])
        return self.net(sample, *args, **kwargs)


def test_and_subprompts_each_get_the_control_and_weight_0_is_still_no_unit(manager, monkeypatch):
    recorded = []
    real_load = controlnet_library.ControlNetCache.load

    def load(self, name, model):
        net, title = real_load(self, name, model)
        recorded.append(Recorder(net))
        return recorded[-1], title

    monkeypatch.setattr(controlnet_library.ControlNetCache, "load", load)
    prompt = "a star AND a circle:0.7"
    steered = images(manager, UNIT, prompt=prompt)[0]
    # one negative and two subprompts per image, in every UNet call of the 3 Euler steps
    assert sum(recorded[0].rows) == 3 * 3
    assert np.abs(steered - images(manager, prompt=prompt)[0]).mean() > 1
    assert np.array_equal(images(manager, ControlUnit("tiny_canny", "canny", edges(), weight=0.0), prompt=prompt)[0],
                          images(manager, prompt=prompt)[0])


def test_only_masked_inpainting_crops_the_control_image_as_it_crops_the_init_image():
    # a 128x128 init image whose mask covers its top-left quarter; generation at 64x64
    init = Image.new("RGB", (128, 128), "gray")
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 55, 55), fill=255)
    control = edges((8, 8, 55, 55), (128, 128))
    request = GenerationRequest(**BASE, init_image=init, mask=mask, inpaint_area="Only masked",
                                only_masked_padding=0, resize_mode="Just resize")
    source = prepare(request, 128, 128)
    assert source.crop == (8, 8, 56, 56)
    unit = source.control_unit(ControlUnit("tiny_canny", "canny", control, mask=mask))
    assert unit.image.size == (128, 128) == unit.mask.size
    expected = control.crop(source.crop).resize((128, 128), Image.LANCZOS)
    assert np.abs(np.asarray(unit.image).astype(int) - np.asarray(expected).astype(int)).max() <= 1
    # the unit's own mask is cropped with it: the masked square fills the crop
    assert np.asarray(unit.mask).min() == 255
    # a unit without an image takes the init image's crop
    bare = source.control_unit(ControlUnit("tiny_canny", "canny"))
    assert np.array_equal(np.asarray(bare.image), np.asarray(init.crop(source.crop).resize((128, 128), Image.LANCZOS)))
    # the whole-picture mode leaves units alone
    whole = prepare(GenerationRequest(**BASE, init_image=init, mask=mask), 128, 128)
    assert whole.control_unit(UNIT) is UNIT


def test_only_masked_inpainting_with_a_unit_generates_and_keeps_the_unmasked_pixels(manager):
    init = Image.new("RGB", (64, 64), (90, 120, 150))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((4, 4, 27, 27), fill=255)
    fields = dict(init_image=init, mask=mask, inpaint_area="Only masked", only_masked_padding=4, mask_blur=0,
                  denoising_strength=1.0)
    steered = images(manager, ControlUnit("tiny_canny", "canny", edges()), **fields)[0]
    plain = images(manager, **fields)[0]
    outside = np.asarray(mask) == 0
    assert np.array_equal(steered[outside], np.asarray(init).astype(int)[outside])
    assert np.abs(steered - plain)[~outside].mean() > 1


def test_inpaint_only_puts_the_control_images_unmasked_pixels_back(manager):
    rng = np.random.default_rng(4)
    photo = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((20, 20, 43, 43), fill=255)
    # a ControlNet whose hint is the image's size (the tiny model's VAE downsamples 2x), as released ones are
    unet = manager.activate(None).unet
    folder = manager.settings.model_dir("controlnet")
    random_controlnets.save_lllyasviel(random_controlnets.for_unet(unet, 2, (16, 32)), folder / "tiny_inpaint.pth")
    unit = ControlUnit("tiny_inpaint", "inpaint_only", photo, mask=mask)
    image = images(manager, unit)[0]
    far = np.ones((64, 64), bool)
    far[14:50, 14:50] = False  # beyond the mask's 7-pixel blend
    assert np.abs(image[far] - np.asarray(photo).astype(int)[far]).max() <= 1
    inside = np.asarray(mask) > 0
    assert np.abs(image[inside] - np.asarray(photo).astype(int)[inside]).mean() > 10  # generated there
    assert np.abs(images(manager, ControlUnit("tiny_inpaint", "inpaint", photo, mask=mask))[0][far]
                  - np.asarray(photo).astype(int)[far]).mean() > 10  # inpaint_global_harmonious keeps nothing


def test_medvram_keeps_the_controlnet_on_the_cpu_and_brings_it_for_sampling(manager, monkeypatch):
    from backend.devices import Placement

    model = manager.activate(None)
    monkeypatch.setattr(model, "placement", Placement(model.device, model.dtype, model.placement.vae_dtype, "model"))
    brought = []
    real_use = type(model).use

    def use(self, *modules):
        brought.extend(type(m).__name__ for m in modules)
        return real_use(self, *modules)

    monkeypatch.setattr(type(model), "use", use)
    steered = images(manager, UNIT)[0]
    assert "ControlNetModel" in brought and "UNet2DConditionModel" in brought
    net, _ = manager.controlnets.load("tiny_canny", model)
    assert next(net.parameters()).device.type == "cpu"
    monkeypatch.undo()
    assert np.array_equal(steered, images(manager, UNIT)[0])
