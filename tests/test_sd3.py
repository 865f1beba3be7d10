"""SD 3 / 3.5 as a family: tiny random models in Stability's all-in-one layout (with and without T5) and as a
transformer with its text encoders and VAE in Forge's folders, loaded offline, sampled with real CFG, and
compared with diffusers' StableDiffusion3Pipeline on the same weights."""

import shutil

import numpy as np
import pytest
import torch

from backend import checkpoints, families, generation
from backend.errors import InputError
from backend.model_manager import ModelManager
from backend.random_flow_models import build_sd3, save_all_in_one, save_separate
from backend.random_t5_tokenizer import write_t5_tokenizer
from backend.request import GenerationRequest
from backend.settings import Settings


@pytest.fixture(scope="module")
def sd3_root(tmp_path_factory, tokenizer_cache):
    root = tmp_path_factory.mktemp("sd3")
    settings = Settings(data_dir=root)
    shutil.copytree(tokenizer_cache, settings.cache_dir, dirs_exist_ok=True)
    write_t5_tokenizer(settings.cache_dir)
    folder = settings.model_dir("checkpoints")
    save_separate(build_sd3(seed=0), settings.models_dir, "sd35-large", dtype=torch.float32,
                  encoder_dtype=torch.float32)
    save_all_in_one(build_sd3(dual_attention=True, seed=5), folder / "sd35-medium-aio.safetensors",
                    dtype=torch.float32, encoder_dtype=torch.float32, vae_prefix="first_stage_model.")
    save_all_in_one(build_sd3(qk_norm=False, t5=False, seed=9), folder / "sd3-medium-no-t5.safetensors",
                    dtype=torch.float16, encoder_dtype=torch.float16, vae_prefix="first_stage_model.")
    return root


@pytest.fixture(scope="module")
def manager(sd3_root):
    return ModelManager(Settings(data_dir=sd3_root, checkpoint_cache_size=3))


def run(manager, **fields):
    request = GenerationRequest(**{"prompt": "a (blue:1.1) house", "negative_prompt": "blurry", "width": 64,
                                   "height": 64, "steps": 4, "seed": 3, "sampler": "Euler", "cfg_scale": 5, **fields})
    result = generation.generate(manager, request)
    assert result.images, result.warnings
    return result.images


def pixels(image) -> np.ndarray:
    return np.asarray(image.image, dtype=np.float64)


def test_files_are_recognised_as_sd3(sd3_root):
    folder = Settings(data_dir=sd3_root).model_dir("checkpoints")
    for name in ("sd35-large.safetensors", "sd35-medium-aio.safetensors", "sd3-medium-no-t5.safetensors"):
        assert families.identify(checkpoints.read_shapes(folder / name)).name == "sd3"


def test_matches_diffusers_sd3_pipeline(manager):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    ours = pixels(run(manager, checkpoint="sd35-large", prompt="a blue house")[0])
    model = manager.active
    assert model.label == "SD 3.5"
    encoders, tokenizers = model.text_encoders, model.tokenizers
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=model.vae,
                                    text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1],
                                    tokenizer_2=tokenizers[1], text_encoder_3=encoders[2], tokenizer_3=tokenizers[2],
                                    transformer=model.unet)
    side = 64 // model.vae_scale_factor
    latents = torch.randn((1, 16, side, side), generator=torch.Generator().manual_seed(3))
    theirs = pipe("a blue house", negative_prompt="blurry", height=64, width=64, num_inference_steps=4,
                  guidance_scale=5.0, latents=latents, sigmas=list(np.linspace(1.0, 1 / 4, 4)),
                  output_type="np").images[0] * 255
    assert np.abs(ours - theirs).max() <= 1.0
    assert ours.std() > 5


