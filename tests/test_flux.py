"""FLUX.1 as a family: tiny random dev and schnell models written as users download them (the transformer
alone with ae.safetensors, clip_l and t5xxl in Forge's folders; ComfyUI's all-in-one file), detected, loaded
offline, sampled, and compared with diffusers' own FluxPipeline on the same weights."""

import itertools
import shutil

import numpy as np
import pytest
import torch

from backend import checkpoints, families, flow_sampling, generation
from backend.errors import InputError
from backend.families.parts import MissingPartError
from backend.model_manager import ModelManager
from backend.random_flow_models import build_flux, save_all_in_one, save_separate
from backend.random_t5_tokenizer import write_t5_tokenizer
from backend.request import GenerationRequest
from backend.settings import Settings


@pytest.fixture(scope="module")
def flux_models():
    return {"dev": build_flux(guidance=True, seed=0), "schnell": build_flux(guidance=False, seed=10)}


@pytest.fixture(scope="module")
def flux_root(tmp_path_factory, tokenizer_cache, flux_models):
    """A data folder: flux-dev (transformer only, parts in models/VAE and models/text_encoder) and
    flux-schnell-aio (ComfyUI's all-in-one file)."""
    root = tmp_path_factory.mktemp("flux")
    settings = Settings(data_dir=root)
    shutil.copytree(tokenizer_cache, settings.cache_dir, dirs_exist_ok=True)
    write_t5_tokenizer(settings.cache_dir)
    save_separate(flux_models["dev"], settings.models_dir, "flux-dev", dtype=torch.float32,
                  encoder_dtype=torch.float32)
    save_all_in_one(flux_models["schnell"], settings.model_dir("checkpoints") / "flux-schnell-aio.safetensors",
                    dtype=torch.float32, encoder_dtype=torch.float32)
    return root


@pytest.fixture(scope="module")
def manager(flux_root):
    return ModelManager(Settings(data_dir=flux_root, checkpoint_cache_size=2))


def run(manager, **fields) -> list:
    request = GenerationRequest(**{"prompt": "a red (cat:1.2)", "width": 64, "height": 64, "steps": 4, "seed": 7,
                                   "sampler": "Euler", "cfg_scale": 1, **fields})
    result = generation.generate(manager, request)
    assert result.images, result.warnings
    return result.images


def pixels(image) -> np.ndarray:
    return np.asarray(image.image, dtype=np.float64)


def test_files_are_recognised_as_flux(flux_root):
    folder = Settings(data_dir=flux_root).model_dir("checkpoints")
    for name in ("flux-dev.safetensors", "flux-schnell-aio.safetensors"):
        assert families.identify(checkpoints.read_shapes(folder / name)).name == "flux"


def test_dev_matches_diffusers_flux_pipeline(manager):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    ours = pixels(run(manager, checkpoint="flux-dev", prompt="a red cat", distilled_cfg_scale=4.0)[0])
    model = manager.active
    assert model.family == "flux" and model.engine.distilled(model)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoders[0],
                        tokenizer=model.tokenizers[0], text_encoder_2=model.text_encoders[1],
                        tokenizer_2=model.tokenizers[1], transformer=model.unet)
    side = 64 // model.vae_scale_factor
    noise = torch.randn((1, 16, side, side), generator=torch.Generator().manual_seed(7))
    latents = pipe._pack_latents(noise, 1, 16, side, side)
    theirs = pipe("a red cat", height=64, width=64, num_inference_steps=4, guidance_scale=4.0, latents=latents,
                  max_sequence_length=512, output_type="np").images[0] * 255
    # the same image; pixels differ only by rounding to 8 bits (diffusers truncates, Easel rounds)
    assert np.abs(ours - theirs).max() <= 1.0
    assert ours.std() > 5


