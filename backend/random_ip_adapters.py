"""Random-weight IP-Adapters and CLIP image encoders for tests, written in the formats users download:
a tiny `CLIPVisionModelWithProjection` as a single `.safetensors` (no config, as ComfyUI's clip_vision files),
as a folder with config.json (h94's `image_encoder`) and in open_clip's `visual.*` layout; IP-Adapters (plain
and plus) that fit `random_models.build(family, tiny=True)`'s UNets, in h94's layout (`.safetensors` with
`image_proj.*` / `ip_adapter.*`, `.bin` as {"image_proj": ..., "ip_adapter": ...}). Written here from shapes,
independently of the readers in `clip_vision` and `ip_adapter`.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                        patch_size=8, image_size=32, projection_dim=16, hidden_act="gelu", layer_norm_eps=1e-5)


def build_clip_vision(seed: int = 0, **changes):
    """A tiny CLIPVisionModelWithProjection (TINY_CLIP_VISION with `changes`) with random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_CLIP_VISION, **changes})).eval()


def save_clip_vision(model, path: Path, layout: str = "transformers") -> Path:
    """One `.safetensors` file without a config: transformers' names, or open_clip's (`layout="open_clip"`)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
             if not k.endswith("position_ids")}
    save_file(open_clip_state(state) if layout == "open_clip" else state, path)
    return path


def save_clip_vision_folder(model, folder: Path) -> Path:
    """h94's `models/image_encoder`: config.json and model.safetensors (transformers' own writer)."""
    model.save_pretrained(folder)
    return Path(folder)


def open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIP vision names -> open_clip's `visual.*` (q, k, v fused, the projection transposed)."""
    renames = {"embeddings.patch_embedding.weight": "conv1.weight", "embeddings.class_embedding": "class_embedding",
               "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm": "ln_pre",
               "post_layernorm": "ln_post", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {"visual.proj": state["visual_projection.weight"].T.contiguous()}
    for key, value in state.items():
        if key == "visual_projection.weight" or "self_attn.k_proj" in key or "self_attn.v_proj" in key:
            continue
        name = key.removeprefix("vision_model.").replace("encoder.layers.", "transformer.resblocks.")
        if "self_attn.q_proj" in name:
            kind = name.rsplit(".", 1)[1]
            fused = torch.cat([state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            out["visual." + name.split(".self_attn.")[0] + f".attn.in_proj_{kind}"] = fused
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        out["visual." + name] = value
    return out


def ip_adapter_state(unet, kind: str = "plain", image_width: int = 16, tokens: int | None = None,
                     resampler_width: int = 64, depth: int = 2, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} in h94's layout for `unet`: `image_width` is the encoder's
    image_embeds width (plain) or hidden width (plus); 4 tokens (plain) or 16 (plus) by default. The
    attention layers are numbered as h94 numbers them: every processor of `unet.attn_processors` counts,
    the cross-attention ones (odd numbers) carry to_k_ip / to_v_ip."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale / (shape[-1] ** 0.5 if len(shape) > 1 else 1.0)

    context = unet.config.cross_attention_dim
    if kind == "plain":
        tokens = tokens or 4
        image_proj = {"proj.weight": rand(tokens * context, image_width), "proj.bias": rand(tokens * context) * 0.1,
                      "norm.weight": 1 + rand(context) * 0.1, "norm.bias": rand(context) * 0.1}
    else:
        image_proj = _resampler_state(rand, image_width, resampler_width, context, tokens or 16, depth)
    ip_layers = {}
    for number, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            to_k = unet.get_submodule(name.removesuffix(".processor")).to_k.weight
            for part in ("to_k_ip", "to_v_ip"):
                ip_layers[f"{number}.{part}.weight"] = rand(*to_k.shape, scale=2.0)
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def _resampler_state(rand, embedding: int, width: int, output: int, queries: int, depth: int) -> dict:
    """h94's Resampler: latents, proj_in/out, norm_out, and per layer a PerceiverAttention (norm1, norm2,
    to_q, to_kv, to_out; 64-channel heads) and a feed-forward (LayerNorm, Linear x4, GELU, Linear)."""
    inner = 64 * max(1, width // 64)
    state = {"latents": rand(1, queries, width), "proj_in.weight": rand(width, embedding), "proj_in.bias": rand(width),
             "proj_out.weight": rand(output, width), "proj_out.bias": rand(output) * 0.1,
             "norm_out.weight": 1 + rand(output) * 0.1, "norm_out.bias": rand(output) * 0.1}
    for i in range(depth):
        for norm in ("0.norm1", "0.norm2", "1.0"):
            state[f"layers.{i}.{norm}.weight"], state[f"layers.{i}.{norm}.bias"] = 1 + rand(width) * 0.1, rand(width) * 0.1
        state.update({f"layers.{i}.0.to_q.weight": rand(inner, width), f"layers.{i}.0.to_kv.weight": rand(2 * inner, width),
                      f"layers.{i}.0.to_out.weight": rand(width, inner), f"layers.{i}.1.1.weight": rand(4 * width, width),
                      f"layers.{i}.1.3.weight": rand(width, 4 * width)})
    return state


def save_ip_adapter(state: dict[str, dict[str, torch.Tensor]], path: Path, dtype=None) -> Path:
    """`.safetensors` with `image_proj.*` / `ip_adapter.*` keys, or a pickled `.bin` holding the two dicts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {part: {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in tensors.items()}
             for part, tensors in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({f"{part}.{k}": v for part, tensors in state.items() for k, v in tensors.items()}, path)
    else:
        torch.save(state, path)
    return path
