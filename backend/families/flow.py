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

    def t5_limit(self, model) -> int:
        """How many tokens T5 reads for this model (the rest of a longer prompt is cut)."""
        raise NotImplementedError

    def token_count(self, model, text: str) -> tuple[int, int] | None:
        """(T5 tokens of `text`, T5's limit), or None without a T5 (CLIP's counter applies)."""
        from backend import flow_conditioning

        tokenizer = model.tokenizers[-1]
        if tokenizer is None or model.text_encoders[-1] is None:
            return None
        return flow_conditioning.t5_token_count(tokenizer, text), self.t5_limit(model)

    def encode_prompt(self, model, text: str, emphasis: str):
        """A `conditioning.PromptEmbedding` of `text` (context: the network's text tokens; pooled vector)."""
        raise NotImplementedError
