"""FLUX.1 in the other forms users run it: a GGUF-quantised transformer (city96's files), fp8 weight storage
(A1111's "FP8 weight"), and LoRAs through the prompt, all through generation on a tiny random model."""

import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from backend import flux_layout, generation, gguf_files
from backend.model_manager import ModelManager
from backend.random_flow_models import build_flux, save_separate, transformer_tensors
from backend.random_t5_tokenizer import write_t5_tokenizer
from backend.request import GenerationRequest
from backend.settings import Settings


@pytest.fixture(scope="module")
def flux():
    return build_flux(guidance=True, seed=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer_cache, flux):
    """flux-dev (bf16 file, parts in the folders), the same transformer as Q8_0 and F16 GGUFs, and LoRAs."""
    root = tmp_path_factory.mktemp("flux-formats")
    settings = Settings(data_dir=root)
    shutil.copytree(tokenizer_cache, settings.cache_dir, dirs_exist_ok=True)
    write_t5_tokenizer(settings.cache_dir)
    save_separate(flux, settings.models_dir, "flux-dev", dtype=torch.float32, encoder_dtype=torch.float32)
    state = {k: v.detach().float() for k, v in flux.transformer.state_dict().items()}
    original = flux_layout.from_diffusers(state, flux.transformer.config)
    for quant in ("Q8_0", "F16"):
        gguf_files.write_gguf(settings.model_dir("checkpoints") / f"flux-dev-{quant}.gguf",
                              {k: v.contiguous() for k, v in original.items()}, quant=quant)
    save_file(transformer_tensors(flux, torch.float8_e4m3fn),  # as flux1-dev-fp8.safetensors ships
              str(settings.model_dir("checkpoints") / "flux-dev-fp8.safetensors"))
    save_file(scaled_fp8(transformer_tensors(flux, torch.float32)),  # as ComfyUI's "fp8_scaled" files
              str(settings.model_dir("checkpoints") / "flux-dev-fp8-scaled.safetensors"))
    lora_dir = settings.model_dir("lora")
    lora_dir.mkdir(parents=True)
    save_file(kohya_flux_lora(flux.transformer.config), str(lora_dir / "flux-style.safetensors"))
    save_file(sdxl_lora(), str(lora_dir / "sdxl-style.safetensors"))
    return root


def scaled_fp8(tensors: dict) -> dict:
    """ComfyUI's scaled fp8 layout: each matrix stored as fp8 of weight / scale beside its `scale_weight`, under
    the all-in-one prefix, and a root `scaled_fp8` marker."""
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in tensors.items():
        name = "model.diffusion_model." + key
        if value.dim() == 2 and key.endswith(".weight"):
            scale = value.abs().max() / 448
            out[name] = (value / scale).to(torch.float8_e4m3fn)
            out[name.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            out[name] = value.to(torch.bfloat16)
    return out


def kohya_flux_lora(config, rank: int = 4) -> dict:
    """A kohya/sd-scripts FLUX LoRA on the first double block's image qkv and the first single block."""
    width = config.num_attention_heads * config.attention_head_dim
    generator = torch.Generator().manual_seed(0)
    layers = {"lora_unet_double_blocks_0_img_attn_qkv": 3 * width, "lora_unet_single_blocks_0_linear1": 7 * width}
    tensors = {}
    for name, rows in layers.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, width, generator=generator) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(rows, rank, generator=generator) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def sdxl_lora() -> dict:
    return {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}


def generate(manager, **fields):
    request = GenerationRequest(**{"prompt": "a red cat", "width": 64, "height": 64, "steps": 3, "seed": 4,
                                   "sampler": "Euler", "cfg_scale": 1, "checkpoint": "flux-dev", **fields})
    result = generation.generate(manager, request)
    assert result.images, result.warnings
    return result


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.float64)


def test_gguf_transformers_load_and_stay_quantised(root):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    manager = ModelManager(Settings(data_dir=root))
    reference = pixels(generate(manager))
    q8 = generate(manager, checkpoint="flux-dev-Q8_0")
    weight = manager.active.unet.transformer_blocks[0].attn.to_q.weight
    assert isinstance(weight, GGUFParameter) and weight.quant_type.name == "Q8_0"
    assert "Model: flux-dev-Q8_0" in q8.images[0].infotext
    # Q8_0 keeps 8 bits per weight: the image stays within a few levels of the unquantised one
    assert np.abs(pixels(q8) - reference).mean() < 3
    assert np.abs(pixels(generate(manager, checkpoint="flux-dev-F16")) - reference).mean() < 1


def test_fp8_storage_halves_the_weights_and_keeps_the_image(root):
    from backend import fp8_storage

    manager = ModelManager(Settings(data_dir=root))
    reference = pixels(generate(manager))
    full_bytes = fp8_storage.stored_bytes(manager.active.unet)
    manager.set_fp8_storage("Enable for SDXL")
    stored = generate(manager)
    assert manager.active.unet.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert fp8_storage.stored_bytes(manager.active.unet) < 0.75 * full_bytes
    difference = np.abs(pixels(stored) - reference).mean()
    assert 0 < difference < 4  # fp8 rounds the weights: close to, not equal to, the full-precision image


def test_an_fp8_file_loads_with_and_without_fp8_storage(root):
    manager = ModelManager(Settings(data_dir=root))
    reference = pixels(generate(manager))
    widened = generate(manager, checkpoint="flux-dev-fp8")  # cast to the compute precision
    assert manager.active.unet.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32
    manager.set_fp8_storage("Enable")
    kept = generate(manager, checkpoint="flux-dev-fp8")  # the file's fp8 weights kept as they are
    assert manager.active.unet.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert manager.active.unet.x_embedder.weight.dtype == torch.float32  # layers kept in full precision
    assert np.abs(pixels(kept) - pixels(widened)).max() <= 1
    assert 0 < np.abs(pixels(widened) - reference).mean() < 4


def test_a_scaled_fp8_file_loads_with_its_scales(root):
    manager = ModelManager(Settings(data_dir=root))
    reference = pixels(generate(manager))
    scaled = generate(manager, checkpoint="flux-dev-fp8-scaled")
    assert 0 < np.abs(pixels(scaled) - reference).mean() < 4  # fp8 with per-tensor scales: close


@pytest.mark.parametrize("fp8", [False, True])
def test_a_flux_lora_changes_the_image_and_undoes_exactly(root, fp8):
    manager = ModelManager(Settings(data_dir=root))
    manager.set_fp8_storage("Enable" if fp8 else "Disable")
    before = pixels(generate(manager))
    weights = {k: v.clone() for k, v in manager.active.unet.state_dict().items()}
    styled = generate(manager, prompt="a red cat <lora:flux-style:0.8>")
    assert np.abs(pixels(styled) - before).mean() > 1
    assert "Lora hashes" in styled.images[0].infotext
    after = manager.active.unet.state_dict()
    assert all(torch.equal(weights[k].view(torch.uint8) if weights[k].dtype == torch.float8_e4m3fn else weights[k],
                           after[k].view(torch.uint8) if after[k].dtype == torch.float8_e4m3fn else after[k])
               for k in weights)
    assert np.array_equal(pixels(generate(manager)), before)


def test_an_sdxl_lora_on_flux_warns_and_is_skipped(root, caplog):
    manager = ModelManager(Settings(data_dir=root))
    before = pixels(generate(manager))
    with caplog.at_level(logging.WARNING):
        result = generate(manager, prompt="a red cat <lora:sdxl-style:1>")
    assert any("made for SDXL, not for this FLUX.1 checkpoint" in w for w in result.warnings)
    assert np.array_equal(pixels(result), before)
