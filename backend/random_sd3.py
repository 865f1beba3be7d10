"""Tiny random-weight SD3 / SD3.5 MMDiT transformers of the real architecture, for tests and benchmarks.

`save_transformer` writes one the way Stability ships it: `model.diffusion_model.joint_blocks.N...`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from backend import sd3_layout

TINY_HEAD_DIM = 16
TINY_LAYERS = 2


def tiny_config(
    dual_attention: bool = False,
    qk_norm: bool = True,
    pooled_projection_dim: int = 64,
    joint_attention_dim: int = 32,
) -> dict:
    """A two-block `SD3Transformer2DModel` config.

    `qk_norm=False` is SD3 Medium, `qk_norm=True` SD3.5 Large (and Turbo), and `dual_attention=True`
    SD3.5 Medium, whose first blocks also have a second, image-only attention. Heads equal blocks, as
    in every released model. `pooled_projection_dim` is CLIP-L's plus CLIP-G's pooled width, and
    `joint_attention_dim` the width of the T5 / padded CLIP context, of the text encoders paired with it.
    """
    hidden = TINY_LAYERS * TINY_HEAD_DIM
    return {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": TINY_LAYERS,
        "attention_head_dim": TINY_HEAD_DIM,
        "num_attention_heads": TINY_LAYERS,
        "joint_attention_dim": joint_attention_dim,
        "caption_projection_dim": hidden,
        "pooled_projection_dim": pooled_projection_dim,
        "out_channels": 16,
        "pos_embed_max_size": 16,
        "dual_attention_layers": (0,) if dual_attention else (),
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def build_transformer(config: dict, seed: int = 0):
    """Random weights from `seed`, in eval mode; the caller's global RNG state is left as it was.

    Parameters a layer initialises to a constant (zeros, or the ones of a norm) are perturbed, so the
    output is non-trivial and a mix-up between, say, `ln_q` and `ln_k` changes it.
    """
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in transformer.parameters():
            if parameter.min() == parameter.max():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return transformer.eval()


def save_transformer(
    path: Path,
    transformer,
    dtype: torch.dtype = torch.float16,
    prefix: str = sd3_layout.PREFIX,
) -> Path:
    """Write `transformer` as a Stability-layout `.safetensors` file: keys under `prefix` ("" for the
    bare transformer file), every tensor in `dtype`."""
    from safetensors.torch import save_file

    state = sd3_layout.from_diffusers(transformer.state_dict(), transformer.config)
    tensors = {prefix + key: value.detach().to(dtype).contiguous() for key, value in state.items()}
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