def test_cfg_and_negative_prompt_steer_the_image(manager):
    base = run(manager, checkpoint="sd35-large")[0]
    assert np.abs(pixels(base) - pixels(run(manager, checkpoint="sd35-large", cfg_scale=1.5)[0])).mean() > 1
    assert np.abs(pixels(base) - pixels(run(manager, checkpoint="sd35-large", negative_prompt="")[0])).mean() > 0.5
    assert "Distilled CFG Scale" not in base.infotext and "CFG scale: 5," in base.infotext


def test_shift_changes_the_schedule_and_is_written(manager):
    base, shifted = run(manager, checkpoint="sd35-large")[0], run(manager, checkpoint="sd35-large", shift=6.0)[0]
    assert np.abs(pixels(base) - pixels(shifted)).mean() > 0.5
    assert "Shift: 6," in shifted.infotext and "Shift" not in base.infotext


def test_all_in_one_medium_and_a_file_without_t5(manager, sd3_root, tmp_path):
    medium = run(manager, checkpoint="sd35-medium-aio", width=80, height=64)[0]
    assert medium.image.size == (80, 64) and manager.active.unet.config.dual_attention_layers == (0,)
    run(manager, checkpoint="sd3-medium-no-t5")  # the T5 in models/text_encoder joins it
    assert manager.active.text_encoders[2] is not None
    alone = Settings(data_dir=tmp_path)
    shutil.copytree(Settings(data_dir=sd3_root).cache_dir, alone.cache_dir)
    alone.model_dir("checkpoints").mkdir(parents=True)
    shutil.copy(Settings(data_dir=sd3_root).model_dir("checkpoints") / "sd3-medium-no-t5.safetensors",
                alone.model_dir("checkpoints"))
    manager = ModelManager(alone)
    no_t5 = run(manager)[0]  # without one, zeros stand in for T5's tokens
    assert manager.active.text_encoders[2] is None and manager.active.label == "SD 3"
    assert pixels(no_t5).std() > 1
    with pytest.raises(InputError, match="up to 192 px on a side"):
        run(manager, checkpoint="sd3-medium-no-t5", width=208)


def test_img2img_and_hires(manager):
    base = run(manager, checkpoint="sd35-large")[0].image
    changed = run(manager, checkpoint="sd35-large", init_image=base, denoising_strength=0.6, seed=50)[0]
    assert 0.5 < np.abs(pixels(changed) - np.asarray(base, dtype=np.float64)).mean()
    assert run(manager, checkpoint="sd35-large", enable_hr=True, hr_scale=1.5, denoising_strength=0.4)[0].image.size \
        == (96, 96)


def test_inpaint_keeps_the_unmasked_side(manager):
    from PIL import Image

    base = run(manager, checkpoint="sd35-large")[0].image
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    painted = pixels(run(manager, checkpoint="sd35-large", init_image=base, mask=mask, mask_blur=0, seed=77,
                         denoising_strength=0.9)[0])
    source = np.asarray(base, dtype=np.float64)
    assert np.abs(painted[:, :24] - source[:, :24]).mean() < np.abs(painted[:, 40:] - source[:, 40:]).mean()


def test_a_diffusers_sd3_folder_gives_the_same_image_as_the_single_file(manager, sd3_root, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    single = run(manager, checkpoint="sd35-large")[0]
    model = manager.active
    settings = Settings(data_dir=tmp_path)
    shutil.copytree(Settings(data_dir=sd3_root).cache_dir, settings.cache_dir)
    e, t = model.text_encoders, model.tokenizers
    StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=model.vae, text_encoder=e[0],
                             tokenizer=t[0], text_encoder_2=e[1], tokenizer_2=t[1], text_encoder_3=e[2], tokenizer_3=t[2],
                             transformer=model.unet).save_pretrained(settings.model_dir("checkpoints") / "sd35-folder")
    folder = ModelManager(settings)
    assert np.abs(pixels(run(folder, checkpoint="sd35-folder")[0]) - pixels(single)).max() <= 1
    assert folder.active.family == "sd3"
