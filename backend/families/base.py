"""`Family`: what one model family gives the shared machinery (detection, loading, text conditioning, how
its network is called, its latent format, sampling defaults, LoRA names), so that adding a family is
adding one module (Forge's "one small engine per family")."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from backend.checkpoints import Components
    from backend.families.parts import Parts

Shapes = Mapping[str, tuple[int, ...]]


class Family:
    """One model family. Subclasses set the class attributes and implement the methods that differ."""

    name: str = ""  # the key stored in `ModelSpec.family` ("sd1", "sdxl", "flux", ...)
    label: str = ""  # as users say it ("SD 1.x", "FLUX.1")
    native_size: int = 512  # the side the family was trained at
    latent_channels: int = 4
    # Latent -> RGB: one row of (r, g, b) factors per latent channel, and an (r, g, b) bias (cheap previews).
    preview_factors: tuple[tuple[float, float, float], ...] = ()
    preview_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # How sampling sees the network: "unet" (epsilon/v-prediction on A1111's discrete schedule) or
    # "flow" (rectified flow: the network predicts the velocity from noise to image, sigma in [0, 1]).
    prediction: str = "unet"
    default_sampler: str = "DPM++ 2M"
    default_cfg: float = 7.0
    size_multiple: int = 8  # width and height must be multiples of this
    encodes_prompts: bool = False  # True: `encode_prompt` here; False: CLIP chunks by `backend.conditioning`

    def claims(self, shapes: Shapes) -> bool:
        """Whether a file with these tensors is a checkpoint of this family."""
        raise NotImplementedError

    def load(self, path: Path, cache_dir: Path, dtype: torch.dtype, parts: Parts) -> Components:
        """The file's modules, with parts it lacks (text encoders, VAE) from `parts`."""
        raise NotImplementedError

    def added_conditioning(self, model, run, embeddings: list, n: int) -> dict | None:
        """Inputs beyond the context that the network takes per row (SDXL's size/crop numbers and pooled
        text), for `embeddings` (one per prompt in the call) repeated for `n` images each."""
        return None

    def call_network(self, model, sample: torch.Tensor, t, context: torch.Tensor, added: dict | None,
                     extra: Mapping[str, Any]) -> torch.Tensor:
        """The network's raw prediction for a latent-shaped batch at timestep `t`."""
        return model.unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added, **extra).sample

    def infotext_parameters(self, model, run) -> dict:
        """The family's own infotext keys for a request (Forge's, for FLUX.1 and SD 3.x)."""
        return {}

    def text_encoder_prefixes(self) -> list[tuple[str, str]]:
        """(kohya prefix, diffusers prefix) of each text encoder's LoRA layer names, in encoder order."""
        return [("lora_te_", "text_encoder.")]

    def presets(self, model, defaults: dict) -> dict:
        """The sampler, CFG scale and steps the UI starts this model with, given the options' `defaults`."""
        return defaults

    def check_size(self, model, width: int, height: int) -> None:
        """Raise `InputError` for a size the network cannot take (beyond what `size_multiple` says)."""

    def schedule_for(self, sampler: str, requested: str, resolved: str) -> str:
        """The schedule type a sampler runs with on this family: `resolved` is A1111's reading of the user's
        `requested` type (e.g. "Automatic" -> "Karras" for DPM++ 2M)."""
        return resolved

    def vae_dtype(self, requested: torch.dtype) -> torch.dtype:
        """The VAE's precision when `requested` is asked for."""
        return requested
