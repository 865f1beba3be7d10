"""FLUX.1 and SD 3.x LoRAs in the layouts civitai serves (kohya, original-layout peft, diffusers/peft) on tiny
random models: each diffusers weight moves by its rows of the update, and the overlay's restore is exact."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from backend import random_flux, random_sd3, random_text_encoders
from backend.checkpoints import Components
from backend.devices import Placement
from backend.lora import Activation, LoraOverlay, match
from backend.lora_files import LayerUpdate, LoraError, LoraFile, load_lora
from backend.model_detection import ModelSpec
from backend.model_index import ModelFile
from backend.random_flow_models import tiny_vae
from backend.sd_model import StableDiffusionModel

H = 32  # hidden width of both tiny transformers
RANK = 4


def _fused(block: str, names: tuple[str, ...], sizes: tuple[int, ...]) -> list:
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [(f"{block}.{name}", ((start, stop),)) for name, start, stop in zip(names, bounds, bounds[1:])]


QKV, ADD_QKV = ("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
SWAPPED = ((H, 2 * H), (0, H))  # (shift, scale) in the original layout, (scale, shift) in diffusers'
# Original-layout layer -> [(diffusers module, the rows of the layer's update it takes; None: all)], written out
# from BFL's flux/model.py and diffusers' FluxTransformer2DModel, independently of backend.flux_layout.
FLUX_LAYERS = {
    "double_blocks.0.img_attn.qkv": _fused("transformer_blocks.0", QKV, (H, H, H)),
    "double_blocks.0.txt_attn.qkv": _fused("transformer_blocks.0", ADD_QKV, (H, H, H)),
    "double_blocks.0.img_attn.proj": [("transformer_blocks.0.attn.to_out.0", None)],
    "double_blocks.0.img_mlp.0": [("transformer_blocks.0.ff.net.0.proj", None)],
    "double_blocks.0.img_mod.lin": [("transformer_blocks.0.norm1.linear", None)],
    "double_blocks.1.img_mlp.2": [("transformer_blocks.1.ff.net.2", None)],
    "double_blocks.1.txt_attn.proj": [("transformer_blocks.1.attn.to_add_out", None)],
    "double_blocks.1.txt_mlp.0": [("transformer_blocks.1.ff_context.net.0.proj", None)],
    "double_blocks.1.txt_mlp.2": [("transformer_blocks.1.ff_context.net.2", None)],
    "double_blocks.1.txt_mod.lin": [("transformer_blocks.1.norm1_context.linear", None)],
    "single_blocks.0.linear1": _fused("single_transformer_blocks.0", (*QKV, "proj_mlp"), (H, H, H, 4 * H)),
    "single_blocks.0.modulation.lin": [("single_transformer_blocks.0.norm.linear", None)],
    "single_blocks.1.linear2": [("single_transformer_blocks.1.proj_out", None)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", SWAPPED)],
}
FLUX_UNTOUCHED = ["transformer_blocks.1.attn.to_q", "transformer_blocks.0.ff.net.2",
                  "single_transformer_blocks.1.attn.to_q", "x_embedder", "proj_out"]
# Stability's MMDiT names; the last block's context stream is "pre-only": its adaLN emits (shift, scale) too.
SD3_LAYERS = {
    "joint_blocks.0.x_block.attn.qkv": _fused("transformer_blocks.0", QKV, (H, H, H)),
    "joint_blocks.0.context_block.attn.qkv": _fused("transformer_blocks.0", ADD_QKV, (H, H, H)),
    "joint_blocks.0.x_block.attn.proj": [("transformer_blocks.0.attn.to_out.0", None)],
    "joint_blocks.0.context_block.attn.proj": [("transformer_blocks.0.attn.to_add_out", None)],
    "joint_blocks.0.x_block.mlp.fc1": [("transformer_blocks.0.ff.net.0.proj", None)],
    "joint_blocks.0.context_block.adaLN_modulation.1": [("transformer_blocks.0.norm1_context.linear", None)],
    "joint_blocks.1.x_block.mlp.fc2": [("transformer_blocks.1.ff.net.2", None)],
    "joint_blocks.1.context_block.adaLN_modulation.1": [("transformer_blocks.1.norm1_context.linear", SWAPPED)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", SWAPPED)],
}
SD3_UNTOUCHED = ["transformer_blocks.1.attn.to_q", "transformer_blocks.0.norm1.linear", "context_embedder"]
CLIP_Q = "text_model.encoder.layers.0.self_attn.q_proj"
T5_Q = "encoder.block.0.layer.0.SelfAttention.q"


# -- models ------------------------------------------------------------------------------------------
@pytest.fixture
def flux_model() -> StableDiffusionModel:
    """A tiny FLUX.1 dev, loaded as the model manager holds one."""
    transformer = random_flux.build_transformer(random_flux.tiny_config())
    vae = tiny_vae("flux", seed=3)
    spec = ModelSpec(family="flux", label="FLUX.1", unet=dict(transformer.config), vae=dict(vae.config),
                     text_encoders=(), scheduler={}, native_size=1024, prediction_type="flow")
    encoders = [random_text_encoders.tiny_clip_l(1), random_text_encoders.tiny_t5(2)]
    components = Components(spec=spec, unet=transformer, vae=vae, text_encoders=encoders, tokenizers=[],
                            scheduler_config={"prediction_type": "flow"}, prediction_type="flow")
    placement = Placement(torch.device("cpu"), torch.float32, torch.float32, "none")
    return StableDiffusionModel(ModelFile("tiny-flux", Path("tiny-flux.safetensors")), None, components, placement)


@pytest.fixture
def sd3_model() -> SimpleNamespace:
    """SD 3.5 has no family module yet: what LoRA matching reads of a model (transformer, CLIP-L, CLIP-G, T5)."""
    model = SimpleNamespace(family="sd3", engine=SimpleNamespace(label="SD 3", prediction="flow"),
                            unet=random_sd3.build_transformer(random_sd3.tiny_config()),
                            text_encoders=[random_text_encoders.tiny_clip_l(1, projection=True),
                                           random_text_encoders.tiny_clip_g(2), random_text_encoders.tiny_t5(3)])
    model.lora_overlay = LoraOverlay(model)
    return model


def module(root: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError:  # transformers 5's CLIPTextModel has no "text_model." level
        return root.get_submodule(name.removeprefix("text_model."))


def snapshot(model) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}
    for index, encoder in enumerate(model.text_encoders):
        state.update({f"te{index}.{k}": v.clone() for k, v in encoder.state_dict().items()})
    return state


def changed(model, before: dict[str, torch.Tensor]) -> list[str]:
    after = snapshot(model)
    assert after.keys() == before.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


def run(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if model.family == "sd3":
        inputs = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=generator),
                      encoder_hidden_states=torch.randn(1, 6, 32, generator=generator),
                      pooled_projections=torch.randn(1, 64, generator=generator), timestep=torch.tensor([500.0]))
    else:
        ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], dim=-1)
        inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=generator),
                      encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
                      pooled_projections=torch.randn(1, 32, generator=generator), timestep=torch.tensor([0.7]),
                      img_ids=ids, txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        return model.unet(**inputs, return_dict=False)[0]


# -- LoRA files ---------------------------------------------------------------------------------------
def factors(model, table: dict, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (down, up) per original-layout layer, sized from the diffusers modules it covers."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for layer, targets in table.items():
        first = module(model.unet, targets[0][0])
        rows = sum(module(model.unet, name).out_features for name, _ in targets)
        layers[layer] = (torch.randn(RANK, first.in_features, generator=generator) * 0.3,
                         torch.randn(rows, RANK, generator=generator) * 0.3)
    return layers


def encoder_factors(model, kohya_prefixes: tuple[str, ...], seed: int = 9) -> dict:
    """(kohya prefix, diffusers prefix, encoder, module name) -> (down, up): each encoder's first query."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for index, kohya in enumerate(kohya_prefixes):
        encoder = model.text_encoders[index]
        name = T5_Q if encoder.config.model_type == "t5" else CLIP_Q
        target = module(encoder, name)
        diffusers = "text_encoder." if index == 0 else f"text_encoder_{index + 1}."
        layers[(kohya, diffusers, index, name)] = (torch.randn(RANK, target.in_features, generator=generator),
                                                   torch.randn(target.out_features, RANK, generator=generator))
    return layers