def test_generation_is_deterministic_and_seeded(manager):
    first, again = run(manager, checkpoint="flux-dev")[0], run(manager, checkpoint="flux-dev")[0]
    other = run(manager, checkpoint="flux-dev", seed=8)[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 2


def test_distilled_cfg_scale_steers_dev_and_is_written_in_the_infotext(manager):
    low, high = (run(manager, checkpoint="flux-dev", distilled_cfg_scale=g)[0] for g in (1.0, 6.0))
    assert np.abs(pixels(low) - pixels(high)).mean() > 1
    assert "Distilled CFG Scale: 6," in high.infotext
    assert "Schedule type: Simple" in high.infotext


def test_schnell_all_in_one_has_no_guidance_input(manager):
    images = run(manager, checkpoint="flux-schnell-aio", width=96, height=80, batch_size=2)
    assert [i.image.size for i in images] == [(96, 80), (96, 80)]
    assert "Distilled CFG Scale" not in images[0].infotext
    low, high = (run(manager, checkpoint="flux-schnell-aio", distilled_cfg_scale=g)[0] for g in (1.0, 6.0))
    assert np.array_equal(pixels(low), pixels(high))


def test_batch_images_equal_their_seeds_alone(manager):
    batch = run(manager, checkpoint="flux-dev", batch_size=2, seed=20)
    alone = run(manager, checkpoint="flux-dev", seed=21)[0]
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 1


@pytest.mark.parametrize("sampler", ["Euler a", "Heun", "DPM++ 2M", "LMS"])
def test_flow_samplers_run_and_differ_from_euler(manager, sampler):
    euler = run(manager, checkpoint="flux-dev")[0]
    other = run(manager, checkpoint="flux-dev", sampler=sampler)[0]
    assert f"Sampler: {sampler}," in other.infotext
    assert np.abs(pixels(euler) - pixels(other)).mean() > 0.1


def test_euler_a_at_eta_zero_is_euler(manager):
    euler = run(manager, checkpoint="flux-dev")[0]
    assert np.array_equal(pixels(euler), pixels(run(manager, checkpoint="flux-dev", sampler="Euler a", eta=0.0)[0]))


def test_samplers_and_sizes_that_do_not_fit_a_flow_are_refused(manager):
    with pytest.raises(InputError, match="does not work with FLUX.1 models; use one of Euler"):
        run(manager, checkpoint="flux-dev", sampler="DDIM")
    with pytest.raises(InputError, match="multiple of 16"):
        run(manager, checkpoint="flux-dev", width=72)


def test_img2img_inpaint_and_hires(manager):
    from PIL import Image

    base = run(manager, checkpoint="flux-dev")[0].image
    changed = run(manager, checkpoint="flux-dev", init_image=base, denoising_strength=0.5, seed=99)[0]
    assert changed.image.size == (64, 64)
    assert 0.5 < np.abs(pixels(changed) - np.asarray(base, dtype=np.float64)).mean()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    painted = pixels(run(manager, checkpoint="flux-dev", init_image=base, mask=mask, mask_blur=0, seed=99,
                         denoising_strength=0.9)[0])
    source = np.asarray(base, dtype=np.float64)
    assert np.abs(painted[:, 40:] - source[:, 40:]).mean() < np.abs(painted[:, :24] - source[:, :24]).mean()
    large = run(manager, checkpoint="flux-dev", enable_hr=True, hr_scale=1.5, denoising_strength=0.5)[0]
    assert large.image.size == (96, 96)


def test_missing_and_ambiguous_parts_name_the_fix(flux_root, tmp_path, tokenizer_cache):
    settings = Settings(data_dir=tmp_path)
    shutil.copytree(Settings(data_dir=flux_root).models_dir, settings.models_dir)
    shutil.copytree(Settings(data_dir=flux_root).cache_dir, settings.cache_dir)
    (settings.model_dir("text_encoder") / "t5xxl_fp16.safetensors").unlink()
    manager = ModelManager(settings)
    with pytest.raises(MissingPartError, match=r"needs T5 XXL.*text_encoder holds none"):
        manager.activate("flux-dev")
    shutil.copy(settings.model_dir("text_encoder") / "clip_l.safetensors",
                settings.model_dir("text_encoder") / "clip_l_copy.safetensors")
    shutil.copy(Settings(data_dir=flux_root).model_dir("text_encoder") / "t5xxl_fp16.safetensors",
                settings.model_dir("text_encoder") / "t5xxl_fp16.safetensors")
    manager.refresh()
    with pytest.raises(MissingPartError, match="holds several .*--text-encoder NAME"):
        manager.activate("flux-dev")


def test_flow_schedules_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sd3.set_timesteps(10)  # diffusers' default: evenly between its first and last training sigma, shifted
    assert torch.allclose(flow_sampling.sigmas(10, "Normal", flow_sampling.Shift(3.0)), sd3.sigmas.float(), atol=1e-6)
    sd3.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10))  # ComfyUI's and Forge's "Simple"
    assert torch.allclose(flow_sampling.sigmas(10, "Simple", flow_sampling.Shift(3.0)), sd3.sigmas.float(), atol=1e-6)
    mu = flow_sampling.resolution_mu(4096)
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    flux.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
    ours = flow_sampling.sigmas(8, "Automatic", flow_sampling.Shift(mu, exponential=True))
    assert mu == pytest.approx(1.15)
    assert torch.allclose(ours, flux.sigmas.float(), atol=1e-6)
    # a Shift of s is FLUX's shift with mu = ln(s)
    assert torch.allclose(flow_sampling.sigmas(8, "Simple", flow_sampling.Shift(float(np.exp(mu)))), ours, atol=1e-6)
    karras = flow_sampling.sigmas(8, "Karras", flow_sampling.Shift(3.0))
    assert karras[0] == 1.0 and karras[-1] == 0 and bool((karras[:-1] > karras[1:]).all())


