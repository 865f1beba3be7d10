"""Tiny random-weight CLIP-L, CLIP-G and T5 text encoders for tests, and a writer for the standalone files
users download into models/text_encoder (fp32, fp16, fp8_e4m3fn and ComfyUI's scaled fp8).
"""

from __future__ import annotations

from pathlib import Path

import torch

# The real tokenizers' ids must fit: CLIP's 49,408 and T5 v1.1's 32,128 rows.
CLIP_VOCAB = 49408
T5_VOCAB = 32128
FP8_MAX = 448.0  # the largest float8_e4m3fn
LAYOUTS = ("hf", "flat", "shared_only")


def _tiny_clip(seed: int, hidden: int, act: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        # The loaders count heads as width // 64 (weights cannot tell); a tiny model has one.
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def tiny_clip_l(seed: int = 0, projection: bool = False):
    """A 32-wide, two-layer CLIP-L look-alike (quick_gelu); with `projection`, as SD 3's clip_l file."""
    return _tiny_clip(seed, 32, "quick_gelu", projection)


def tiny_clip_g(seed: int = 0):
    """A 48-wide, two-layer CLIP-G look-alike (gelu, with its text projection)."""
    return _tiny_clip(seed, 48, "gelu", True)


def tiny_t5(seed: int = 0, d_model: int = 32):
    """A two-layer T5 v1.1 encoder (gated-gelu), d_model 32 (or as given), d_ff 48, two 16-wide heads."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=T5_VOCAB, d_model=d_model, d_ff=48, d_kv=16, num_heads=2, num_layers=2,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _layout_keys(model, layout: str) -> dict[str, torch.Tensor]:
    """The model's tensors under the key names of the layout asked for."""
    state = model.state_dict()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if "shared.weight" in state:
        if layout == "flat":
            raise ValueError("the flat layout is CLIP's; a T5 is written as 'hf' or 'shared_only'")
        return {k: v for k, v in state.items() if not (layout == "shared_only" and k == "encoder.embed_tokens.weight")}
    if layout == "shared_only":
        raise ValueError("the shared_only layout is T5's; a CLIP is written as 'hf' or 'flat'")
    if layout == "flat":  # as transformers 5 holds CLIPTextModel: no `text_model.` prefix
        return {k.removeprefix("text_model."): v for k, v in state.items()}
    keep = ("text_model.", "text_projection.")
    return {k if k.startswith(keep) else "text_model." + k: v for k, v in state.items()}


def _to_fp8(tensors: dict[str, torch.Tensor], scaled: bool) -> dict[str, torch.Tensor]:
    """Matrices to float8_e4m3fn, norms in fp16; `scaled` writes ComfyUI's per-tensor `scale_weight`s."""
    out = {}
    for key, value in tensors.items():
        if value.dim() < 2:
            out[key] = value.to(torch.float16)
            continue
        if not scaled:
            out[key] = value.to(torch.float8_e4m3fn)
            continue
        scale = value.abs().max().float().clamp(min=1e-12) / FP8_MAX
        out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
        out[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        out[key.removesuffix("weight") + "scale_input"] = torch.ones(())  # read by fp8 matmuls, not by loaders
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def encoder_tensors(model, dtype=torch.float16, layout: str = "hf", scaled_fp8: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a standalone file (see `save_encoder`), e.g. to put under an all-in-one prefix."""
    tensors = {k: v.detach().clone().contiguous() for k, v in _layout_keys(model, layout).items()}
    if dtype == torch.float8_e4m3fn:
        return _to_fp8(tensors, scaled_fp8)
    if scaled_fp8:
        raise ValueError("scaled_fp8 needs dtype=torch.float8_e4m3fn")
    return {k: v.to(dtype) for k, v in tensors.items()}


def save_encoder(path: Path, model, dtype=torch.float16, layout: str = "hf", scaled_fp8: bool = False) -> Path:
    """Write `model` as users download it: "hf" (`text_model.*`; T5 with `shared.weight` and
    `encoder.embed_tokens.weight`), "flat" (CLIP without `text_model.`), "shared_only" (T5 without
    `encoder.embed_tokens.weight`). `dtype=torch.float8_e4m3fn` writes an fp8 file, ComfyUI's scaled one
    with `scaled_fp8`."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(encoder_tensors(model, dtype, layout, scaled_fp8), str(path))
    return path