def rows_of(up: torch.Tensor, ranges) -> torch.Tensor:
    return up if ranges is None else torch.cat([up[start:stop] for start, stop in ranges])


def write(path: Path, style: str, layers: dict, table: dict, encoders: dict, alpha: float | None = None,
          prefix: str = "", metadata: dict | None = None) -> Path:
    """One LoRA as a file: "kohya" (`lora_unet_*` with lora_down/lora_up), "original" (original-layout
    names with peft's lora_A/lora_B), "diffusers" (one pair per diffusers module)."""
    down_part, up_part = ("lora_down.weight", "lora_up.weight") if style == "kohya" else ("lora_A.weight", "lora_B.weight")
    pairs = {}
    for layer, (down, up) in layers.items():
        if style == "kohya":
            pairs["lora_unet_" + layer.replace(".", "_")] = (down, up)
        elif style == "original":
            pairs[prefix + layer] = (down, up)
        else:
            pairs.update({prefix + name: (down, rows_of(up, ranges)) for name, ranges in table[layer]})
    for (kohya, diffusers, _, name), (down, up) in encoders.items():
        pairs[kohya + name.replace(".", "_") if style == "kohya" else diffusers + name] = (down, up)
    tensors = {}
    for name, (down, up) in pairs.items():
        tensors[f"{name}.{down_part}"], tensors[f"{name}.{up_part}"] = down.clone(), up.clone()
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata=metadata)
    return path


