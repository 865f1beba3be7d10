"""SD3 / SD3.5 MMDiT files in Stability's layout: config from shapes, key mapping, loading into diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from backend import random_sd3, sd3_layout
from backend.model_detection import CheckpointFormatError

VARIANTS = {
    "sd3-medium": random_sd3.tiny_config(qk_norm=False),
    "sd3.5-large": random_sd3.tiny_config(qk_norm=True),
    "sd3.5-medium": random_sd3.tiny_config(dual_attention=True, qk_norm=True),
}

# The released models' diffusers configs (their hub `transformer/config.json`), to check the
# derivation at full size on meta tensors, without downloading anything.
REAL_CONFIGS = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-large": dict(
        num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm"
    ),
    "sd3.5-medium": dict(
        num_layers=24,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
}
REAL_DEFAULTS = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    out_channels=16,
    dual_attention_layers=(),
    qk_norm=None,
)


@pytest.fixture(scope="module")
def transformers() -> dict:
    return {name: random_sd3.build_transformer(config, seed=7) for name, config in VARIANTS.items()}


def shapes_of(state_dict: dict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that also works for float8, which has no `torch.equal` on the CPU."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def model_inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 16, 16, generator=generator),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=generator),
        pooled_projections=torch.randn(1, 64, generator=generator),
        timestep=torch.tensor([500.0]),
    )


def run(transformer) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**model_inputs(), return_dict=False)[0]


def load_stability_file(path) -> SD3Transformer2DModel:
    state = sd3_layout.strip_prefix(load_file(path))
    config = sd3_layout.transformer_config(shapes_of(state))
    transformer = SD3Transformer2DModel(**config)
    transformer.load_state_dict(sd3_layout.to_diffusers(state, config), strict=True)
    return transformer.eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_config_is_derived_from_stability_shapes(transformers, name):
    state = sd3_layout.from_diffusers(transformers[name].state_dict(), VARIANTS[name])
    assert sd3_layout.transformer_config(shapes_of(state)) == VARIANTS[name]
    prefixed = {sd3_layout.PREFIX + key: shape for key, shape in shapes_of(state).items()}
    assert sd3_layout.transformer_config(prefixed) == VARIANTS[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_config_is_derived_from_diffusers_shapes(transformers, name):
    assert sd3_layout.transformer_config_from_diffusers(shapes_of(transformers[name].state_dict())) == VARIANTS[name]


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_config_of_released_sizes(name):
    expected = {**REAL_DEFAULTS, **REAL_CONFIGS[name]}
    with torch.device("meta"):
        state = SD3Transformer2DModel(**expected).state_dict()
    stability = sd3_layout.from_diffusers(state, expected)
    assert sd3_layout.transformer_config(shapes_of(stability)) == expected


def test_head_dim_comes_from_qk_norm_when_heads_differ_from_blocks():
    config = {**VARIANTS["sd3.5-large"], "num_layers": 3}  # 2 heads of 16 over 3 blocks
    state = random_sd3.build_transformer(config).state_dict()
    derived = sd3_layout.transformer_config(shapes_of(sd3_layout.from_diffusers(state, config)))
    assert (derived["attention_head_dim"], derived["num_attention_heads"], derived["num_layers"]) == (16, 2, 3)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_round_trip_is_exact(transformers, name, dtype):
    config = VARIANTS[name]
    diffusers_state = {key: value.to(dtype) for key, value in transformers[name].state_dict().items()}
    stability = sd3_layout.from_diffusers(diffusers_state, config)
    back = sd3_layout.to_diffusers(stability, config)
    assert back.keys() == diffusers_state.keys()
    assert all(same_bits(back[key], diffusers_state[key]) for key in back)
    again = sd3_layout.from_diffusers(back, config)
    assert again.keys() == stability.keys()
    assert all(same_bits(again[key], stability[key]) for key in again)


def test_to_diffusers_splits_qkv_into_views_and_leaves_the_input_alone(transformers):
    config = VARIANTS["sd3.5-medium"]
    stability = sd3_layout.from_diffusers(transformers["sd3.5-medium"].state_dict(), config)
    stability = {key: value.to(torch.bfloat16) for key, value in stability.items()}
    keys_before = list(stability)
    converted = sd3_layout.to_diffusers(stability, config)
    assert list(stability) == keys_before
    for fused, part in [
        ("joint_blocks.0.x_block.attn.qkv.weight", "transformer_blocks.0.attn.to_k.weight"),
        ("joint_blocks.1.context_block.attn.qkv.bias", "transformer_blocks.1.attn.add_v_proj.bias"),
        ("joint_blocks.0.x_block.attn2.qkv.weight", "transformer_blocks.0.attn2.to_q.weight"),
    ]:
        assert converted[part].untyped_storage().data_ptr() == stability[fused].untyped_storage().data_ptr()
    assert converted["proj_out.weight"] is stability["final_layer.linear.weight"]


def test_final_adaln_halves_are_swapped(transformers):
    config = VARIANTS["sd3-medium"]
    state = transformers["sd3-medium"].state_dict()
    stability = sd3_layout.from_diffusers(state, config)
    scale, shift = state["norm_out.linear.weight"].chunk(2)
    assert torch.equal(stability["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    scale, shift = state["transformer_blocks.1.norm1_context.linear.bias"].chunk(2)
    assert torch.equal(stability["joint_blocks.1.context_block.adaLN_modulation.1.bias"], torch.cat([shift, scale]))


def test_written_file_has_stability_key_names(tmp_path, transformers):
    path = random_sd3.save_transformer(tmp_path / "sd35m.safetensors", transformers["sd3.5-medium"])
    with safe_open(str(path), framework="pt") as file:
        keys = set(file.keys())
        dtypes = {file.get_tensor(key).dtype for key in keys}
    hidden = VARIANTS["sd3.5-medium"]["caption_projection_dim"]
    shapes = {key: tuple(value.shape) for key, value in load_file(path).items()}
    expected = [
        "joint_blocks.0.x_block.attn.qkv.weight",
        "joint_blocks.1.context_block.attn.qkv.weight",
        "joint_blocks.0.x_block.attn.ln_q.weight",
        "joint_blocks.0.context_block.attn.ln_k.weight",
        "joint_blocks.0.x_block.attn2.qkv.weight",
        "joint_blocks.0.x_block.attn2.ln_q.weight",
        "joint_blocks.1.x_block.adaLN_modulation.1.weight",
        "joint_blocks.0.context_block.attn.proj.weight",
        "joint_blocks.1.context_block.adaLN_modulation.1.weight",
        "x_embedder.proj.weight",
        "pos_embed",
        "t_embedder.mlp.0.weight",
        "y_embedder.mlp.0.weight",
        "context_embedder.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
    ]
    assert [key for key in expected if sd3_layout.PREFIX + key not in keys] == []
    assert all(key.startswith(sd3_layout.PREFIX) for key in keys)
    assert not any("transformer_blocks" in key or "to_q" in key for key in keys)
    # The last block's context stream is "pre only"; only SD3.5 Medium's first blocks have attn2.
    assert sd3_layout.PREFIX + "joint_blocks.1.context_block.attn.proj.weight" not in keys
    assert sd3_layout.PREFIX + "joint_blocks.1.context_block.mlp.fc1.weight" not in keys
    assert sd3_layout.PREFIX + "joint_blocks.1.x_block.attn2.qkv.weight" not in keys
    block = sd3_layout.PREFIX + "joint_blocks.{}.{}.adaLN_modulation.1.weight"
    assert shapes[block.format(0, "x_block")] == (9 * hidden, hidden)  # dual attention: 9 chunks
    assert shapes[block.format(1, "x_block")] == (6 * hidden, hidden)
    assert shapes[block.format(0, "context_block")] == (6 * hidden, hidden)
    assert shapes[block.format(1, "context_block")] == (2 * hidden, hidden)
    assert shapes[sd3_layout.PREFIX + "pos_embed"] == (1, 16 * 16, hidden)
    assert dtypes == {torch.float16}


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("prefix", [sd3_layout.PREFIX, ""], ids=["prefixed", "bare"])
def test_stability_file_loads_with_equal_outputs(tmp_path, transformers, name, prefix):
    original = transformers[name]
    path = random_sd3.save_transformer(tmp_path / "model.safetensors", original, dtype=torch.float32, prefix=prefix)
    loaded = load_stability_file(path)
    assert dict(loaded.config) == dict(original.config)
    expected = run(original)
    assert expected.shape == (1, 16, 16, 16) and expected.std() > 0.1
    assert (run(loaded) - expected).abs().max() <= 1e-6


def test_half_precision_file_loads_the_rounded_weights(tmp_path, transformers):
    original = transformers["sd3.5-large"]
    path = random_sd3.save_transformer(tmp_path / "model.safetensors", original, dtype=torch.float16)
    rounded = random_sd3.build_transformer(VARIANTS["sd3.5-large"], seed=7)
    rounded.load_state_dict({key: value.half().float() for key, value in original.state_dict().items()})
    assert (run(load_stability_file(path)) - run(rounded)).abs().max() <= 1e-6
    assert (run(rounded) - run(original)).abs().max() > 0  # the rounding is visible: the check above is not vacuous


def test_different_seed_gives_a_different_output():
    config = VARIANTS["sd3.5-large"]
    assert (
        run(random_sd3.build_transformer(config, 0)) - run(random_sd3.build_transformer(config, 1))
    ).abs().max() > 0.01


def test_diffusers_layout_file_loads(tmp_path, transformers):
    original = transformers["sd3.5-medium"]
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({key: value.contiguous() for key, value in original.state_dict().items()}, str(path))
    state = load_file(path)
    assert sd3_layout.is_diffusers_layout(state)
    config = sd3_layout.transformer_config_from_diffusers(shapes_of(state))
    loaded = SD3Transformer2DModel(**config)
    loaded.load_state_dict(state, strict=True)
    assert (run(loaded.eval()) - run(original)).abs().max() <= 1e-6


def test_is_diffusers_layout(transformers):
    state = transformers["sd3-medium"].state_dict()
    stability = sd3_layout.from_diffusers(state, VARIANTS["sd3-medium"])
    assert sd3_layout.is_diffusers_layout(state.keys())
    assert not sd3_layout.is_diffusers_layout(stability.keys())
    assert not sd3_layout.is_diffusers_layout(sd3_layout.PREFIX + key for key in stability)


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({"pos_embed": 1, "x_embedder.proj.weight": 2}, {"pos_embed": 1, "x_embedder.proj.weight": 2}),
        ({"model.diffusion_model.pos_embed": 1, "first_stage_model.decoder.conv_in.weight": 2}, {"pos_embed": 1}),
        ({"model.diffusion_model.pos_embed": 1, "text_encoders.clip_l.transformer.x": 2}, {"pos_embed": 1}),
        ({}, {}),
    ],
)
def test_strip_prefix(mapping, expected):
    assert sd3_layout.strip_prefix(mapping) == expected


@pytest.mark.parametrize(
    ("drop", "names"),
    [
        (lambda key: key == "final_layer.linear.weight", ["final_layer.linear.weight"]),
        (lambda key: key in ("pos_embed", "y_embedder.mlp.0.weight"), ["pos_embed", "y_embedder.mlp.0.weight"]),
        (lambda key: key.startswith("joint_blocks."), ["joint_blocks."]),
        (lambda key: key.startswith("joint_blocks.0."), ["joint_blocks.0"]),
    ],
    ids=["final-layer", "embeddings", "no-blocks", "first-block"],
)
def test_incomplete_file_config_names_what_is_missing(transformers, drop, names):
    stability = sd3_layout.from_diffusers(transformers["sd3.5-large"].state_dict(), VARIANTS["sd3.5-large"])
    shapes = {key: shape for key, shape in shapes_of(stability).items() if not drop(key)}
    with pytest.raises(CheckpointFormatError) as error:
        sd3_layout.transformer_config(shapes)
    assert all(name in str(error.value) for name in names)


@pytest.mark.parametrize(
    ("drop", "name"),
    [
        (lambda key: key == "joint_blocks.0.x_block.mlp.fc2.bias", "joint_blocks.0.x_block.mlp.fc2.bias"),
        (lambda key: key == "joint_blocks.1.context_block.attn.ln_q.weight", "joint_blocks.1.context_block.attn.ln_q"),
        # Without its last block the file's new last block still has a full context stream.
        (lambda key: key.startswith("joint_blocks.1."), "joint_blocks.0.context_block.attn.proj"),
    ],
    ids=["mlp-bias", "context-qk-norm", "last-block"],
)
def test_incomplete_file_conversion_names_what_is_wrong(transformers, drop, name):
    stability = sd3_layout.from_diffusers(transformers["sd3.5-large"].state_dict(), VARIANTS["sd3.5-large"])
    stability = {key: value for key, value in stability.items() if not drop(key)}
    with pytest.raises(CheckpointFormatError, match=name.replace(".", r"\.")):
        sd3_layout.to_diffusers(stability, sd3_layout.transformer_config(shapes_of(stability)))


def test_from_diffusers_rejects_a_mismatched_config(transformers):
    with pytest.raises(CheckpointFormatError, match="attn2"):
        sd3_layout.from_diffusers(transformers["sd3.5-medium"].state_dict(), VARIANTS["sd3.5-large"])


def test_sd1_unet_is_not_an_sd3_transformer():
    shapes = {"input_blocks.0.0.weight": (320, 4, 3, 3), "out.2.weight": (4, 320, 3, 3)}
    with pytest.raises(CheckpointFormatError, match="missing pos_embed"):
        sd3_layout.transformer_config(shapes)


@pytest.mark.parametrize("name", VARIANTS)
def test_mapping_agrees_with_diffusers_own_converter(transformers, name):
    """An independent reference: a mapping error made the same way in both directions would survive
    the round trip and the output checks, but not this one."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    stability = sd3_layout.from_diffusers(transformers[name].state_dict(), VARIANTS[name])
    ours = sd3_layout.to_diffusers(stability, VARIANTS[name])
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(stability))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
