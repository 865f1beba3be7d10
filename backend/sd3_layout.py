"""Stability's SD3 / SD3.5 MMDiT single-file key layout <-> diffusers' `SD3Transformer2DModel`.

Owns the key mapping in both directions and the transformer config read from tensor shapes alone,
so a file is identified and loaded offline, from its header, without a hub config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from backend.model_detection import CheckpointFormatError

PREFIX = "model.diffusion_model."

# Not stored in the weights: the default latent side, 1024 px / VAE factor 8, which every released
# SD3 / 3.5 transformer uses. Capped at the position table so a smaller model's default fits it.
DEFAULT_SAMPLE_SIZE = 128


@dataclass(frozen=True)
class _Names:
    """Where each size the config needs is read from, in one layout."""

    layout: str
    pos_embed: str
    patch_embed: str
    proj_out: str
    context_embedder: str
    pooled_embedder: str
    blocks: str
    block_q_norm: str
    block_attn2: str


_STABILITY = _Names(
    layout="Stability",
    pos_embed="pos_embed",
    patch_embed="x_embedder.proj.weight",
    proj_out="final_layer.linear.weight",
    context_embedder="context_embedder.weight",
    pooled_embedder="y_embedder.mlp.0.weight",
    blocks="joint_blocks.",
    block_q_norm="x_block.attn.ln_q.weight",
    block_attn2="x_block.attn2.",
)
_DIFFUSERS = _Names(
    layout="diffusers",
    pos_embed="pos_embed.pos_embed",
    patch_embed="pos_embed.proj.weight",
    proj_out="proj_out.weight",
    context_embedder="context_embedder.weight",
    pooled_embedder="time_text_embed.text_embedder.linear_1.weight",
    blocks="transformer_blocks.",
    block_q_norm="attn.norm_q.weight",
    block_attn2="attn2.",
)


def strip_prefix(mapping: Mapping) -> dict:
    """The transformer's entries without `PREFIX` when the file has it (a full checkpoint also holds
    the VAE and text encoders, which are dropped); a bare transformer file comes back unchanged."""
    if not any(key.startswith(PREFIX) for key in mapping):
        return dict(mapping)
    return {key[len(PREFIX) :]: value for key, value in mapping.items() if key.startswith(PREFIX)}


def is_diffusers_layout(keys: Iterable[str]) -> bool:
    return any(key.startswith(_DIFFUSERS.blocks) or key == _DIFFUSERS.patch_embed for key in keys)


def transformer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """`SD3Transformer2DModel` config from Stability-layout shapes (keys with or without `PREFIX`)."""
    return _derive_config(strip_prefix(shapes), _STABILITY)


def transformer_config_from_diffusers(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """`SD3Transformer2DModel` config from diffusers-layout shapes."""
    return _derive_config(shapes, _DIFFUSERS)


def _derive_config(shapes: Mapping[str, tuple[int, ...]], names: _Names) -> dict:
    # 1. Everything below is read from these tensors.
    required = (names.pos_embed, names.patch_embed, names.proj_out, names.context_embedder, names.pooled_embedder)
    missing = [key for key in required if key not in shapes]
    if missing:
        raise CheckpointFormatError(
            f"not a complete SD3 / SD3.5 transformer ({names.layout} layout): missing {', '.join(missing)}; "
            "the file is truncated or holds another kind of model"
        )
    hidden, in_channels, patch_size = tuple(shapes[names.patch_embed])[:3]
    num_layers = _count_blocks(shapes, names)

    # 2. Heads. With qk norm the norm's length is the head dim; without it, SD3's MMDiT fixes
    # num_heads = depth (hidden = 64 * depth, head dim 64), as the reference implementation does.
    q_norm = f"{names.blocks}0.{names.block_q_norm}"
    head_dim = shapes[q_norm][0] if q_norm in shapes else hidden // num_layers
    if head_dim == 0 or hidden % head_dim:
        raise CheckpointFormatError(
            f"SD3 transformer width {hidden} is not a whole number of {head_dim}-channel attention heads"
        )

    # 3. The position table is (1, side * side, hidden): a square grid of patches.
    positions = tuple(shapes[names.pos_embed])[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise CheckpointFormatError(f"SD3 {names.pos_embed} has {positions} positions, not a square grid")

    joint_attention_dim = tuple(shapes[names.context_embedder])
    return {
        "sample_size": min(DEFAULT_SAMPLE_SIZE, side),
        "patch_size": patch_size,
        "in_channels": in_channels,
        "num_layers": num_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": joint_attention_dim[1],
        "caption_projection_dim": joint_attention_dim[0],
        "pooled_projection_dim": tuple(shapes[names.pooled_embedder])[1],
        "out_channels": tuple(shapes[names.proj_out])[0] // (patch_size * patch_size),
        "pos_embed_max_size": side,
        "dual_attention_layers": _blocks_with(shapes, names, names.block_attn2),
        "qk_norm": "rms_norm" if q_norm in shapes else None,
    }


def _block_index(key: str, names: _Names) -> int | None:
    if not key.startswith(names.blocks):
        return None
    index = key[len(names.blocks) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _count_blocks(shapes: Mapping[str, tuple[int, ...]], names: _Names) -> int:
    indices = {_block_index(key, names) for key in shapes} - {None}
    if not indices:
        raise CheckpointFormatError(f"SD3 transformer has no {names.blocks}N.* weights ({names.layout} layout)")
    gaps = sorted(set(range(max(indices) + 1)) - indices)
    if gaps:
        raise CheckpointFormatError(
            f"SD3 transformer is missing {names.blocks}{', '.join(map(str, gaps))}; the file is incomplete"
        )
    return max(indices) + 1


def _blocks_with(shapes: Mapping[str, tuple[int, ...]], names: _Names, part: str) -> tuple[int, ...]:
    found = {_block_index(key, names) for key in shapes if f".{part}" in key}
    return tuple(sorted(found - {None}))


@dataclass(frozen=True)
class _Link:
    """One Stability tensor and the diffusers tensor(s) it becomes."""

    stability: str
    diffusers: tuple[str, ...]  # three names: the fused qkv splits along dim 0 into q, k, v
    swap: bool = False  # Stability's adaLN halves are (shift, scale); diffusers' are (scale, shift)


def _linear(stability: str, diffusers: str | tuple[str, ...], swap: bool = False) -> Iterator[_Link]:
    targets = (diffusers,) if isinstance(diffusers, str) else diffusers
    for suffix in ("weight", "bias"):
        yield _Link(f"{stability}.{suffix}", tuple(f"{name}.{suffix}" for name in targets), swap)


def _norm(stability: str, diffusers: str) -> _Link:
    return _Link(f"{stability}.weight", (f"{diffusers}.weight",))


def _qkv(attention: str, names: tuple[str, str, str]) -> tuple[str, ...]:
    return tuple(f"{attention}.{name}" for name in names)


_TO_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def _block_links(index: int, config: Mapping) -> Iterator[_Link]:
    s, d = f"joint_blocks.{index}.", f"transformer_blocks.{index}."
    # The last block's context stream only feeds the image stream: no output projection, no MLP,
    # and a continuous (shift, scale) norm instead of adaLN-Zero.
    pre_only = index == config["num_layers"] - 1
    yield from _linear(f"{s}x_block.attn.qkv", _qkv(f"{d}attn", _TO_QKV))
    yield from _linear(f"{s}x_block.attn.proj", f"{d}attn.to_out.0")
    yield from _linear(f"{s}x_block.adaLN_modulation.1", f"{d}norm1.linear")
    yield from _linear(f"{s}x_block.mlp.fc1", f"{d}ff.net.0.proj")
    yield from _linear(f"{s}x_block.mlp.fc2", f"{d}ff.net.2")
    yield from _linear(f"{s}context_block.attn.qkv", _qkv(f"{d}attn", _ADD_QKV))
    yield from _linear(f"{s}context_block.adaLN_modulation.1", f"{d}norm1_context.linear", swap=pre_only)
    if not pre_only:
        yield from _linear(f"{s}context_block.attn.proj", f"{d}attn.to_add_out")
        yield from _linear(f"{s}context_block.mlp.fc1", f"{d}ff_context.net.0.proj")
        yield from _linear(f"{s}context_block.mlp.fc2", f"{d}ff_context.net.2")
    if config.get("qk_norm"):
        yield _norm(f"{s}x_block.attn.ln_q", f"{d}attn.norm_q")
        yield _norm(f"{s}x_block.attn.ln_k", f"{d}attn.norm_k")
        yield _norm(f"{s}context_block.attn.ln_q", f"{d}attn.norm_added_q")
        yield _norm(f"{s}context_block.attn.ln_k", f"{d}attn.norm_added_k")
    if index in tuple(config.get("dual_attention_layers") or ()):
        yield from _linear(f"{s}x_block.attn2.qkv", _qkv(f"{d}attn2", _TO_QKV))
        yield from _linear(f"{s}x_block.attn2.proj", f"{d}attn2.to_out.0")
        if config.get("qk_norm"):
            yield _norm(f"{s}x_block.attn2.ln_q", f"{d}attn2.norm_q")
            yield _norm(f"{s}x_block.attn2.ln_k", f"{d}attn2.norm_k")


def _links(config: Mapping) -> list[_Link]:
    links = [_Link("pos_embed", ("pos_embed.pos_embed",))]
    links += _linear("x_embedder.proj", "pos_embed.proj")
    links += _linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    links += _linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    links += _linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    links += _linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    links += _linear("context_embedder", "context_embedder")
    for index in range(config["num_layers"]):
        links += _block_links(index, config)
    links += _linear("final_layer.linear", "proj_out")
    links += _linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return links


def _check_keys(keys: Iterable[str], expected: set[str], layout: str) -> None:
    keys = set(keys)
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) such as {', '.join(missing[:4])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) such as {', '.join(unexpected[:4])}")
    raise CheckpointFormatError(
        f"SD3 transformer ({layout} layout) does not match its derived config: {'; '.join(problems)}. "
        "The file is incomplete, or a variant Easel does not know"
    )


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Stability-layout tensors (with or without `PREFIX`) -> `SD3Transformer2DModel` state dict.

    The input is not modified. q, k and v are views of the fused qkv tensor, and every other tensor
    but the two swapped adaLN ones is passed through, so an 8B-parameter file is not copied.
    """
    state_dict = strip_prefix(state_dict)
    links = _links(config)
    _check_keys(state_dict, {link.stability for link in links}, "Stability")
    converted = {}
    for link in links:
        tensor = state_dict[link.stability]
        if len(link.diffusers) == 3:
            converted.update(zip(link.diffusers, tensor.chunk(3, dim=0)))
        else:
            converted[link.diffusers[0]] = _swap_halves(tensor) if link.swap else tensor
    return converted


def from_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """`SD3Transformer2DModel` state dict -> Stability layout, without `PREFIX`; exact inverse of `to_diffusers`."""
    links = _links(config)
    _check_keys(state_dict, {name for link in links for name in link.diffusers}, "diffusers")
    converted = {}
    for link in links:
        parts = [state_dict[name] for name in link.diffusers]
        if len(parts) == 3:
            converted[link.stability] = torch.cat(parts)
        else:
            converted[link.stability] = _swap_halves(parts[0]) if link.swap else parts[0]
    return converted