def apply(model, path: Path, te: float = 1.0, unet: float = 1.0):
    lora = load_lora(ModelFile(path.stem, path))
    matched = match(lora, model)
    model.lora_overlay.apply([(lora, matched, Activation(lora.name, te, unet))])
    return matched


# -- exact values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_kohya_lora_moves_each_diffusers_weight_by_its_rows_and_restores_exactly(family, request, tmp_path):
    model = request.getfixturevalue(f"{family}_model")
    table, untouched = (FLUX_LAYERS, FLUX_UNTOUCHED) if family == "flux" else (SD3_LAYERS, SD3_UNTOUCHED)
    kohya_encoders = ("lora_te1_", "lora_te3_") if family == "flux" else ("lora_te1_", "lora_te2_", "lora_te3_")
    layers, encoders = factors(model, table), encoder_factors(model, kohya_encoders)
    path = write(tmp_path / "style.safetensors", "kohya", layers, table, encoders, alpha=8.0)  # scale 8 / 4
    before, plain = snapshot(model), run(model)

    matched = apply(model, path, te=0.5, unet=0.7)
    assert matched.unmatched == []
    for layer, (down, up) in layers.items():
        for name, ranges in table[layer]:
            expected = before[f"unet.{name}.weight"] + 0.7 * 2 * (rows_of(up, ranges) @ down)
            assert torch.allclose(module(model.unet, name).weight, expected, atol=1e-5), (layer, name)
    for (_, _, index, name), (down, up) in encoders.items():
        key = f"te{index}.{name if f'te{index}.{name}.weight' in before else name.removeprefix('text_model.')}"
        expected = before[f"{key}.weight"] + 0.5 * 2 * (up @ down)
        assert torch.allclose(module(model.text_encoders[index], name).weight, expected, atol=1e-5), name
    for name in untouched:
        assert torch.equal(module(model.unet, name).weight, before[f"unet.{name}.weight"]), name
    assert (run(model) - plain).abs().max() > 1e-3

    model.lora_overlay.restore()
    assert changed(model, before) == []
    assert torch.equal(run(model), plain)


FLUX_FORMATS = [
    # (layout, prefix): what ai-toolkit, ComfyUI, diffusers and other trainers write
    ("original", "diffusion_model."),
    ("original", ""),
    ("original", "transformer."),
    ("diffusers", "transformer."),
    ("diffusers", ""),
]


def test_the_same_flux_lora_merges_identically_in_every_layout(flux_model, tmp_path):
    layers, encoders = factors(flux_model, FLUX_LAYERS, seed=5), encoder_factors(flux_model, ("lora_te1_",))
    before = snapshot(flux_model)
    # alpha = rank: scale 1, as in peft files, which have no alpha
    apply(flux_model, write(tmp_path / "kohya.safetensors", "kohya", layers, FLUX_LAYERS, encoders, alpha=RANK), 0.8,
          0.6)
    reference = snapshot(flux_model)
    assert len(changed(flux_model, before)) == 22  # 14 original layers -> 21 diffusers modules, and CLIP's q
    flux_model.lora_overlay.restore()
    for index, (style, prefix) in enumerate(FLUX_FORMATS):
        path = write(tmp_path / f"{index}.safetensors", style, layers, FLUX_LAYERS, encoders, prefix=prefix)
        assert apply(flux_model, path, 0.8, 0.6).unmatched == []
        merged = snapshot(flux_model)
        assert [k for k in reference if not torch.equal(reference[k], merged[k])] == [], (style, prefix)
        flux_model.lora_overlay.restore()
        assert changed(flux_model, before) == []


