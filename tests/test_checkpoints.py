"""Loading checkpoints in the formats users have: exact weights, safe unpickling, clear errors."""

import pickle
import zipfile

import pytest
import torch

from backend import checkpoints, diffusers_folder
from backend.checkpoints import CheckpointLoadError, UnsafeCheckpointError
from backend.model_detection import CheckpointFormatError


def assert_same_weights(module_a, module_b):
    a, b = module_a.state_dict(), module_b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].float(), b[key].float()), key


@pytest.mark.parametrize("name, family", [("sd1", "sd1"), ("sd1-ckpt", "sd1"), ("sd2", "sd2"), ("sdxl", "sdxl")])
def test_single_file_loads_every_weight_exactly(name, family, model_files, tiny_models, tokenizer_cache):
    loaded = checkpoints.load_single_file(model_files[name], tokenizer_cache)
    built = tiny_models[family]
    assert loaded.spec.family == family
    assert_same_weights(loaded.unet, built["unet"])
    assert_same_weights(loaded.vae, built["vae"])
    assert len(loaded.text_encoders) == (2 if family == "sdxl" else 1)
    if family != "sd2":
        for got, expected in zip(loaded.text_encoders, built["text_encoders"]):
            assert_same_weights(got, expected)
    else:
        # The file carries one more text layer than conditioning uses; it is dropped, the rest match.
        got, expected = loaded.text_encoders[0].state_dict(), built["text_encoders"][0].state_dict()
        assert loaded.text_encoders[0].config.num_hidden_layers == built["text_encoders"][0].config.num_hidden_layers
        assert all(torch.equal(got[k], expected[k]) for k in got)
    tokenizer_ids = loaded.tokenizers[0]("a photo of a cat").input_ids
    assert tokenizer_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tokenizer_padding_follows_the_family(model_files, tokenizer_cache):
    sd1 = checkpoints.load_single_file(model_files["sd1"], tokenizer_cache)
    sdxl = checkpoints.load_single_file(model_files["sdxl"], tokenizer_cache)
    assert sd1.tokenizers[0].pad_token_id == 49407
    assert [t.pad_token_id for t in sdxl.tokenizers] == [49407, 0]


def test_fp16_file_is_loaded_in_the_requested_dtype(model_files, tiny_models, tokenizer_cache):
    loaded = checkpoints.load_single_file(model_files["sd1-fp16"], tokenizer_cache, dtype=torch.float32)
    weight = loaded.unet.conv_in.weight
    assert weight.dtype == torch.float32
    expected = tiny_models["sd1"]["unet"].conv_in.weight.half().float()
    assert torch.equal(weight, expected)


def test_diffusers_folder_loads(model_files, tiny_models, tokenizer_cache):
    loaded = diffusers_folder.load_diffusers_folder(model_files["sd1-diffusers"], tokenizer_cache)
    assert loaded.spec.family == "sd1"
    assert_same_weights(loaded.unet, tiny_models["sd1"]["unet"])
    assert loaded.tokenizers[0]("a cat").input_ids == [49406, 320, 2368, 49407]


def test_inpainting_checkpoint_is_recognised(model_files, tokenizer_cache):
    loaded = checkpoints.load_single_file(model_files["sd1-inpaint"], tokenizer_cache)
    assert loaded.spec.is_inpainting and loaded.unet.config.in_channels == 9


def test_sd2_v_prediction_from_a1111_yaml_sidecar(model_files, tmp_path, tokenizer_cache):
    path = tmp_path / "v-model.safetensors"
    path.write_bytes(model_files["sd2"].read_bytes())
    assert checkpoints.load_single_file(path, tokenizer_cache).prediction_type == "epsilon"
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    loaded = checkpoints.load_single_file(path, tokenizer_cache)
    assert loaded.prediction_type == "v_prediction"
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"


