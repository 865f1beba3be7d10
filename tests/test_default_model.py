"""The shipped default model: it loads offline through the normal engine path, with its native size,
and follows colour prompts (object colour measured on the image)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.generation import generate
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from backend.settings import Settings
from training import metrics

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "Stable-diffusion" / "easel-shapes.safetensors"

# Each colour as a large circle on a contrasting background, two seeds each: (prompt, seed, colour).
BACKGROUNDS = {"red": "white", "blue": "yellow", "green": "black", "yellow": "purple", "white": "blue",
               "orange": "green", "purple": "white", "black": "orange"}
PROMPTS = [(f"a large {colour} circle on a {background} background, center", seed + 10 * index, colour)
           for index, (colour, background) in enumerate(BACKGROUNDS.items()) for seed in (1, 2)]


@pytest.fixture(scope="module")
def manager(tmp_path_factory) -> ModelManager:
    data = tmp_path_factory.mktemp("default-model")
    return ModelManager(Settings(data_dir=data, ckpt_dir=DEFAULT_MODEL.parent, lora_dir=ROOT / "models" / "Lora"))


def test_default_model_is_shipped_small_and_loads_with_its_metadata(manager):
    assert DEFAULT_MODEL.stat().st_size < 30 * 2**20
    model = manager.activate("easel-shapes")
    assert (model.family, model.native_size, model.prediction_type) == ("sd1", 64, "v_prediction")
    assert model.scheduler_config["rescale_betas_zero_snr"] is True
    assert model.tokenizers[0]("a red star").input_ids == [49406, 320, 736, 1565, 49407]


def test_default_model_follows_colour_prompts(manager):
    scorer = metrics.Scorer().fit(samples=600)
    matches = []
    for prompt, seed, colour in PROMPTS:
        result = generate(manager, GenerationRequest(prompt=prompt, checkpoint="easel-shapes", steps=20,
                                                     sampler="DPM++ 2M", cfg_scale=6, seed=seed, save_images=False))
        image = result.images[0].image
        assert image.size == (64, 64)  # the model's native size is the default
        matches.append((colour, scorer.read(image).color))
    # The shipped model scores 15/16 here (held-out colour accuracy is lower: see docs/default-model-eval.json).
    assert sum(want == got for want, got in matches) >= 13, matches


@pytest.mark.parametrize("sampler, schedule", [("DPM++ 2M", "Karras"), ("DPM++ 2M SDE", "Karras"),
                                               ("DPM2", "Karras"), ("Euler", "Exponential")])
def test_long_karras_schedules_run_on_a_zero_terminal_snr_model(manager, sampler, schedule):
    """Above the top training sigma, Karras/exponential sigmas all round to timestep 999; stepping
    by timestep lookup used to run off the schedule (IndexError) or produce NaN at 50+ steps."""
    result = generate(manager, GenerationRequest(prompt="a large red circle on a white background, center",
                                                 checkpoint="easel-shapes", steps=60, sampler=sampler,
                                                 schedule_type=schedule, seed=9, save_images=False))
    pixels = np.asarray(result.images[0].image, dtype=np.float32)
    assert pixels.std() > 10  # an image, not a flat (NaN-replaced) field


def test_demo_lora_outlines_the_shapes_and_leaves_no_trace(manager):
    from training.check_demo_lora import PROMPTS as LORA_PROMPTS
    from training.check_demo_lora import fill_ratio

    def images(suffix: str = "") -> list[np.ndarray]:
        return [np.array(generate(manager, GenerationRequest(
            prompt=prompt + suffix, checkpoint="easel-shapes", steps=20, sampler="DPM++ 2M", cfg_scale=6, seed=5,
            save_images=False)).images[0].image) for prompt in LORA_PROMPTS]

    before = images()
    outlined = images(" <lora:easel-outlined:1>")
    after = images()
    assert all(np.array_equal(a, b) for a, b in zip(after, before))  # removal is exact
    fill = [np.mean([fill_ratio(Image.fromarray(i)) for i in group]) for group in (before, outlined)]
    assert fill[1] < fill[0] - 0.15, fill  # outlines fill far less of their bounding box than solids
