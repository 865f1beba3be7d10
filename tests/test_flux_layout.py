"""FLUX.1 transformer files in Black Forest Labs' layout: key mapping, config from shapes, loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from backend import flux_layout, random_flux
from backend.model_detection import CheckpointFormatError

# Names as they appear in flux1-dev.safetensors.
REAL_NAMES = [
    "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.0.img_attn.norm.query_norm.scale",
    "double_blocks.0.img_mlp.0.weight",
    "double_blocks.0.img_mod.lin.weight",
    "double_blocks.0.txt_attn.proj.weight",
    "single_blocks.0.linear1.weight",
    "single_blocks.0.linear2.weight",
    "single_blocks.0.modulation.lin.weight",
    "single_blocks.0.norm.key_norm.scale",
    "final_layer.adaLN_modulation.1.weight",
    "final_layer.linear.weight",
    "img_in.weight",
    "time_in.in_layer.weight",
    "txt_in.weight",
    "vector_in.in_layer.weight",
]
# A narrower, differently shaped FLUX-architecture model: 24 wide (3 heads of 8), 1 double + 3 single blocks.
NARROW = dict(
    random_flux.tiny_config(guidance=False),
    in_channels=16,
    out_channels=16,
    num_layers=1,
    num_single_layers=3,
    attention_head_dim=8,
    num_attention_heads=3,
    joint_attention_dim=24,
    pooled_projection_dim=16,
    axes_dims_rope=flux_layout.rope_axes(8),
)
CONFIGS = {
    "dev": random_flux.tiny_config(guidance=True),
    "schnell": random_flux.tiny_config(guidance=False),
    "narrow": NARROW,
}


def _rounded_transformer(config, seed=0):
    """A random transformer whose weights are exactly representable in bf16, so a bf16 file round-trips exactly."""
    transformer = random_flux.build_transformer(config, seed=seed)
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.copy_(parameter.to(torch.bfloat16))
    return transformer


def _inputs(config, seed=1):
    generator = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1] = torch.arange(16) // 4
    img_ids[:, 2] = torch.arange(16) % 4
    return dict(
        hidden_states=torch.randn(1, 16, config["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(1, 8, config["joint_attention_dim"], generator=generator),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=generator),
        timestep=torch.tensor([0.7]),
        img_ids=img_ids,
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]) if config["guidance_embeds"] else None,
    )


def _run(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def _load(config, state_dict):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_config(config).eval()
    transformer.load_state_dict(state_dict, strict=True)
    return transformer


def _shapes(state_dict):
    return {key: tuple(value.shape) for key, value in state_dict.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_exact_for_every_key(name):
    config = CONFIGS[name]
    state = random_flux.build_transformer(config).state_dict()
    back = flux_layout.to_diffusers(flux_layout.from_diffusers(state, config), config)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_original_layout_file_loads_with_identical_outputs(tmp_path, name, prefix):
    config = CONFIGS[name]
    reference = _rounded_transformer(config)
    path = random_flux.save_transformer(tmp_path / "flux.safetensors", reference, torch.bfloat16, prefix)

    state = flux_layout.strip_prefix(load_file(str(path)))
    assert not flux_layout.is_diffusers_layout(state)
    derived = flux_layout.transformer_config(_shapes(state))
    assert derived == config
    loaded = _load(derived, flux_layout.to_diffusers(state, derived))

    inputs = _inputs(config)
    expected = _run(reference, inputs)
    assert expected.abs().mean() > 0.1
    assert torch.equal(_run(loaded, inputs), expected)


def test_the_final_modulation_swap_matters():
    # Proves the comparison above can fail: loading BFL's (shift, scale) order unswapped changes the output.
    config = CONFIGS["dev"]
    reference = random_flux.build_transformer(config)
    state = flux_layout.to_diffusers(flux_layout.from_diffusers(reference.state_dict(), config), config)
    for suffix in ("weight", "bias"):
        state[f"norm_out.linear.{suffix}"] = flux_layout.from_diffusers(reference.state_dict(), config)[
            f"final_layer.adaLN_modulation.1.{suffix}"
        ]
    inputs = _inputs(config)
    assert (_run(_load(config, state), inputs) - _run(reference, inputs)).abs().max() > 1e-3


# (original key, its rows, diffusers key, its rows) as Black Forest Labs' flux/model.py and diffusers'
# FluxTransformer2DModel define them; W is the tiny width. Independent of from_diffusers, which the other tests use.
W = 32
ALL = slice(None)
SEMANTICS = [
    ("double_blocks.1.img_attn.qkv.weight", slice(0, W), "transformer_blocks.1.attn.to_q.weight", ALL),
    ("double_blocks.1.img_attn.qkv.bias", slice(W, 2 * W), "transformer_blocks.1.attn.to_k.bias", ALL),
    ("double_blocks.0.txt_attn.qkv.weight", slice(2 * W, 3 * W), "transformer_blocks.0.attn.add_v_proj.weight", ALL),
    ("double_blocks.0.img_attn.norm.query_norm.scale", ALL, "transformer_blocks.0.attn.norm_q.weight", ALL),
    ("double_blocks.0.txt_attn.norm.key_norm.scale", ALL, "transformer_blocks.0.attn.norm_added_k.weight", ALL),
    ("double_blocks.0.img_attn.proj.weight", ALL, "transformer_blocks.0.attn.to_out.0.weight", ALL),
    ("double_blocks.0.txt_attn.proj.bias", ALL, "transformer_blocks.0.attn.to_add_out.bias", ALL),
    ("double_blocks.1.txt_mod.lin.weight", ALL, "transformer_blocks.1.norm1_context.linear.weight", ALL),
    ("double_blocks.1.img_mlp.2.weight", ALL, "transformer_blocks.1.ff.net.2.weight", ALL),
    ("double_blocks.1.txt_mlp.0.bias", ALL, "transformer_blocks.1.ff_context.net.0.proj.bias", ALL),
    ("single_blocks.1.linear1.weight", slice(W, 2 * W), "single_transformer_blocks.1.attn.to_k.weight", ALL),
    ("single_blocks.1.linear1.bias", slice(3 * W, 7 * W), "single_transformer_blocks.1.proj_mlp.bias", ALL),
    ("single_blocks.0.linear2.weight", ALL, "single_transformer_blocks.0.proj_out.weight", ALL),
    ("single_blocks.0.modulation.lin.bias", ALL, "single_transformer_blocks.0.norm.linear.bias", ALL),
    ("single_blocks.0.norm.key_norm.scale", ALL, "single_transformer_blocks.0.attn.norm_k.weight", ALL),
    # BFL's LastLayer modulation is (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift).
    ("final_layer.adaLN_modulation.1.weight", slice(0, W), "norm_out.linear.weight", slice(W, 2 * W)),
    ("final_layer.adaLN_modulation.1.bias", slice(W, 2 * W), "norm_out.linear.bias", slice(0, W)),
    ("final_layer.linear.weight", ALL, "proj_out.weight", ALL),
    ("img_in.bias", ALL, "x_embedder.bias", ALL),
    ("txt_in.weight", ALL, "context_embedder.weight", ALL),
    ("time_in.out_layer.weight", ALL, "time_text_embed.timestep_embedder.linear_2.weight", ALL),
    ("vector_in.in_layer.weight", ALL, "time_text_embed.text_embedder.linear_1.weight", ALL),
    ("guidance_in.in_layer.bias", ALL, "time_text_embed.guidance_embedder.linear_1.bias", ALL),
]


def test_to_diffusers_follows_the_architectures():
    config = CONFIGS["dev"]
    generator = torch.Generator().manual_seed(0)
    shapes = _shapes(flux_layout.from_diffusers(random_flux.build_transformer(config).state_dict(), config))
    original = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    converted = flux_layout.to_diffusers(original, config)
    for original_key, original_rows, diffusers_key, diffusers_rows in SEMANTICS:
        expected = original[original_key][original_rows]
        assert torch.equal(converted[diffusers_key][diffusers_rows], expected), diffusers_key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_from_diffusers_layout(name):
    config = CONFIGS[name]
    state = random_flux.build_transformer(config).state_dict()
    assert flux_layout.is_diffusers_layout(state)
    assert flux_layout.transformer_config_from_diffusers(_shapes(state)) == config


def test_dev_has_guidance_and_schnell_has_none():
    dev = flux_layout.from_diffusers(random_flux.build_transformer(CONFIGS["dev"]).state_dict(), CONFIGS["dev"])
    schnell_config = CONFIGS["schnell"]
    schnell = flux_layout.from_diffusers(random_flux.build_transformer(schnell_config).state_dict(), schnell_config)
    assert flux_layout.transformer_config(_shapes(dev))["guidance_embeds"] is True
    assert flux_layout.transformer_config(_shapes(schnell))["guidance_embeds"] is False
    assert "guidance_in.in_layer.weight" in dev
    assert not any(key.startswith("guidance_in.") for key in schnell)


def test_written_file_uses_the_real_key_names(tmp_path):
    transformer = random_flux.build_transformer(CONFIGS["dev"])
    keys = set(load_file(str(random_flux.save_transformer(tmp_path / "f.safetensors", transformer))))
    assert set(REAL_NAMES) <= keys
    assert "guidance_in.in_layer.weight" in keys
    # Each double block fuses 2 x (q, k, v) weights and biases (8 fewer keys), each single block 2 x (q, k, v, mlp) (6).
    assert len(keys) == len(transformer.state_dict()) - 2 * 8 - 2 * 6


def test_fused_shapes_follow_the_width():
    config = CONFIGS["narrow"]
    original = flux_layout.from_diffusers(random_flux.build_transformer(config).state_dict(), config)
    assert original["double_blocks.0.img_attn.qkv.weight"].shape == (3 * 24, 24)
    assert original["single_blocks.2.linear1.weight"].shape == (3 * 24 + 4 * 24, 24)
    assert original["single_blocks.2.linear2.weight"].shape == (24, 24 + 4 * 24)
    assert original["final_layer.adaLN_modulation.1.weight"].shape == (2 * 24, 24)


@pytest.mark.parametrize(
    ("head_dim", "axes"),
    [(128, (16, 56, 56)), (64, (8, 28, 28)), (96, (12, 42, 42)), (32, (4, 14, 14)), (16, (4, 6, 6)), (8, (4, 2, 2))],
)
def test_rope_axes(head_dim, axes):
    assert flux_layout.rope_axes(head_dim) == axes
    assert sum(axes) == head_dim


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        # ComfyUI's all-in-one file: the VAE and text encoders are dropped.
        (["model.diffusion_model.img_in.weight", "vae.decoder.x", "text_encoders.t5xxl.w"], ["img_in.weight"]),
        (["diffusion_model.img_in.weight", "first_stage_model.x"], ["img_in.weight"]),
        (["img_in.weight", "txt_in.weight"], ["img_in.weight", "txt_in.weight"]),
    ],
)
def test_strip_prefix(keys, expected):
    assert sorted(flux_layout.strip_prefix(dict.fromkeys(keys, (1,)))) == expected


def test_float8_converts_and_splits_are_views():
    config = CONFIGS["dev"]
    state = {k: v.to(torch.float8_e4m3fn) for k, v in random_flux.build_transformer(config).state_dict().items()}
    original = flux_layout.from_diffusers(state, config)
    back = flux_layout.to_diffusers(original, config)
    for key, value in state.items():
        assert back[key].dtype == torch.float8_e4m3fn, key
        # torch.equal has no float8 kernel on the CPU: compare the bytes.
        assert torch.equal(back[key].view(torch.uint8), value.view(torch.uint8)), key
    qkv = original["double_blocks.1.txt_attn.qkv.weight"]
    value = back["transformer_blocks.1.attn.add_v_proj.weight"]
    assert value.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()


def _original(config=None):
    config = config or CONFIGS["dev"]
    return flux_layout.from_diffusers(random_flux.build_transformer(config).state_dict(), config)


def test_incomplete_file_names_what_is_missing():
    config = CONFIGS["dev"]
    state = _original()
    del state["single_blocks.1.linear2.bias"]
    with pytest.raises(CheckpointFormatError, match=r"single_blocks\.1\.linear2\.bias"):
        flux_layout.to_diffusers(state, config)
    with pytest.raises(CheckpointFormatError, match=r"img_in\.weight"):
        flux_layout.transformer_config({k: v.shape for k, v in state.items() if not k.startswith("img_in.")})
    gap = {k: v.shape for k, v in state.items() if not k.startswith("double_blocks.0.")}
    with pytest.raises(CheckpointFormatError, match=r"double_blocks\.0"):
        flux_layout.transformer_config(gap)


def test_unexpected_tensors_and_wrong_widths_are_refused():
    config = CONFIGS["dev"]
    state = _original()
    with pytest.raises(CheckpointFormatError, match="scale_weight"):
        flux_layout.to_diffusers({**state, "img_in.scale_weight": torch.ones(())}, config)
    narrow_mlp = dict(_shapes(state), **{"double_blocks.0.img_mlp.0.weight": (96, 32)})
    with pytest.raises(CheckpointFormatError, match="MLP ratio"):
        flux_layout.transformer_config(narrow_mlp)
    with pytest.raises(CheckpointFormatError, match="rows"):
        flux_layout.to_diffusers(state, dict(config, attention_head_dim=8, num_attention_heads=2))