def test_previews_of_16_channel_latents_show_the_colours(manager):
    from backend import preview, vae_codec

    run(manager, checkpoint="flux-dev")
    model = manager.active
    colours = torch.tensor(list(itertools.product(preview.LEVELS, repeat=3)))
    shown = []
    for colour in colours:  # each flat colour through the VAE's encoder, then the cheap preview
        image = preview.cheap_preview(vae_codec.encode(model, colour[None, :, None, None].expand(1, 3, 32, 32))[0],
                                      model)
        assert image.size == (16, 16)  # the latent's size: no VAE decode
        shown.append(np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0) / 127.5 - 1)
    shown = np.array(shown)
    # even a random VAE's latents keep some colour: the fitted map tells the colours apart better than one
    # grey for all (0.82 of its error here; a trained VAE's latents are close to linear in colour)
    error = ((shown - colours.numpy()) ** 2).sum()
    assert error < 0.9 * ((colours.numpy() - colours.numpy().mean(axis=0)) ** 2).sum()


def test_xyz_plot_sweeps_distilled_cfg_scale(flux_root):
    from backend.runtime import Runtime

    runtime = Runtime.create(Settings(data_dir=flux_root))
    request = GenerationRequest(prompt="a cat", width=64, height=64, steps=3, seed=2, sampler="Euler", cfg_scale=1,
                                checkpoint="flux-dev", save_images=False, script_name="X/Y/Z plot",
                                script_args={"X/Y/Z plot": {"x_type": "Distilled CFG Scale", "x_values": "1, 6"}})
    grid, *cells = runtime.generate(request).images
    assert ["Distilled CFG Scale: 1," in cells[0].infotext, "Distilled CFG Scale: 6," in cells[1].infotext] == [True] * 2
    assert np.abs(pixels(cells[0]) - pixels(cells[1])).mean() > 1


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_medvram_and_lowvram_offload_give_the_same_image(flux_root, manager, offload, monkeypatch):
    """--medvram brings each module to the device for its part of the job; --lowvram streams the layers
    (accelerate's hooks). On the CPU both are forced here; the image must not change."""
    from backend.devices import Placement
    from backend.sd_model import StableDiffusionModel

    reference = pixels(run(manager, checkpoint="flux-dev")[0])
    offloaded = ModelManager(Settings(data_dir=flux_root))
    offloaded.placement = Placement(offloaded.placement.device, torch.float32, torch.float32, offload)
    brought = []
    real_use = StableDiffusionModel.use

    def use(self, *modules):
        brought.extend(type(m).__name__ for m in modules)
        return real_use(self, *modules)

    monkeypatch.setattr(StableDiffusionModel, "use", use)
    assert np.abs(pixels(run(offloaded, checkpoint="flux-dev")[0]) - reference).max() <= 1
    assert {"FluxTransformer2DModel", "CLIPTextModel", "T5EncoderModel", "AutoencoderKL"} <= set(brought)


def test_a_diffusers_flux_folder_gives_the_same_image_as_the_single_files(manager, flux_root, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    single = run(manager, checkpoint="flux-dev")[0]
    model = manager.active
    settings = Settings(data_dir=tmp_path)
    shutil.copytree(Settings(data_dir=flux_root).cache_dir, settings.cache_dir)
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=model.vae, text_encoder=model.text_encoders[0],
                 tokenizer=model.tokenizers[0], text_encoder_2=model.text_encoders[1], tokenizer_2=model.tokenizers[1],
                 transformer=model.unet).save_pretrained(settings.model_dir("checkpoints") / "flux-dev-diffusers")
    folder = ModelManager(settings)
    assert np.abs(pixels(run(folder, checkpoint="flux-dev-diffusers")[0]) - pixels(single)).max() <= 1
    assert folder.active.family == "flux" and folder.active.label == "FLUX.1"


def test_controlnet_units_on_flux_are_refused_by_name(manager):
    from PIL import Image

    from backend.control_units import ControlUnit

    with pytest.raises(InputError, match="units work with SD 1.x, SD 2.x and SDXL checkpoints; Easel has none for"):
        run(manager, checkpoint="flux-dev", control_units=(ControlUnit("any", "canny", Image.new("RGB", (64, 64))),))


def test_the_token_counter_counts_t5_tokens_against_the_limit(manager):
    from backend import flow_conditioning

    run(manager, checkpoint="flux-dev")
    model = manager.active
    counted, limit = model.engine.token_count(model, "a red (cat:1.2) BREAK on a chair")
    ids, _ = flow_conditioning.t5_tokens(model.tokenizers[1], "a red (cat:1.2) BREAK on a chair", "Original", 512)
    assert limit == 512 and counted == ids.index(flow_conditioning.T5_END) + 1 and counted > 3
    run(manager, checkpoint="flux-schnell-aio")
    assert manager.active.engine.token_count(manager.active, "a cat")[1] == 256


def test_out_of_memory_in_the_transformer_is_retried_with_the_parts_offloaded(manager, monkeypatch):
    reference = pixels(run(manager, checkpoint="flux-dev")[0])
    model = manager.active
    real, calls = model.unet.forward, {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", forward)
    request = GenerationRequest(prompt="a red (cat:1.2)", width=64, height=64, steps=4, seed=7, sampler="Euler",
                                cfg_scale=1, checkpoint="flux-dev")
    result = generation.generate(manager, request)
    assert np.array_equal(pixels(result.images[0]), reference)
    assert any("retried with the model's parts on the CPU between uses" in w for w in result.warnings)
    assert model.placement.offload == "none"  # for that job only