def test_v_prediction_probe_tells_the_two_apart(tiny_models):
    unet = tiny_models["sd2"]["unet"]
    # A UNet that returns its input behaves like an epsilon model at t=999, its negation like a v model.
    class Echo(torch.nn.Module):
        def __init__(self, sign):
            super().__init__()
            self.sign = sign
            self.config = unet.config
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, encoder_hidden_states):
            return type("Out", (), {"sample": self.sign * x * 3})()

    assert checkpoints.probe_v_prediction(Echo(-1)) is True
    assert checkpoints.probe_v_prediction(Echo(1)) is False


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_ckpt_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt.*convert it to .safetensors"):
        checkpoints.read_state_dict(path)
    assert not marker.exists()


def test_old_style_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.ckpt"
    with open(path, "wb") as handle:
        pickle.dump(_Exploit(marker), handle)
    with pytest.raises(CheckpointLoadError):
        checkpoints.read_state_dict(path)
    assert not marker.exists()


def test_ckpt_with_lightning_callbacks_and_numpy_scalars_loads(tmp_path):
    """Original SD .ckpt files pickle a pytorch_lightning callback and numpy scalars beside the weights."""
    import io

    import numpy as np

    class ModelCheckpoint:  # pickled under pytorch_lightning's name, as real files are
        pass

    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    callback = ModelCheckpoint()
    callback.best_model_score = np.float64(0.5)
    buffer = io.BytesIO()
    import sys
    import types

    fake = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    fake.ModelCheckpoint = ModelCheckpoint
    saved = {name: sys.modules.get(name) for name in ("pytorch_lightning", "pytorch_lightning.callbacks",
                                                      "pytorch_lightning.callbacks.model_checkpoint")}
    sys.modules.update(dict.fromkeys(saved, fake))
    try:
        torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {"ModelCheckpoint": callback},
                    "epoch": np.int64(3)}, buffer)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    path = tmp_path / "lightning.ckpt"
    path.write_bytes(buffer.getvalue())
    assert torch.equal(checkpoints.read_state_dict(path)["w"], torch.ones(2))


def test_truncated_safetensors_names_the_file(model_files, tmp_path):
    path = tmp_path / "broken.safetensors"
    data = model_files["sd1"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError, match="broken.safetensors.*truncated or corrupt"):
        checkpoints.read_state_dict(path)
    with pytest.raises(CheckpointLoadError, match="broken.safetensors"):
        checkpoints.read_shapes(path)


def test_truncated_ckpt_names_the_file(model_files, tmp_path):
    path = tmp_path / "broken.ckpt"
    data = model_files["sd1-ckpt"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError, match="broken.ckpt"):
        checkpoints.read_state_dict(path)
    assert zipfile.is_zipfile(model_files["sd1-ckpt"])


def test_text_file_is_not_a_checkpoint(tmp_path, tokenizer_cache):
    path = tmp_path / "notes.safetensors"
    path.write_text("not a model at all")
    with pytest.raises(CheckpointLoadError, match="notes.safetensors"):
        checkpoints.load_single_file(path, tokenizer_cache)


def test_lora_file_is_sent_to_the_lora_folder(tmp_path, tokenizer_cache):
    from safetensors.torch import save_file

    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, path)
    with pytest.raises(CheckpointFormatError, match="style.safetensors.*models/Lora"):
        checkpoints.load_single_file(path, tokenizer_cache)


def test_standalone_vae_in_original_and_diffusers_layout(tmp_path, tiny_models):
    from safetensors.torch import save_file

    from backend import ldm_layout

    vae = tiny_models["sd1"]["vae"]
    original = ldm_layout.vae_to_ldm(vae.state_dict(), prefix="")
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "orig.safetensors")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "diff.safetensors")
    torch.save({"state_dict": original}, tmp_path / "orig.vae.pt")
    assert_same_weights(checkpoints.load_vae_file(tmp_path / "orig.safetensors", "sd1"), vae)
    assert_same_weights(checkpoints.load_vae_file(tmp_path / "orig.vae.pt", "sd1"), vae)
    # A diffusers-layout file carries no shapes for the config, so it must match the family's VAE.
    with pytest.raises(CheckpointFormatError):
        checkpoints.load_vae_file(tmp_path / "diff.safetensors", "sd1")
