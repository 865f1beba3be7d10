"""The default model's data generator, evaluation measures and training script (smoke, not quality)."""

import json
import random

import numpy as np
import pytest
import torch

from backend.generation import generate
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from training import metrics, shapes, train_default_model


def test_data_generator_is_deterministic_for_a_seed():
    a = shapes.sample_batch(random.Random(5), 16, shapes.held_out_triples())
    b = shapes.sample_batch(random.Random(5), 16, shapes.held_out_triples())
    c = shapes.sample_batch(random.Random(6), 16, shapes.held_out_triples())
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (16, 64, 64, 3) and a[0].dtype == np.uint8


def test_held_out_combinations_never_reach_training():
    held_out = shapes.held_out_triples()
    assert len(held_out) == 24
    _, _, scenes = shapes.sample_batch(random.Random(0), 3000, held_out)
    assert not {(s.shape, s.color, s.background) for s in scenes} & held_out
    assert all(s.color != s.background for s in scenes)


def test_captions_name_every_attribute_and_some_are_empty():
    rng = random.Random(1)
    scene = shapes.Scene("star", "red", "blue", "large", "top left")
    assert scene.caption() == "a large red star on a blue background, top left"
    captions = [shapes.caption_for(scene, rng) for _ in range(400)]
    assert 0.05 < captions.count("") / 400 < 0.15
    assert all("red star" in c for c in captions if c)


@pytest.fixture(scope="module")
def scorer():
    return metrics.Scorer().fit(samples=1500)


def test_measures_score_real_renders_near_one(scorer):
    rng = random.Random(11)
    scenes = [shapes.random_scene(rng, set()) for _ in range(300)]
    scores = scorer.score([shapes.render(s, rng) for s in scenes], scenes)
    assert all(value >= 0.97 for value in scores.values()), scores


def test_measures_catch_wrong_attributes(scorer):
    scene = shapes.Scene("circle", "red", "blue", "small", "top left")
    wrong = shapes.Scene("square", "green", "white", "large", "bottom right")
    scores = scorer.score([shapes.render(wrong)], [scene])
    assert scores == {"color": 0, "background": 0, "shape": 0, "size": 0, "position": 0}


def test_training_runs_resumes_and_exports_a_loadable_model(tmp_path, settings):
    work = tmp_path / "work"
    tiny = ["--work-dir", str(work), "--vae-steps", "2", "--vae-batch", "2", "--batch", "2", "--log-every", "1",
            "--save-every", "2", "--probe-every", "2", "--unet-steps", "3"]
    train_default_model.main(tiny)
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert log[0] == {"stage": "run", "device": log[0]["device"], "threads": 1, "batch": 2, "workers": 0, "bf16": False}
    log = log[1:]
    assert [(r["stage"], r["step"]) for r in log] == [("vae", 1), ("vae", 2), ("unet", 1), ("unet", 2), ("probe", 2),
                                                      ("unet", 3)]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    assert log[4]["position_from_noise"] in {k / 18 for k in range(19)}
    train_default_model.main([*tiny[:-1], "5", "--workers", "1"])  # resumes at step 3, drawing in a worker
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "unet"] == [1, 2, 3, 4, 5]
    assert [r["workers"] for r in log if r["stage"] == "run"] == [0, 1]
    target = settings.model_dir("checkpoints") / "shapes.safetensors"
    train_default_model.main(["--work-dir", str(work), "--export", str(target)])
    model = ModelManager(settings).activate("shapes")
    assert (model.family, model.native_size, model.prediction_type) == ("sd1", 64, "v_prediction")
    assert model.scheduler_config["rescale_betas_zero_snr"] is True
    assert model.unet.conv_in.weight.dtype == torch.float32
    result = generate(ModelManager(settings), GenerationRequest(prompt="a red star", steps=2, seed=1,
                                                                save_images=False))
    assert result.images[0].image.size == (64, 64)
    # A later run without the training state continues from the exported weights.
    again = tmp_path / "again"
    train_default_model.main(["--work-dir", str(again), "--init-from", str(target), "--batch", "2",
                              "--unet-steps", "6", "--log-every", "1"])
    log = [json.loads(line) for line in (again / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r.get("step")) for r in log] == [("run", None), ("unet", 6)]


def test_demo_lora_training_writes_kohya_format(tmp_path, settings):
    from safetensors import safe_open

    from training import train_demo_lora

    work = tmp_path / "work"
    train_default_model.main(["--work-dir", str(work), "--vae-steps", "1", "--vae-batch", "2", "--batch", "2",
                              "--unet-steps", "1"])
    base = tmp_path / "base.safetensors"
    train_default_model.main(["--work-dir", str(work), "--export", str(base)])
    out = tmp_path / "Lora" / "outlined.safetensors"
    train_demo_lora.main([str(base), str(out), "--steps", "2", "--batch", "2", "--cache", str(settings.cache_dir)])
    with safe_open(out, "pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
        down = handle.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight")
        alpha = handle.get_tensor("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha")
    modules = {k.rsplit(".", 2)[0] for k in keys}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert all({f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= keys for m in modules)
    assert len(modules) == 4 * 2 * 7  # q, k, v, out of attn1 and attn2; 7 transformer blocks (2 down, mid, 4 up)
    assert down.shape == (8, 128) and down.dtype == torch.float16 and float(alpha) == 8.0
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"


def test_controlnet_training_resumes_and_exports_what_easel_loads(tmp_path):
    from backend import controlnet_files
    from training import train_controlnet

    args = ["--work-dir", str(tmp_path / "work"), "--batch", "2", "--log-every", "1", "--probe-every", "2",
            "--save-every", "2"]
    # the maps are what generation makes for the unit: binary edges at the image's size
    pixels, captions, hints = train_controlnet.draw_batch(random.Random(0), 4, shapes.held_out_triples())
    assert pixels.shape == (4, 3, 64, 64) and hints.shape == (4, 3, 64, 64)
    assert set(torch.unique(hints).tolist()) <= {0.0, 1.0} and hints.amax(dim=(1, 2, 3)).min() == 1.0
    train_controlnet.main([*args, "--steps", "2"])
    train_controlnet.main([*args, "--steps", "3"])  # resumes at step 2
    log = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "controlnet"] == [1, 2, 3]
    assert any(r["stage"] == "probe" for r in log)
    out = tmp_path / "canny.safetensors"
    train_controlnet.main([*args, "--export", str(out)])
    info = controlnet_files.inspect(out)
    assert (info.family, info.layout, info.dtype) == ("sd1", "lllyasviel", "float16")
    assert info.config["conditioning_embedding_out_channels"] == [16, 32, 64]  # 4x: the default model's VAE
    trained = torch.load(tmp_path / "work" / "state.pt", weights_only=False)["controlnet"]
    loaded = controlnet_files.load_controlnet(out, "sd1")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained[key].half().float()), key
