"""GGUF FLUX.1 transformers as city96 publishes them: detection from the header, loading with the weights left
quantised, outputs against the unquantised model, and clear refusals of files Easel cannot read."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor
from safetensors.torch import save_file

from backend import flux_layout, gguf_files, random_flux
from backend.model_detection import CheckpointFormatError, transformer_family

CONFIG = random_flux.tiny_config()
# A 256-wide variant: its rows hold whole K-quant blocks (256 values), as FLUX.1's 3072-wide rows do.
WIDE = dict(CONFIG, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=2,
            axes_dims_rope=flux_layout.rope_axes(128))
# quant -> largest relative L2 error of the output against the float32 model, both computed in float32.
# Q4_0 measured 0.099 here: a 4-bit random model drifts, but stays on the reference's direction.
TOLERANCES = {"F16": 2e-3, "BF16": 1e-2, "Q8_0": 0.02, "Q5_1": 0.08, "Q4_0": 0.2}
# The tiny model's Linear weights of 32 x 32 values, which GGUF files keep in F32.
SMALL_LINEARS = {
    "context_embedder.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    *(f"time_text_embed.{embedder}_embedder.linear_2.weight" for embedder in ("timestep", "text", "guidance")),
    *(f"transformer_blocks.{i}.attn.{layer}.weight" for i in range(2) for layer in ("to_out.0", "to_add_out")),
}
# Where each K-quant block keeps its float16 scale(s) (d, and dmin for Q4_K / Q5_K), as byte offsets.
KQUANT_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.fixture(scope="module")
def reference():
    """The unquantised tiny transformer, its BFL-layout (file) state dict and its float32 output."""
    transformer = random_flux.build_transformer(CONFIG)
    original = flux_layout.from_diffusers(transformer.state_dict(), CONFIG)
    return transformer, original, _run(transformer, _inputs())


def _inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1] = torch.arange(16) // 4
    img_ids[:, 2] = torch.arange(16) % 4
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=generator).to(dtype),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=generator).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=generator).to(dtype),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]),
    )


def _run(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0].float()


def _relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


def _quantised(model):
    return {name: p for name, p in model.named_parameters() if isinstance(p, GGUFParameter)}


@pytest.mark.parametrize("quant", list(TOLERANCES))
def test_gguf_file_is_detected_from_its_header(tmp_path, reference, quant):
    _, original, _ = reference
    path = gguf_files.write_gguf(tmp_path / f"flux1-tiny-{quant}.gguf", original, quant)

    shapes = gguf_files.gguf_shapes(path)

    assert shapes == {key: tuple(value.shape) for key, value in original.items()}
    assert transformer_family(shapes) == "FLUX.1"
    assert gguf_files.gguf_architecture(path) == "flux"


@pytest.mark.parametrize("quant", list(TOLERANCES))
def test_gguf_transformer_matches_the_unquantised_model(tmp_path, reference, quant):
    _, original, want = reference
    path = gguf_files.write_gguf(tmp_path / f"flux1-tiny-{quant}.gguf", original, quant)

    model = gguf_files.load_gguf_transformer(path, torch.float32)
    got = _run(model, _inputs())

    assert model.config.num_layers == 2 and model.config.num_single_layers == 2
    assert _relative_error(got, want) < TOLERANCES[quant]
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("quant, compression", [("Q8_0", 34 / 32), ("Q4_0", 18 / 32)])
def test_quantised_weights_stay_quantised(tmp_path, reference, quant, compression):
    transformer, original, want = reference
    path = gguf_files.write_gguf(tmp_path / f"flux1-tiny-{quant}.gguf", original, quant)

    model = gguf_files.load_gguf_transformer(path, torch.bfloat16)

    quantised = _quantised(model)
    # Every Linear weight stays in its blocks but those whose file tensor is too small (<= 1024 values) for
    # city96's converter to quantise: here the 32 x 32 ones.
    linears = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert linears - set(quantised) == SMALL_LINEARS
    for name, weight in quantised.items():
        assert weight.quant_type == gguf.GGMLQuantizationType[quant], name
        assert isinstance(model.get_submodule(name.rsplit(".", 1)[0]), GGUFLinear)
        assert weight.nbytes == math.prod(weight.quant_shape) * compression  # block bytes per value
    plain = [p for p in model.parameters() if not isinstance(p, GGUFParameter)]
    assert {p.dtype for p in plain} == {torch.bfloat16}
    bf16_bytes = sum(p.numel() * 2 for p in transformer.parameters())
    assert sum(p.nbytes for p in model.parameters()) < (0.6 if quant == "Q8_0" else 0.4) * bf16_bytes
    # Computing in bfloat16 costs this random tiny model ~0.04 on its own, quantised or not.
    assert _relative_error(_run(model, _inputs(torch.bfloat16)), want) < (0.08 if quant == "Q8_0" else 0.2)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_fused_qkv_splits_along_whole_rows_of_blocks(tmp_path, reference, quant):
    _, original, _ = reference
    path = gguf_files.write_gguf(tmp_path / f"flux1-tiny-{quant}.gguf", original, quant)
    qtype = gguf.GGMLQuantizationType[quant]
    inner = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]

    model = gguf_files.load_gguf_transformer(path, torch.float32)

    # gguf's numpy codec is the reference (quantising is deterministic: these are the file's bytes); diffusers
    # dequantises in float16, hence the tolerance of one float16 rounding.
    qkv = original["double_blocks.1.img_attn.qkv.weight"].numpy()
    expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(qkv, qtype), qtype))
    attention = model.transformer_blocks[1].attn
    for index, layer in enumerate((attention.to_q, attention.to_k, attention.to_v)):
        assert layer.weight.quant_shape == (inner, inner)
        torch.testing.assert_close(dequantize_gguf_tensor(layer.weight).float(),
                                   expected[index * inner:(index + 1) * inner], rtol=1e-3, atol=1e-7)
    # Views of the file's qkv tensor: splitting copied nothing.
    assert attention.to_k.weight.untyped_storage().data_ptr() == attention.to_q.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("quant", list(KQUANT_SCALES))
def test_kquant_file_matches_its_dequantised_twin(tmp_path, quant):
    """gguf-py cannot write K-quants, so the blocks are random bytes with sane scales; the reference is the
    same weights dequantised by gguf's numpy codec and stored as F32."""
    original = flux_layout.from_diffusers(random_flux.build_transformer(WIDE).state_dict(), WIDE)
    qtype = gguf.GGMLQuantizationType[quant]
    rng = np.random.default_rng(0)
    quantised, twin = {}, {}
    for key, value in original.items():
        if value.ndim == 2 and value.shape[1] % 256 == 0:
            blocks = _random_kquant_blocks(rng, value.shape, quant)
            quantised[key] = GGUFParameter(torch.from_numpy(blocks), quant_type=qtype)
            twin[key] = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
        else:
            quantised[key] = twin[key] = value
    assert sum(hasattr(value, "quant_type") for value in quantised.values()) >= 15
    gguf_files.write_gguf(tmp_path / "k.gguf", quantised, quant)
    gguf_files.write_gguf(tmp_path / "twin.gguf", twin, "F32")

    model = gguf_files.load_gguf_transformer(tmp_path / "k.gguf", torch.float32)
    reference = gguf_files.load_gguf_transformer(tmp_path / "twin.gguf", torch.float32)

    assert model.single_transformer_blocks[0].proj_mlp.weight.quant_type == qtype
    assert not _quantised(reference)
    got, want = _run(model, _inputs()), _run(reference, _inputs())
    assert _relative_error(got, want) < 5e-3  # diffusers dequantises K-quant scales in float16