def test_sd3_diffusers_lora_merges_as_its_kohya_twin(sd3_model, tmp_path):
    layers, encoders = factors(sd3_model, SD3_LAYERS, seed=6), encoder_factors(sd3_model, ("lora_te1_", "lora_te2_"))
    before = snapshot(sd3_model)
    apply(sd3_model, write(tmp_path / "kohya.safetensors", "kohya", layers, SD3_LAYERS, encoders, alpha=RANK))
    reference = snapshot(sd3_model)
    sd3_model.lora_overlay.restore()
    apply(sd3_model, write(tmp_path / "peft.safetensors", "diffusers", layers, SD3_LAYERS, encoders,
                           prefix="transformer."))
    merged = snapshot(sd3_model)
    assert [k for k in reference if not torch.equal(reference[k], merged[k])] == []
    assert len(changed(sd3_model, before)) == 15  # 9 original layers -> 13 diffusers modules, and two CLIPs' q
    sd3_model.lora_overlay.restore()
    assert changed(sd3_model, before) == []


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_lora_holding_the_difference_of_two_checkpoints_turns_one_into_the_other(family, request, tmp_path):
    """Full-weight differences (`diff`) of every layer, in the original layout: checks the whole name map
    against the checkpoint loader's own conversion (swapped halves included)."""
    from backend import flux_layout, sd3_layout

    model = request.getfixturevalue(f"{family}_model")
    build, layout = (random_flux, flux_layout) if family == "flux" else (random_sd3, sd3_layout)
    other = build.build_transformer(build.tiny_config(), seed=11)
    original = layout.from_diffusers(model.unet.state_dict(), model.unet.config)
    target = layout.from_diffusers(other.state_dict(), other.config)
    linears = {n for n, m in model.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    diffs = {f"lora_unet_{key.removesuffix('.weight').replace('.', '_')}.diff": (target[key] - value).contiguous()
             for key, value in original.items() if key.endswith(".weight") and value.dim() > 1}
    save_file(diffs, str(tmp_path / "diff.safetensors"))
    apply(model, tmp_path / "diff.safetensors")
    for name, weight in other.state_dict().items():
        if name.removesuffix(".weight") in linears:
            assert torch.allclose(module(model.unet, name.removesuffix(".weight")).weight, weight, atol=1e-6), name


# -- wrong base model ---------------------------------------------------------------------------------
def _sdxl_style(path: Path, metadata: dict | None) -> Path:
    """An SDXL kohya LoRA whose first text encoder layer has the size of the tiny CLIP-L's."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, width in (("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 64),
                        ("lora_te1_" + CLIP_Q.replace(".", "_"), H), ("lora_te2_" + CLIP_Q.replace(".", "_"), 48)):
        tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, width, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(width, RANK, generator=generator)
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_sdxl_and_other_flow_family_loras_are_skipped_naming_both_families(flux_model, sd3_model, tmp_path):
    before = snapshot(flux_model)
    for name, metadata in (("xl", {"ss_base_model_version": "sdxl_base_v1-0"}), ("xl-bare", None)):
        with pytest.raises(LoraError) as refusal:
            apply(flux_model, _sdxl_style(tmp_path / f"{name}.safetensors", metadata))
        assert str(refusal.value) == f"LoRA '{name}' was made for SDXL, not for this FLUX.1 checkpoint: skipped"
    flux_file = write(tmp_path / "flux.safetensors", "kohya", factors(flux_model, FLUX_LAYERS), FLUX_LAYERS, {})
    sd3_file = write(tmp_path / "sd3.safetensors", "diffusers", factors(sd3_model, SD3_LAYERS), SD3_LAYERS, {},
                     prefix="transformer.", metadata={"modelspec.architecture": "stable-diffusion-3.5-large/lora"})
    with pytest.raises(LoraError, match=r"^LoRA 'flux' was made for FLUX.1, not for this SD 3 checkpoint: skipped$"):
        apply(sd3_model, flux_file)
    with pytest.raises(LoraError, match=r"^LoRA 'sd3' was made for SD 3, not for this FLUX.1 checkpoint: skipped$"):
        apply(flux_model, sd3_file)
    assert changed(flux_model, before) == []


def test_a_flux_lora_on_an_sd1_model_names_flux(sd1_manager, flux_model, tmp_path):
    model = sd1_manager.activate()
    path = write(tmp_path / "flux.safetensors", "original", factors(flux_model, FLUX_LAYERS), FLUX_LAYERS,
                 encoder_factors(flux_model, ("lora_te1_",)), prefix="diffusion_model.")
    with pytest.raises(LoraError, match=r"^LoRA 'flux' was made for FLUX.1, not for this SD 1.x checkpoint"):
        apply(model, path)


def test_a_flux_lora_of_another_width_or_an_unknown_layout_says_so(flux_model, tmp_path):
    generator = torch.Generator().manual_seed(0)
    wide = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(RANK, 3072, generator=generator),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * 3072, RANK, generator=generator)}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(LoraError, match=r"^LoRA 'wide' was made for a FLUX.1 model of another size \(layer "
                                        r"lora_unet_double_blocks_0_img_attn_qkv does not fit"):
        apply(flux_model, tmp_path / "wide.safetensors")
    # XLabs' attention-processor layout, which Easel does not read
    xlabs = {"double_blocks.0.processor.qkv_lora1.down.weight": torch.randn(RANK, H, generator=generator),
             "double_blocks.0.processor.qkv_lora1.up.weight": torch.randn(3 * H, RANK, generator=generator)}
    save_file(xlabs, str(tmp_path / "xlabs.safetensors"))
    with pytest.raises(LoraError, match=r"^LoRA 'xlabs' names no layer of this FLUX.1 checkpoint \(e.g. "
                                        r"double_blocks.0.processor.qkv_lora1\); its layout is not one Easel reads"):
        apply(flux_model, tmp_path / "xlabs.safetensors")


def _lora(name: str, width: int) -> LayerUpdate:
    return LayerUpdate("lora", {"lora_down.weight": torch.zeros(1, width), "lora_up.weight": torch.zeros(1, 1)})


BASES = [
    # (layer names and the width of their inputs, metadata, the base read from them)
    ({"lora_unet_double_blocks_0_img_attn_qkv": 3072}, {}, "flux"),
    ({"diffusion_model.single_blocks.7.linear1": 3072}, {}, "flux"),
    ({"transformer.single_transformer_blocks.0.proj_out": 15360}, {}, "flux"),
    ({"transformer.transformer_blocks.0.attn.to_q": 3072}, {}, "flux"),
    ({"transformer_blocks.0.attn.to_q": 2432}, {}, "sd3"),
    ({"transformer.transformer_blocks.3.attn.to_q": 1536}, {}, "sd3"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv": 1536}, {}, "sd3"),
    ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": 768}, {"ss_base_model_version": "flux1"}, "flux"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1": 768}, {"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1": 768},
     {"modelspec.architecture": "stable-diffusion-3.5-large/lora"}, "sd3"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1": 768, "lora_te3_encoder_block_0_layer_0_SelfAttention_q": 4096},
     {}, None),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1": 768, "lora_te2_text_model_encoder_layers_0_mlp_fc1": 1280},
     {}, "sdxl"),
    ({"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": 768}, {}, "sd1"),
]


@pytest.mark.parametrize("layers, metadata, base", BASES)
def test_the_base_family_is_read_from_metadata_layer_names_and_widths(layers, metadata, base):
    lora = LoraFile("x", Path("x.safetensors"), {n: _lora(n, width) for n, width in layers.items()}, metadata)
    assert lora.base == base


# -- one module's rows of an update ------------------------------------------------------------------------
def _updates() -> dict[str, LayerUpdate]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "lora": LayerUpdate("lora", {"lora_down.weight": r(2, 5), "lora_up.weight": r(12, 2)}, alpha=3.0),
        "loha": LayerUpdate("loha", {"hada_w1_a": r(12, 2), "hada_w1_b": r(2, 5), "hada_w2_a": r(12, 2),
                                     "hada_w2_b": r(2, 5)}, alpha=1.0),
        "lokr": LayerUpdate("lokr", {"lokr_w1": r(3, 1), "lokr_w2": r(4, 5)}),
        "lokr-factored": LayerUpdate("lokr", {"lokr_w1_a": r(3, 2), "lokr_w1_b": r(2, 1), "lokr_w2_a": r(4, 2),
                                              "lokr_w2_b": r(2, 5)}, alpha=1.0),
        "full": LayerUpdate("full", {"diff": r(12, 5)}),
    }


@pytest.mark.parametrize("kind", sorted(_updates()))
@pytest.mark.parametrize("rows", [((0, 4),), ((4, 8),), ((3, 10),), ((6, 12), (0, 6)), ((0, 12),)])
def test_take_rows_is_those_rows_of_the_whole_update(kind, rows):
    update = _updates()[kind]
    whole = update.delta(torch.Size([12, 5]), torch.device("cpu"))
    expected = torch.cat([whole[start:stop] for start, stop in rows])
    share = update.take_rows(rows)
    assert share.fits(expected.shape)
    assert torch.allclose(share.delta(expected.shape, torch.device("cpu")), expected, atol=1e-6)
    weight = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(share.add_to(weight, 0.5), weight + 0.5 * expected, atol=1e-6)
