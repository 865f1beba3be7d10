"""SDXL: CLIP ViT-L and OpenCLIP bigG side by side, pooled text and size/crop micro-conditioning, 1024 px."""

from __future__ import annotations

import torch

from backend.families.unet import UNetFamily


class SDXL(UNetFamily):
    name, label, native_size = "sdxl", "SDXL", 1024
    preview_factors = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
                       (-0.3730, -0.2499, -0.2088))

    def added_conditioning(self, model, run, embeddings: list, n: int) -> dict:
        # Original size, crop offset, target size; and the pooled text of the second encoder.
        time_ids = torch.tensor([[run.height, run.width, 0, 0, run.height, run.width]], device=model.device)
        pooled = torch.cat([e.pooled[None].expand(n, -1) for e in embeddings])
        return {"text_embeds": pooled, "time_ids": time_ids.to(model.dtype).expand(pooled.shape[0], -1)}

    def clip_output(self, encoder, out, clip_skip: int):
        # Both encoders' penultimate layer (clip skip 1), without the final norm; pooled from the second.
        pooled = out.text_embeds[0] if hasattr(out, "text_embeds") else None
        return out.hidden_states[-(clip_skip + 1)], pooled

    def text_encoder_prefixes(self) -> list[tuple[str, str]]:
        return [("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2.")]

    def vae_dtype(self, requested: torch.dtype) -> torch.dtype:
        # SDXL's original VAE overflows in fp16; it runs in fp32 (other VAEs fall back to fp32 on NaN).
        return torch.float32 if requested == torch.float16 else requested


FAMILY = SDXL()
