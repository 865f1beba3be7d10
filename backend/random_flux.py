"""Random-weight FLUX.1 transformers of the real architecture, for tests and benchmarks.

`build_transformer` makes one from a config (`tiny_config()` for tests); `save_transformer` writes it
as users download it: Black Forest Labs' key layout, optionally with ComfyUI's all-in-one prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from backend import flux_layout

# diffusers initialises every RMSNorm scale to one, so a q/k norm mix-up would go unnoticed.
_NORM_SUFFIXES = ("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")


def tiny_config(guidance: bool = True) -> dict:
    """A 32-wide FLUX transformer (2 heads of 16, 2 double and 2 single blocks); guidance=False is schnell-like."""
    return dict(
        patch_size=1,
        in_channels=64,
        out_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance,
        axes_dims_rope=flux_layout.rope_axes(16),
    )


def build_transformer(config: Mapping, seed: int = 0):
    """A FluxTransformer2DModel with random weights (fixed by `seed`), in eval mode."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel.from_config(dict(config))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if name.endswith(_NORM_SUFFIXES):
                parameter.normal_(1.0, 0.2)
    return transformer.eval()


def save_transformer(path: str | Path, transformer, dtype: torch.dtype = torch.bfloat16, prefix: str = "") -> Path:
    """Write `transformer` as a BFL-layout .safetensors; prefix "model.diffusion_model." gives ComfyUI's naming."""
    from safetensors.torch import save_file

    state = {key: value.detach().to(dtype) for key, value in transformer.state_dict().items()}
    original = flux_layout.from_diffusers(state, transformer.config)
    path = Path(path)
    tensors = {prefix + key: value.contiguous() for key, value in original.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
