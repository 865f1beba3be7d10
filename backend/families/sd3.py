"""Stable Diffusion 3 and 3.5 (Medium, Large, Large Turbo): an MMDiT rectified flow over 16-channel latents,
conditioned on CLIP-L and CLIP-G (penultimate layers side by side, pooled vectors joined) followed by T5 v1.1 XXL's
tokens; T5 is optional, as Stability documents (zeros take its place). Schedule shift 3."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from backend import checkpoints, flow_sampling, model_detection
from backend.conditioning import PromptEmbedding
from backend.errors import InputError
from backend.families import flow_files
from backend.families.flow import FlowFamily
from backend.families.parts import Parts

T5_TOKENS = 256  # diffusers' default for SD 3.x
SHIFT = 3.0


class SD3(FlowFamily):
    name, label, native_size = "sd3", "SD 3", 1024
    latent_channels = 16
    default_cfg = 5.0

    def claims(self, shapes) -> bool:
        return model_detection.transformer_family(shapes) == "Stable Diffusion 3"

    def load(self, path: Path, cache_dir: Path, dtype: torch.dtype, parts: Parts) -> checkpoints.Components:
        from backend import sd3_layout

        files, config, transformer = flow_files.read_transformer(
            path, sd3_layout, "SD3Transformer2DModel", dtype, self.name in parts.fp8_families)
        wanted = f"{path.name} (an {self.label} transformer)"
        encoders = [
            files.text_encoder("clip_l", "CLIP-L (clip_l.safetensors)", wanted, parts, dtype, with_projection=True),
            files.text_encoder("clip_g", "CLIP-G (clip_g.safetensors)", wanted, parts, dtype),
            files.text_encoder("t5xxl", "T5 XXL", wanted, parts, dtype, optional=True),
        ]
        vae = files.vae(self.name, self.latent_channels, "the SD 3 VAE", wanted, parts, dtype)
        spec = model_detection.ModelSpec(family=self.name, label=self._label(config), unet=dict(config),
                                         vae=dict(vae.config), text_encoders=(), scheduler={},
                                         native_size=self.native_size, prediction_type="flow")
        kinds = ("clip", "clip_g", "t5") if encoders[2] is not None else ("clip", "clip_g")
        tokenizers = flow_files.tokenizers(kinds, cache_dir, parts) + [None] * (3 - len(kinds))
        return checkpoints.Components(spec=spec, unet=transformer, vae=vae, text_encoders=encoders,
                                      tokenizers=tokenizers,
                                      scheduler_config={"prediction_type": "flow"}, prediction_type="flow")

    @staticmethod
    def _label(config: dict) -> str:
        """SD 3.5 has q/k norms (Large) or a second attention (Medium); SD 3 Medium has neither."""
        return "SD 3.5" if config.get("qk_norm") or config.get("dual_attention_layers") else "SD 3"

    def check_size(self, model, width: int, height: int) -> None:
        # Positions come from a fixed table of patches (192 x 192 in SD 3 and 3.5 Large: 3072 px).
        config = model.unet.config
        limit = config.pos_embed_max_size * config.patch_size * model.vae_scale_factor
        if max(width, height) > limit:
            raise InputError(f"{model.label} models make images up to {limit} px on a side; "
                             f"{width}x{height} is too large")

    # -- sampling ------------------------------------------------------------------------------------
    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * 1000

    def sigma_of(self, timestep) -> float:
        return float(timestep) / 1000

    def shift(self, model, run) -> flow_sampling.Shift:
        return flow_sampling.Shift(run.shift if run.shift > 0 else SHIFT)

    def t5_limit(self, model) -> int:
        return T5_TOKENS

    # -- conditioning -------------------------------------------------------------------------------
    def encode_prompt(self, model, text: str, emphasis: str) -> PromptEmbedding:
        from backend import flow_conditioning

        clip_l, clip_g, t5 = model.text_encoders
        tokenizer_l, tokenizer_g, tokenizer_t5 = model.tokenizers
        width = model.unet.config.joint_attention_dim
        with model.use(*[e for e in model.text_encoders if e is not None]):
            hidden_l, pooled_l = flow_conditioning.encode_clip(clip_l, tokenizer_l, text, emphasis, model.device, -2)
            hidden_g, pooled_g = flow_conditioning.encode_clip(clip_g, tokenizer_g, text, emphasis, model.device, -2)
            clip = torch.cat([hidden_l, hidden_g], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
            if t5 is None:
                tokens = torch.zeros(T5_TOKENS, width, device=clip.device, dtype=clip.dtype)
            else:
                tokens = flow_conditioning.encode_t5(t5, tokenizer_t5, text, emphasis, T5_TOKENS, model.device)
        context = torch.cat([clip, tokens.to(clip.dtype)])
        return PromptEmbedding(context.to(model.dtype), torch.cat([pooled_l, pooled_g]).to(model.dtype))

    def added_conditioning(self, model, run, embeddings: list, n: int) -> dict:
        return {"pooled": torch.cat([e.pooled[None].expand(n, -1) for e in embeddings])}

    def call_network(self, model, sample: torch.Tensor, t, context: torch.Tensor, added: dict | None,
                     extra: Mapping[str, Any]) -> torch.Tensor:
        timestep = torch.as_tensor(t, device=sample.device, dtype=sample.dtype).expand(sample.shape[0])
        return model.unet(hidden_states=sample, timestep=timestep, encoder_hidden_states=context,
                          pooled_projections=added["pooled"], return_dict=False)[0]


FAMILY = SD3()
