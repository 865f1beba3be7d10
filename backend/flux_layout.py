"""FLUX.1 transformer key layouts: Black Forest Labs' original (what users download) <-> diffusers'.

Every size is read from the tensors' shapes, so pruned or narrower FLUX-architecture files load too
(diffusers' own converter assumes the 3072-wide FLUX.1 [dev]/[schnell]).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from backend.model_detection import CheckpointFormatError

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# diffusers' FluxTransformer2DModel fixes the MLP at 4 x the hidden width (FLUX.1's mlp_ratio).
MLP_RATIO = 4

_DIFFUSERS_MARKERS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")

# Layers that only change name; each has a `.weight` and a `.bias`.
_TOP_LINEARS = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_GUIDANCE_LINEARS = {
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
_DOUBLE_LINEARS = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_LINEARS = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
# Targets of fused tensors, in the order they are stacked; single blocks' linear1 adds proj_mlp after them.
_IMG_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_TXT_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class _Entry:
    """One original tensor and the diffusers tensor(s) it becomes."""

    original: str
    targets: tuple[str, ...]
    # Fused tensors (qkv, linear1) are stacked along dim 0 with these row counts.
    sizes: tuple[int, ...] | None = None
    # BFL's final modulation emits (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift).
    swap_halves: bool = False


def strip_prefix(state_dict: Mapping) -> dict:
    """The transformer's entries without ComfyUI/Forge's prefix; other parts (`vae.`, ...) are dropped."""
    for prefix in PREFIXES:
        if any(key.startswith(prefix) for key in state_dict):
            return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return dict(state_dict)


def is_diffusers_layout(keys: Iterable[str]) -> bool:
    """True for diffusers' key names (`transformer_blocks.0.attn.to_q.weight`, `x_embedder.weight`, ...)."""
    return any(key.startswith(_DIFFUSERS_MARKERS) for key in keys)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE dimensions per position axis (index, height, width); they sum to the head dim.

    FLUX.1 uses (16, 56, 56) for its 128-dim heads, i.e. 1/8, 7/16, 7/16. Other head dims keep those
    proportions: each spatial axis gets 7/16 of the head dim rounded down to an even number (rotary
    pairs), the index axis takes the rest, so height and width stay alike. 64 -> (8, 28, 28),
    16 -> (4, 6, 6).
    """
    if head_dim % 2 or head_dim < 6:
        raise CheckpointFormatError(
            f"attention head dim {head_dim} cannot carry FLUX's 3-axis RoPE (it needs an even dim >= 6)"
        )
    spatial = max(2, (head_dim * 7 // 16) // 2 * 2)
    return (head_dim - 2 * spatial, spatial, spatial)


def transformer_config(shapes: Mapping) -> dict:
    """A full FluxTransformer2DModel config from an original-layout (BFL) transformer's shapes."""
    shapes = _shapes(shapes)
    _require(shapes, ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"))
    num_layers = _count_blocks(shapes, "double_blocks.")
    num_single_layers = _count_blocks(shapes, "single_blocks.")
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if num_layers else "single_blocks.0.norm.query_norm.scale"
    _require(shapes, (norm,))
    hidden, in_channels = shapes["img_in.weight"]
    _check_mlp(shapes, hidden, "double_blocks.0.img_mlp.0.weight", MLP_RATIO * hidden)
    _check_mlp(shapes, hidden, "single_blocks.0.linear1.weight", (3 + MLP_RATIO) * hidden)
    return _config(
        hidden=hidden,
        head_dim=shapes[norm][0],
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        joint_attention_dim=shapes["txt_in.weight"][1],
        pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
        guidance_embeds="guidance_in.in_layer.weight" in shapes,
    )


def transformer_config_from_diffusers(shapes: Mapping) -> dict:
    """The same config from a diffusers-layout transformer's shapes."""
    shapes = _shapes(shapes)
    pooled = "time_text_embed.text_embedder.linear_1.weight"
    _require(shapes, ("x_embedder.weight", "context_embedder.weight", pooled, "proj_out.weight"))
    num_layers = _count_blocks(shapes, "transformer_blocks.")
    num_single_layers = _count_blocks(shapes, "single_transformer_blocks.")
    block = "transformer_blocks.0." if num_layers else "single_transformer_blocks.0."
    _require(shapes, (block + "attn.norm_q.weight",))
    hidden, in_channels = shapes["x_embedder.weight"]
    return _config(
        hidden=hidden,
        head_dim=shapes[block + "attn.norm_q.weight"][0],
        in_channels=in_channels,
        out_channels=shapes["proj_out.weight"][0],
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        joint_attention_dim=shapes["context_embedder.weight"][1],
        pooled_projection_dim=shapes[pooled][1],
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
    )


def to_diffusers(state_dict: Mapping, config: Mapping) -> dict:
    """Original (BFL) keys -> diffusers keys. Fused tensors are split into views along dim 0, not copied."""
    plan = _plan(config)
    _check_keys(state_dict, [entry.original for entry in plan], "original FLUX")
    out = {}
    for entry in plan:
        tensor = state_dict[entry.original]
        if entry.swap_halves:
            tensor = _swap_halves(tensor, entry.original)
        if entry.sizes is None:
            out[entry.targets[0]] = tensor
            continue
        if tensor.shape[0] != sum(entry.sizes):
            raise CheckpointFormatError(
                f"{entry.original} has {tensor.shape[0]} rows; this FLUX config needs {sum(entry.sizes)} {entry.sizes}"
            )
        out.update(zip(entry.targets, torch.split(tensor, list(entry.sizes), dim=0)))
    return out


def from_diffusers(state_dict: Mapping, config: Mapping) -> dict:
    """Diffusers keys -> original (BFL) keys: the exact inverse of `to_diffusers`."""
    plan = _plan(config)
    _check_keys(state_dict, [target for entry in plan for target in entry.targets], "diffusers FLUX")
    out = {}
    for entry in plan:
        parts = [state_dict[target] for target in entry.targets]
        tensor = parts[0] if len(parts) == 1 else _cat(parts)
        out[entry.original] = _swap_halves(tensor, entry.original) if entry.swap_halves else tensor
    return out


def _plan(config: Mapping) -> list[_Entry]:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    plan = [
        _Entry(f"final_layer.adaLN_modulation.1.{p}", (f"norm_out.linear.{p}",), swap_halves=True) for p in _PARAMS
    ]
    top = {**_TOP_LINEARS, **(_GUIDANCE_LINEARS if config["guidance_embeds"] else {})}
    plan += _renamed("", "", top, {})
    for i in range(config["num_layers"]):
        original, target = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        plan += _renamed(original, target, _DOUBLE_LINEARS, _DOUBLE_NORMS)
        plan += _fused(original + "img_attn.qkv", target, _IMG_QKV, (inner,) * 3)
        plan += _fused(original + "txt_attn.qkv", target, _TXT_QKV, (inner,) * 3)
    for i in range(config["num_single_layers"]):
        original, target = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        plan += _renamed(original, target, _SINGLE_LINEARS, _SINGLE_NORMS)
        plan += _fused(original + "linear1", target, (*_IMG_QKV, "proj_mlp"), (inner, inner, inner, MLP_RATIO * inner))
    return plan


def _renamed(original: str, target: str, linears: Mapping[str, str], norms: Mapping[str, str]) -> list[_Entry]:
    entries = [_Entry(f"{original}{old}.{p}", (f"{target}{new}.{p}",)) for old, new in linears.items() for p in _PARAMS]
    return entries + [_Entry(original + old, (target + new,)) for old, new in norms.items()]


def _fused(original: str, target: str, names: tuple[str, ...], sizes: tuple[int, ...]) -> list[_Entry]:
    return [_Entry(f"{original}.{p}", tuple(f"{target}{name}.{p}" for name in names), sizes) for p in _PARAMS]


def _config(*, hidden: int, head_dim: int, **sizes) -> dict:
    if hidden % head_dim:
        raise CheckpointFormatError(f"hidden width {hidden} is not a multiple of the attention head dim {head_dim}")
    return dict(
        patch_size=1,
        in_channels=sizes["in_channels"],
        out_channels=sizes["out_channels"],
        num_layers=sizes["num_layers"],
        num_single_layers=sizes["num_single_layers"],
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=sizes["joint_attention_dim"],
        pooled_projection_dim=sizes["pooled_projection_dim"],
        guidance_embeds=sizes["guidance_embeds"],
        axes_dims_rope=rope_axes(head_dim),
    )


def _swap_halves(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.shape[0] % 2:
        raise CheckpointFormatError(
            f"{name} has an odd number of rows ({tensor.shape[0]}); expected shift and scale halves"
        )
    first, second = torch.split(tensor, tensor.shape[0] // 2, dim=0)
    return _cat([second, first])


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0; float8 goes through its bytes, as older torch builds lack cat for it."""
    dtype = tensors[0].dtype
    if dtype.is_floating_point and dtype.itemsize == 1:
        return torch.cat([t.view(torch.uint8) for t in tensors], dim=0).view(dtype)
    return torch.cat(tensors, dim=0)


def _shapes(shapes: Mapping) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape if hasattr(value, "shape") else value) for key, value in shapes.items()}


def _require(shapes: Mapping, keys: Iterable[str]) -> None:
    missing = [key for key in keys if key not in shapes]
    if missing:
        raise CheckpointFormatError(f"not a complete FLUX transformer: missing {', '.join(missing)}")


def _count_blocks(shapes: Mapping, prefix: str) -> int:
    indices = {int(key[len(prefix) :].split(".", 1)[0]) for key in shapes if key.startswith(prefix)}
    gaps = sorted(set(range(max(indices, default=-1) + 1)) - indices)
    if gaps:
        raise CheckpointFormatError(f"not a complete FLUX transformer: {prefix}{gaps[0]}.* is missing")
    return len(indices)


def _check_mlp(shapes: Mapping, hidden: int, key: str, expected: int) -> None:
    if key in shapes and shapes[key][0] != expected:
        raise CheckpointFormatError(
            f"{key} has {shapes[key][0]} rows, but diffusers' FluxTransformer2DModel needs {expected} for hidden "
            f"width {hidden} (MLP ratio {MLP_RATIO}); files with a different MLP width are not supported"
        )


def _check_keys(state_dict: Mapping, expected: list[str], layout: str) -> None:
    missing = [key for key in expected if key not in state_dict]
    if missing:
        raise CheckpointFormatError(
            f"not a complete {layout} transformer: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}"
        )
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise CheckpointFormatError(
            f"unexpected tensors for a {layout} transformer ({len(unexpected)}), e.g. {', '.join(unexpected[:3])}; "
            "variants such as scaled-fp8 files are not supported"
        )
