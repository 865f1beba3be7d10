"""What the rectified-flow families (FLUX.1, SD 3.x) share: flow sampling (`backend.flow_sampling`), their
own prompt encoding, sizes in multiples of 16, and loading a transformer file with parts found elsewhere."""

from __future__ import annotations

import torch

from backend import flow_sampling
from backend.families.base import Family


class FlowFamily(Family):
    prediction = "flow"
    default_sampler = "Euler"
    size_multiple = 16  # 8x VAE, then 2x2 patches
    encodes_prompts = True

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's timestep input at `sigma`."""
        return sigma

    def sigma_of(self, timestep) -> float:
        """The sigma of a network timestep (the inverse of `timestep`)."""
        return float(timestep)

    def shift(self, model, run) -> flow_sampling.Shift:
        """How the schedule is shifted for this model and request (the request's `Shift` when it sets one)."""
        raise NotImplementedError

    def presets(self, model, defaults: dict) -> dict:
        return {**defaults, "sampler": self.default_sampler, "cfg_scale": self.default_cfg}

    def infotext_parameters(self, model, run) -> dict:
        return {"Shift": run.shift} if run.shift > 0 else {}

    def schedule_for(self, sampler: str, requested: str, resolved: str) -> str:
        return flow_sampling.check_sampler(sampler, requested, self.label)

    def encode_prompt(self, model, text: str, emphasis: str):
        """A `conditioning.PromptEmbedding` of `text` (context: the network's text tokens; pooled vector)."""
        raise NotImplementedError
