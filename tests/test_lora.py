"""LoRA: kohya-ss, LoCon, LyCORIS and diffusers/peft files built here for the tiny models, applied per
generation over the base weights and removed exactly."""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file

from backend import lora_files as lora_module
from backend.extra_networks import NetworkSession, parse_tags
from backend.generation import generate
from backend.infotext import parse_infotext
from backend.lora_files import LayerUpdate, LoraError
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from tests.conftest import install

SD1_TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # kohya: diffusers names
SD1_LDM_TO_V = "input_blocks_1_1_transformer_blocks_0_attn2_to_v"  # kohya: LDM names, same block
SD1_TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def module(root: torch.nn.Module, name: str) -> torch.nn.Module:
    """A submodule by the name files use (CLIP's "text_model." prefix is gone in transformers 5)."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        return root.get_submodule(name.removeprefix("text_model."))


def low_rank(out_features: int, in_features: int, rank: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, in_features, generator=generator) * 0.5,
            torch.randn(out_features, rank, generator=generator) * 0.5)


def write_kohya(path: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                metadata: dict | None = None) -> Path:
    tensors = {}
    for name, (down, up, alpha) in layers.items():
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata or {"ss_network_module": "networks.lora"})
    return path


def sd1_lora(settings, model, name: str = "detail", seed: int = 0, alpha: float = 2.0) -> tuple[Path, dict]:
    """A kohya LoRA on one UNet layer in each naming and one text-encoder layer."""
    to_k = module(model.unet, SD1_TO_K)
    to_v = module(model.unet, SD1_TO_K.replace("to_k", "to_v"))
    q = module(model.text_encoders[0], SD1_TE_Q)
    layers = {
        "lora_unet_" + SD1_TO_K.replace(".", "_"): (*low_rank(to_k.out_features, to_k.in_features, seed=seed), alpha),
        "lora_unet_" + SD1_LDM_TO_V: (*low_rank(to_v.out_features, to_v.in_features, seed=seed + 1), alpha),
        "lora_te_" + SD1_TE_Q.replace(".", "_"): (*low_rank(q.out_features, q.in_features, seed=seed + 2), alpha),
    }
    path = write_kohya(settings.model_dir("lora") / f"{name}.safetensors", layers, {"ss_base_model_version": "sd_v1"})
    return path, layers


def snapshot(model) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}
    for index, encoder in enumerate(model.text_encoders):
        state.update({f"te{index}.text_model.{k.removeprefix('text_model.')}": v.clone()
                      for k, v in encoder.state_dict().items()})
    return state


def assert_same(model, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


def session(manager, model, warnings=None) -> NetworkSession:
    return NetworkSession(model, manager.loras, manager.embeddings, warnings if warnings is not None else [])


def request(prompt: str = "a red star", **changes) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, steps=3, seed=7, width=64, height=64, save_images=False, **changes)


def pixels(result) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(result.images[0].image))


# -- exact values ----------------------------------------------------------------------------------
def test_kohya_lora_moves_weights_by_strength_times_scale_times_up_down_and_restores_exactly(sd1_manager):
    model = sd1_manager.activate()
    path, layers = sd1_lora(sd1_manager.settings, model)
    before = snapshot(model)
    networks = session(sd1_manager, model)
    _, tags = parse_tags("a red star <lora:detail:0.7>")
    networks.activate(tags)
    for kohya, target, root in (
        ("lora_unet_" + SD1_TO_K.replace(".", "_"), SD1_TO_K, model.unet),
        ("lora_unet_" + SD1_LDM_TO_V, SD1_TO_K.replace("to_k", "to_v"), model.unet),
        ("lora_te_" + SD1_TE_Q.replace(".", "_"), SD1_TE_Q, model.text_encoders[0]),
    ):
        down, up, alpha = layers[kohya]
        base = before[("unet." if root is model.unet else "te0.") + target + ".weight"]
        expected = base + 0.7 * (alpha / 4) * (up @ down)
        assert torch.allclose(module(root, target).weight, expected, atol=1e-6), kohya
    untouched = "unet." + SD1_TO_K.replace("to_k", "to_q") + ".weight"
    assert torch.equal(module(model.unet, SD1_TO_K.replace("to_k", "to_q")).weight, before[untouched])
    networks.close()
    assert_same(model, before)


def test_two_loras_add_and_zero_weight_changes_nothing(sd1_manager):
    model = sd1_manager.activate()
    _, first = sd1_lora(sd1_manager.settings, model, "first", seed=0)
    _, second = sd1_lora(sd1_manager.settings, model, "second", seed=10)
    before = snapshot(model)
    networks = session(sd1_manager, model)
    networks.activate(parse_tags("<lora:first:1> <lora:second:0.5>")[1])
    name = "lora_unet_" + SD1_TO_K.replace(".", "_")
    expected = (before[f"unet.{SD1_TO_K}.weight"] + (2 / 4) * (first[name][1] @ first[name][0])
                + 0.5 * (2 / 4) * (second[name][1] @ second[name][0]))
    assert torch.allclose(module(model.unet, SD1_TO_K).weight, expected, atol=1e-6)
    networks.activate(parse_tags("<lora:first:0>")[1])
    assert_same(model, before)
    networks.close()
    assert_same(model, before)


def test_text_encoder_and_unet_strengths_apply_separately(sd1_manager):
    model = sd1_manager.activate()
    sd1_lora(sd1_manager.settings, model)
    before = snapshot(model)
    networks = session(sd1_manager, model)
    te_weight = module(model.text_encoders[0], SD1_TE_Q).weight
    unet_weight = module(model.unet, SD1_TO_K).weight
    for tag, te_changed, unet_changed in (("<lora:detail:1:0>", True, False), ("<lora:detail:0:1>", False, True),
                                          ("<lora:detail:1:unet=0>", True, False), ("<lora:detail:0.5>", True, True)):
        networks.activate(parse_tags(tag)[1])
        assert (not torch.equal(te_weight, before[f"te0.{SD1_TE_Q}.weight"])) == te_changed, tag
        assert (not torch.equal(unet_weight, before[f"unet.{SD1_TO_K}.weight"])) == unet_changed, tag
    networks.close()
    assert_same(model, before)


# -- through generation ----------------------------------------------------------------------------
def test_generation_applies_the_lora_and_the_next_generation_is_untouched(sd1_manager):
    model = sd1_manager.activate()
    path, _ = sd1_lora(sd1_manager.settings, model)
    plain = pixels(generate(sd1_manager, request()))
    with_lora = generate(sd1_manager, request("a red star <lora:detail:0.8>"))
    assert not torch.equal(pixels(with_lora), plain)
    assert with_lora.warnings == []
    after = pixels(generate(sd1_manager, request()))
    assert torch.equal(after, plain)
    # Infotext: the prompt keeps its tag; Lora hashes carry the addnet hash (sha256 after the header).
    data = path.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    parsed = parse_infotext(with_lora.images[0].infotext)
    assert parsed["Prompt"] == "a red star <lora:detail:0.8>"
    assert parsed["Lora hashes"] == f"detail: {addnet}"
    assert '"detail: ' in with_lora.images[0].infotext
    assert "Lora hashes" not in parse_infotext(generate(sd1_manager, request()).images[0].infotext)


def test_weight_zero_gives_the_image_without_the_lora(sd1_manager):
    model = sd1_manager.activate()
    sd1_lora(sd1_manager.settings, model)
    plain = pixels(generate(sd1_manager, request()))
    assert torch.equal(pixels(generate(sd1_manager, request("a red star <lora:detail:0>"))), plain)


def test_changing_strength_does_not_read_the_file_again(sd1_manager):
    model = sd1_manager.activate()
    sd1_lora(sd1_manager.settings, model)
    a = pixels(generate(sd1_manager, request("a red star <lora:detail:0.5>")))
    b = pixels(generate(sd1_manager, request("a red star <lora:detail:1.5>")))
    assert not torch.equal(a, b)
    assert sd1_manager.loras.reads == 1


def test_loras_from_the_negative_prompt_apply_and_are_stripped(sd1_manager):
    model = sd1_manager.activate()
    sd1_lora(sd1_manager.settings, model)
    plain = generate(sd1_manager, request(negative_prompt="blurry"))
    in_negative = generate(sd1_manager, request(negative_prompt="blurry <lora:detail:1>"))
    in_prompt = generate(sd1_manager, request("a red star <lora:detail:1>", negative_prompt="blurry"))
    assert not torch.equal(pixels(in_negative), pixels(plain))  # it applied
    assert torch.equal(pixels(in_negative), pixels(in_prompt))  # and the tag text itself was not encoded


def test_missing_corrupt_and_mismatched_loras_are_skipped_with_a_warning(sd1_manager, tiny_models):
    model = sd1_manager.activate()
    plain = pixels(generate(sd1_manager, request()))
    folder = sd1_manager.settings.model_dir("lora")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    sdxl_unet = tiny_models["sdxl"]["unet"]
    to_k = sdxl_unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    write_kohya(folder / "xl-style.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k":
            (*low_rank(to_k.out_features, to_k.in_features), 4.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (*low_rank(32, 32), 4.0),
    }, {"ss_base_model_version": "sdxl_base_v1-0"})
    result = generate(sd1_manager, request("a red star <lora:broken:1> <lora:xl-style:1> <lora:nowhere:1>"))
    assert torch.equal(pixels(result), plain)
    warnings = "\n".join(result.warnings)
    assert "cannot read broken.safetensors" in warnings and "download it again" in warnings
    assert "LoRA 'xl-style' was made for SDXL, not for this SD 1.x checkpoint: skipped" in warnings
    assert "LoRA 'nowhere' not found" in warnings
    assert "Lora hashes" not in result.images[0].infotext
    assert model.lora_overlay.applied == ()


BAD_STRENGTHS = [
    # (strength in the tag, what the error says)
    ("strong", "<lora:detail:strong>: strengths must be numbers, as in <lora:detail:0.8>"),
    ("1e308", "LoRA strength for 'detail' must be a finite number between -100 and 100, not 1e+308"),
    ("nan", "LoRA strength for 'detail' must be a finite number between -100 and 100, not nan"),
    ("1:inf", "LoRA strength for 'detail' must be a finite number between -100 and 100, not inf"),
]


@pytest.mark.parametrize("strength, message", BAD_STRENGTHS)
def test_a_strength_that_is_not_a_usable_number_is_an_error_naming_the_fix(sd1_manager, strength, message):
    model = sd1_manager.activate()
    sd1_lora(sd1_manager.settings, model)
    before = snapshot(model)
    plain = pixels(generate(sd1_manager, request()))
    with pytest.raises(LoraError) as refusal:
        generate(sd1_manager, request(f"a red star <lora:detail:{strength}>"))
    assert str(refusal.value).startswith(message)
    assert_same(model, before)
    assert model.lora_overlay.applied == ()
    assert torch.equal(pixels(generate(sd1_manager, request())), plain)


# -- SDXL, other file layouts and LyCORIS types ---------------------------------------------------------
def test_sdxl_kohya_lora_with_both_text_encoders_applies_and_restores(settings, model_files):
    install(settings, model_files["sdxl"])
    manager = ModelManager(settings)
    model = manager.activate()
    name = "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"
    to_q = module(model.unet, name)
    te2 = module(model.text_encoders[1], "text_model.encoder.layers.1.mlp.fc1")
    layers = {
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q":
            (*low_rank(to_q.out_features, to_q.in_features), 8.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": (*low_rank(32, 32, seed=1), 8.0),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": (*low_rank(te2.out_features, te2.in_features, seed=2), 8.0),
    }
    write_kohya(settings.model_dir("lora") / "xl.safetensors", layers, {"ss_base_model_version": "sdxl_base_v1-0"})
    before = snapshot(model)
    plain = pixels(generate(manager, request()))
    networks = session(manager, model)
    networks.activate(parse_tags("<lora:xl:1>")[1])
    down, up, _ = layers["lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q"]
    assert torch.allclose(to_q.weight, before[f"unet.{name}.weight"] + 2 * (up @ down), atol=1e-6)
    down, up, _ = layers["lora_te2_text_model_encoder_layers_1_mlp_fc1"]
    base = before["te1.text_model.encoder.layers.1.mlp.fc1.weight"]
    assert torch.allclose(te2.weight, base + 2 * (up @ down), atol=1e-6)
    networks.close()
    assert_same(model, before)
    assert not torch.equal(pixels(generate(manager, request("a red star <lora:xl:1>"))), plain)
    assert torch.equal(pixels(generate(manager, request())), plain)


def test_locon_conv_layers_and_peft_files(sd1_manager):
    model = sd1_manager.activate()
    conv_name = "down_blocks.0.resnets.0.conv1"  # kohya LDM name: input_blocks_1_0_in_layers_2
    conv = module(model.unet, conv_name)
    generator = torch.Generator().manual_seed(3)
    down = torch.randn(4, conv.in_channels, 3, 3, generator=generator) * 0.1
    up = torch.randn(conv.out_channels, 4, 1, 1, generator=generator) * 0.1
    folder = sd1_manager.settings.model_dir("lora")
    write_kohya(folder / "locon.safetensors", {"lora_unet_input_blocks_1_0_in_layers_2": (down, up, 4.0)})
    proj = module(model.unet, SD1_TO_K)
    a, b = low_rank(proj.out_features, proj.in_features, seed=5)
    save_file({f"unet.{SD1_TO_K}.lora_A.weight": a, f"unet.{SD1_TO_K}.lora_B.weight": b}, folder / "peft.safetensors")
    before = snapshot(model)
    networks = session(sd1_manager, model)
    networks.activate(parse_tags("<lora:locon:1> <lora:peft:0.5>")[1])
    # A conv LoRA is a 3x3 conv to `rank` channels followed by a 1x1 conv: compose them and compare.
    composed = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    assert torch.allclose(conv.weight, before[f"unet.{conv_name}.weight"] + composed, atol=1e-6)
    # No alpha in a peft file: scale 1.
    assert torch.allclose(proj.weight, before[f"unet.{SD1_TO_K}.weight"] + 0.5 * (b @ a), atol=1e-6)
    networks.close()
    assert_same(model, before)


def test_loha_and_lokr_updates():
    generator = torch.Generator().manual_seed(0)
    w1a, w1b = torch.randn(6, 2, generator=generator), torch.randn(2, 5, generator=generator)
    ones_a, ones_b = torch.ones(6, 1), torch.ones(1, 5)
    loha = LayerUpdate("loha", {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": ones_a, "hada_w2_b": ones_b},
                       alpha=2.0)
    # The Hadamard product with an all-ones factor leaves the first low-rank product (scaled by alpha/rank).
    assert torch.allclose(loha.delta(torch.Size([6, 5]), torch.device("cpu")), (w1a @ w1b) * 2 / 2)
    w2 = torch.randn(3, 5, generator=generator)
    lokr = LayerUpdate("lokr", {"lokr_w1": torch.tensor([[1.0], [2.0]]), "lokr_w2": w2})
    assert torch.allclose(lokr.delta(torch.Size([6, 5]), torch.device("cpu")), torch.cat([w2, 2 * w2]))
    with pytest.raises(LoraError, match="does not fit"):
        lokr.delta(torch.Size([4, 5]), torch.device("cpu"))


def test_unsupported_lycoris_types_are_named(tmp_path):
    with pytest.raises(LoraError, match="unsupported LyCORIS type: DoRA"):
        lora_module.group_layers({"lora_unet_x.lora_down.weight": torch.zeros(1, 2),
                                  "lora_unet_x.lora_up.weight": torch.zeros(2, 1),
                                  "lora_unet_x.dora_scale": torch.zeros(2)})
    with pytest.raises(LoraError, match="unsupported LyCORIS type: OFT"):
        lora_module.group_layers({"lora_unet_x.oft_blocks": torch.zeros(2, 2, 2)})


def test_layers_under_sequential_offload_are_patched_in_their_weights_map():
    """--lowvram keeps weights in accelerate's CPU map and loads them per forward: patch the map."""
    from accelerate import cpu_offload

    from backend.lora import Activation, LoraOverlay, Matched
    from backend.lora_files import LoraFile

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5))
    x = torch.randn(2, 6)
    plain = layer(x)
    cpu_offload(layer, execution_device=torch.device("cpu"))
    down, up = low_rank(5, 6, rank=2)
    update = LayerUpdate("lora", {"lora_down.weight": down, "lora_up.weight": up}, alpha=2.0)
    lora = LoraFile("x", Path("x.safetensors"), {"layer": update}, {})
    overlay = LoraOverlay(None)
    overlay.apply([(lora, Matched(unet=[(layer[0], update)]), Activation("x", 1.0, 0.5))])
    with torch.no_grad():
        assert torch.allclose(layer(x), plain + 0.5 * x @ (up @ down).T, atol=1e-5)
        overlay.restore()
        assert torch.equal(layer(x), plain)


# -- memory ----------------------------------------------------------------------------------------
def test_fifty_apply_remove_cycles_with_different_loras_do_not_grow_memory(settings, model_files):
    install(settings, model_files["sd1"])
    manager = ModelManager(settings.with_changes(lora_cache_mb=1))
    model = manager.activate()
    for index in range(5):
        sd1_lora(settings, model, f"l{index}", seed=index * 3)
    before = snapshot(model)
    networks = session(manager, model)

    def cycles(count: int) -> None:
        for index in range(count):
            networks.activate(parse_tags(f"<lora:l{index % 5}:{0.5 + index % 3}> <lora:l{(index + 2) % 5}:1>")[1])
            networks.close()

    cycles(10)  # warm up allocator and caches
    gc.collect()
    rss = psutil.Process().memory_info().rss
    cycles(50)
    gc.collect()
    growth = psutil.Process().memory_info().rss - rss
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert model.lora_overlay._base == {}
    assert len(manager.loras._cache) <= 5
    assert_same(model, before)