def _random_kquant_blocks(rng, shape, quant):
    """Valid K-quant blocks for a (rows, columns) weight: random quants, scales of ~1e-4."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]]
    rows, columns = shape
    blocks = rng.integers(0, 256, (rows * columns // block_size, type_size), dtype=np.uint8)
    for offset in KQUANT_SCALES[quant]:
        scales = rng.uniform(2e-5, 1e-4, (len(blocks), 1)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8)
    return blocks.reshape(rows, columns // block_size * type_size)


def test_gguf_of_another_model_is_not_flux(tmp_path):
    path = gguf_files.write_gguf(tmp_path / "llama.gguf", {"token_embd.weight": torch.randn(64, 32)}, "Q8_0", "llama")

    assert gguf_files.gguf_architecture(path) == "llama"
    assert transformer_family(gguf_files.gguf_shapes(path)) is None
    with pytest.raises(CheckpointFormatError, match="not a complete FLUX transformer"):
        gguf_files.load_gguf_transformer(path, torch.float32)


def test_unsupported_quant_type_is_named(tmp_path, reference):
    _, original, _ = reference
    tensors = dict(original)
    # IQ2_XXS: 256 values in 66 bytes per block; diffusers has no dequantiser for it.
    tensors["double_blocks.0.img_mlp.0.weight"] = GGUFParameter(
        torch.zeros(128, 66, dtype=torch.uint8), quant_type=gguf.GGMLQuantizationType.IQ2_XXS)
    path = gguf_files.write_gguf(tmp_path / "flux1-tiny-IQ2_XXS.gguf", tensors, "Q8_0")

    named = r"double_blocks\.0\.img_mlp\.0\.weight is stored as IQ2_XXS"
    with pytest.raises(CheckpointFormatError, match=named) as error:
        gguf_files.load_gguf_transformer(path, torch.float32)
    assert "Q8_0" in str(error.value) and "Q4_K" in str(error.value)


def _truncated(tmp_path, original):
    data = gguf_files.write_gguf(tmp_path / "whole.gguf", original, "Q8_0").read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("content", ["empty", "text", "safetensors", "truncated", "magic only"])
def test_garbled_file_is_refused(tmp_path, reference, content):
    _, original, _ = reference
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    if content == "safetensors":
        save_file({key: value.contiguous() for key, value in original.items()}, str(path))
    else:
        data = {"empty": b"", "text": b"<html>404 Not Found</html>", "magic only": b"GGUF\x03\x00\x00\x00"}
        path.write_bytes(data[content] if content in data else _truncated(tmp_path, original))

    for read in (gguf_files.gguf_shapes, gguf_files.read_gguf):
        with pytest.raises(CheckpointFormatError, match="flux1-dev-Q8_0.gguf: not a readable GGUF file"):
            read(path)
