"""Text-encoder files for FLUX.1 / SD 3.5: tiny random CLIP-L, CLIP-G and T5 encoders written in the
layouts users download (text_model.* and flat CLIP; T5 with and without encoder.embed_tokens; fp32,
fp16, fp8 and ComfyUI's scaled fp8) load to the same outputs; roles and all-in-one prefixes are found
from the tensors; files that belong in another folder are refused by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from backend import random_text_encoders as random_te
from backend.model_detection import CheckpointFormatError
from backend.text_encoder_files import (
    clip_config,
    embedded_encoders,
    encoder_role,
    load_encoder,
    load_encoder_file,
    t5_config,
)

CLIP_IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])  # "a photo of a cat"
T5_IDS = torch.tensor([[71, 1782, 13, 3, 9, 1712, 1]])
# e4m3 keeps 3 mantissa bits (~3% rounding per weight): measured output errors against the fp16 file
# were 5-8% (relative L2) on tiny random encoders; 15% leaves room without letting a wrong scale pass.
FP8_OUTPUT_TOLERANCE = 0.15
FP8_WEIGHT_TOLERANCE = 0.04  # scaled fp8 weights, relative L2 against the originals (measured ~2%)


@torch.no_grad()
def outputs(model, ids) -> dict[str, torch.Tensor]:
    return {key: value.float() for key, value in model(ids).items() if isinstance(value, torch.Tensor)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def assert_same(actual: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    """Bit-equal, except the projection: its one-row matmul takes another BLAS path when the weight is not
    64-byte aligned, as tensors read from a .safetensors file need not be (measured: 2.4e-7 apart)."""
    if key == "text_embeds":
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    else:
        assert torch.equal(actual, expected), key


def assert_materialised(model) -> None:
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    assert [name for name, tensor in tensors if tensor.is_meta] == []
    assert all(not tensor.requires_grad for _, tensor in tensors)
    assert not model.training


def shapes_of(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


@pytest.fixture(scope="module")
def encoders() -> dict:
    return {
        "clip_l": random_te.tiny_clip_l(seed=1),
        "clip_l_projection": random_te.tiny_clip_l(seed=2, projection=True),
        "clip_g": random_te.tiny_clip_g(seed=3),
        "t5xxl": random_te.tiny_t5(seed=4),
    }


def clip_shapes(width: int, text_model: bool = True, projection: bool = False) -> dict:
    base = "text_model." if text_model else ""
    shapes = {base + "embeddings.token_embedding.weight": (49408, width),
              base + "final_layer_norm.weight": (width,)}
    if projection:
        shapes["text_projection.weight"] = (width, width)
    return shapes


T5_SHAPES = {
    "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
    "encoder.final_layer_norm.weight": (4096,),
    "shared.weight": (32128, 4096),
}
VAE_SHAPES = {"encoder.conv_in.weight": (4, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (4, 4, 3, 3),
              "decoder.conv_out.weight": (3, 4, 3, 3)}


@pytest.mark.parametrize(("shapes", "expected"), [
    (clip_shapes(768), "clip_l"),
    (clip_shapes(768, projection=True), "clip_l"),  # SD 3's clip_l carries a projection
    (clip_shapes(768, text_model=False), "clip_l"),  # transformers 5's flat layout
    (clip_shapes(1280, projection=True), "clip_g"),
    (clip_shapes(1280, text_model=False, projection=True), "clip_g"),
    (clip_shapes(48, projection=True), "clip_g"),  # unknown width: the projection decides
    (clip_shapes(32), "clip_l"),
    (T5_SHAPES, "t5xxl"),
    ({k: v for k, v in T5_SHAPES.items() if k != "shared.weight"} | {"encoder.embed_tokens.weight": (32128, 4096)},
     "t5xxl"),
    (VAE_SHAPES, None),
    ({"text_encoders.clip_l.transformer." + k: v for k, v in clip_shapes(768).items()}, None),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, None),
])
def test_encoder_role_from_shapes(shapes, expected):
    assert encoder_role(shapes) == expected


@pytest.mark.parametrize(("name", "role", "layout"), [
    ("clip_l", "clip_l", "hf"), ("clip_l", "clip_l", "flat"), ("clip_g", "clip_g", "hf"), ("clip_g", "clip_g", "flat"),
    ("t5xxl", "t5xxl", "hf"), ("t5xxl", "t5xxl", "shared_only"),
])
def test_saved_files_are_recognised(encoders, tmp_path, name, role, layout):
    path = random_te.save_encoder(tmp_path / f"{name}.safetensors", encoders[name], layout=layout)
    from backend.checkpoints import read_shapes

    assert encoder_role(read_shapes(path)) == role


@pytest.mark.parametrize(("name", "layout", "cls"), [
    ("clip_l", "hf", "CLIPTextModel"),
    ("clip_l", "flat", "CLIPTextModel"),
    ("clip_g", "hf", "CLIPTextModelWithProjection"),
    ("clip_g", "flat", "CLIPTextModelWithProjection"),
])
def test_clip_round_trip_is_exact(encoders, tmp_path, name, layout, cls):
    path = random_te.save_encoder(tmp_path / "te.safetensors", encoders[name], torch.float32, layout)
    role, model = load_encoder_file(path, torch.float32)
    assert (role, type(model).__name__) == (name, cls)
    assert_materialised(model)
    expected, actual = outputs(encoders[name], CLIP_IDS), outputs(model, CLIP_IDS)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert_same(actual[key], expected[key], key)


def test_clip_l_with_projection_keeps_it_unless_told(encoders, tmp_path):
    original = encoders["clip_l_projection"]
    path = random_te.save_encoder(tmp_path / "clip_l.safetensors", original, torch.float32)
    # 32 wide with a projection reads as CLIP-G: an unknown width lets the caller say which it is.
    assert load_encoder_file(path, torch.float32)[0] == "clip_g"
    role, projected = load_encoder_file(path, torch.float32, role="clip_l")
    assert (role, type(projected).__name__) == ("clip_l", "CLIPTextModelWithProjection")
    assert projected.config.hidden_act == "quick_gelu"
    assert_same(outputs(projected, CLIP_IDS)["text_embeds"], outputs(original, CLIP_IDS)["text_embeds"], "text_embeds")
    _, plain = load_encoder_file(path, torch.float32, role="clip_l", with_projection=False)
    assert type(plain).__name__ == "CLIPTextModel"
    with torch.no_grad():
        pooled = original.text_model(CLIP_IDS).pooler_output
    assert torch.equal(outputs(plain, CLIP_IDS)["pooler_output"], pooled)


def test_clip_config_reads_sizes_and_projection(encoders):
    state = random_te.encoder_tensors(encoders["clip_g"], torch.float32)
    config = clip_config(shapes_of(state), "clip_g")
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (48, 192, 2)
    assert (config["projection_dim"], config["hidden_act"], config["architectures"]) == (
        48, "gelu", ["CLIPTextModelWithProjection"])
    without = {k: v for k, v in state.items() if not k.startswith("text_projection")}
    assert clip_config(shapes_of(without), "clip_l")["architectures"] == ["CLIPTextModel"]


def test_t5_config_from_tensors(encoders):
    config = t5_config(shapes_of(random_te.encoder_tensors(encoders["t5xxl"], layout="shared_only")))
    got = {key: getattr(config, key) for key in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "vocab_size",
                                                  "relative_attention_num_buckets", "dense_act_fn", "is_gated_act")}
    assert got == dict(d_model=32, d_ff=48, d_kv=16, num_heads=2, num_layers=2, vocab_size=32128,
                       relative_attention_num_buckets=32, dense_act_fn="gelu_new", is_gated_act=True)


@pytest.mark.parametrize("layout", ["hf", "shared_only"])
def test_t5_round_trip_is_exact_and_tied(encoders, tmp_path, layout):
    path = random_te.save_encoder(tmp_path / "t5.safetensors", encoders["t5xxl"], torch.float32, layout)
    rng = torch.random.get_rng_state()
    role, model = load_encoder_file(path, torch.float32)
    assert torch.equal(rng, torch.random.get_rng_state()), "loading drew random numbers: a random init ran"
    assert (role, type(model).__name__) == ("t5xxl", "T5EncoderModel")
    assert_materialised(model)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert torch.equal(outputs(model, T5_IDS)["last_hidden_state"],
                       outputs(encoders["t5xxl"], T5_IDS)["last_hidden_state"])


def test_t5_fp16_keeps_feed_forward_output_in_fp32(encoders, tmp_path):
    path = random_te.save_encoder(tmp_path / "t5xxl_fp16.safetensors", encoders["t5xxl"], torch.float16)
    _, model = load_encoder_file(path, torch.float16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith(".wo.weight")} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith(".wo.weight")} == {torch.float16}
    hidden = outputs(model, T5_IDS)["last_hidden_state"]
    assert relative_error(hidden, outputs(encoders["t5xxl"], T5_IDS)["last_hidden_state"]) < 1e-2


@pytest.mark.parametrize("name", ["t5xxl", "clip_g"])
@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_file_is_close_to_the_fp16_one(encoders, tmp_path, name, scaled):
    ids = T5_IDS if name == "t5xxl" else CLIP_IDS
    fp16 = random_te.save_encoder(tmp_path / "fp16.safetensors", encoders[name], torch.float16)
    fp8 = random_te.save_encoder(tmp_path / "fp8.safetensors", encoders[name], torch.float8_e4m3fn, scaled_fp8=scaled)
    reference = outputs(load_encoder_file(fp16, torch.float32)[1], ids)["last_hidden_state"]
    role, model = load_encoder_file(fp8, torch.float32)
    assert role == name
    assert_materialised(model)
    error = relative_error(outputs(model, ids)["last_hidden_state"], reference)
    assert 1e-3 < error < FP8_OUTPUT_TOLERANCE  # lower bound: the weights really went through fp8


def test_scaled_fp8_weights_are_multiplied_back(encoders):
    original = encoders["t5xxl"].state_dict()
    tensors = random_te.encoder_tensors(encoders["t5xxl"], torch.float8_e4m3fn, scaled_fp8=True)
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    assert tensors["scaled_fp8"].dtype == torch.float8_e4m3fn and tensors[key].float().abs().max() == 448
    loaded = load_encoder(tensors, "t5xxl", "t5xxl_fp8_e4m3fn_scaled.safetensors", torch.float32).state_dict()
    for name, weight in original.items():
        assert relative_error(loaded[name], weight) < FP8_WEIGHT_TOLERANCE, name


def all_in_one(encoders, roles: tuple[str, ...], transformer_key: str, vae_prefix: str) -> dict[str, torch.Tensor]:
    state = {transformer_key: torch.zeros(2, 2), vae_prefix + "decoder.conv_out.weight": torch.zeros(3, 4, 1, 1)}
    for role in roles:
        for key, value in random_te.encoder_tensors(encoders[role], torch.float32).items():
            state[f"text_encoders.{role}.transformer.{key}"] = value
    return state


@pytest.mark.parametrize(("roles", "transformer_key", "vae_prefix"), [
    (("clip_l", "t5xxl"), "model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "vae."),  # ComfyUI/Forge FLUX
    (("clip_l", "clip_g", "t5xxl"), "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
     "first_stage_model."),  # Stability's SD 3.5
])
def test_embedded_encoders_are_found_and_load(encoders, tmp_path, roles, transformer_key, vae_prefix):
    state = all_in_one(encoders, roles, transformer_key, vae_prefix)
    found = embedded_encoders(shapes_of(state))
    assert found == {role: f"text_encoders.{role}.transformer." for role in roles}
    for role, prefix in found.items():
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        model = load_encoder(inner, role, "all-in-one.safetensors", torch.float32)
        ids = T5_IDS if role == "t5xxl" else CLIP_IDS
        assert torch.equal(outputs(model, ids)["last_hidden_state"], outputs(encoders[role], ids)["last_hidden_state"])
    save_file(state, str(tmp_path / "flux-aio.safetensors"))
    with pytest.raises(CheckpointFormatError, match="put it in models/Stable-diffusion"):
        load_encoder_file(tmp_path / "flux-aio.safetensors", torch.float32)


def test_embedded_prefix_with_foreign_tensors_is_ignored(encoders):
    state = {f"text_encoders.t5xxl.transformer.{k}": v for k, v in
             random_te.encoder_tensors(encoders["clip_l"], torch.float32).items()}
    assert embedded_encoders(shapes_of(state)) == {}


@pytest.mark.parametrize(("shapes", "fix"), [
    (VAE_SHAPES, "it is a VAE; put it in models/VAE"),
    ({"vae.decoder.conv_out.weight": (3, 4, 3, 3), "model.diffusion_model.double_blocks.0.x.weight": (2, 2)},
     "it is a FLUX.1 model; put it in models/Stable-diffusion"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3)}, "it is a checkpoint; put it in models/Stable-diffusion"),
    ({"lora_unet_down_blocks_0.lora_down.weight": (4, 8)}, "it is a LoRA; put it in models/Lora"),
    ({"something.else": (3,)}, "models/text_encoder holds clip_l, clip_g and t5xxl files"),
])
def test_files_that_are_not_text_encoders_are_refused_with_their_folder(tmp_path, shapes, fix):
    path = tmp_path / "not-an-encoder.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    with pytest.raises(CheckpointFormatError, match="not-an-encoder.safetensors is not a text encoder") as info:
        load_encoder_file(path, torch.float32)
    assert fix in str(info.value)


def test_a_role_the_tensors_contradict_is_refused(encoders, tmp_path):
    t5 = random_te.save_encoder(tmp_path / "t5xxl_fp16.safetensors", encoders["t5xxl"])
    with pytest.raises(CheckpointFormatError, match="is a T5-XXL text encoder, not CLIP-L"):
        load_encoder_file(t5, torch.float32, role="clip_l")
    clip_l = tmp_path / "clip_l.safetensors"  # only the width is read before the role is checked
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 768)}, str(clip_l))
    with pytest.raises(CheckpointFormatError, match="is a CLIP-L text encoder, not CLIP-G"):
        load_encoder_file(clip_l, torch.float32, role="clip_g")


def test_packed_quantised_weights_are_refused(encoders):
    state = random_te.encoder_tensors(encoders["t5xxl"], torch.float32)
    state["encoder.block.0.layer.0.SelfAttention.q.weight.absmax"] = torch.ones(4)
    with pytest.raises(CheckpointFormatError, match="use the fp16 or fp8_e4m3fn version"):
        load_encoder(state, "t5xxl", "t5xxl_nf4.safetensors", torch.float32)
