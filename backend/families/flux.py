"""FLUX.1 (dev, schnell and files of the same architecture at any width and depth): a rectified-flow
transformer over 2x2 patches of 16-channel latents, conditioned on T5 v1.1 XXL's tokens and CLIP-L's pooled
vector; dev takes its "Distilled CFG Scale" as an input and shifts its schedule by the image's size."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from backend import checkpoints, flow_sampling, model_detection
from backend.conditioning import PromptEmbedding
from backend.families import flow_files
from backend.families.flow import FlowFamily
from backend.families.parts import Parts

T5_TOKENS = {True: 512, False: 256}  # dev (guidance embedding) / schnell: the length each was trained with


class Flux(FlowFamily):
    name, label, native_size = "flux", "FLUX.1", 1024
    latent_channels = 16
    default_cfg = 1.0  # real CFG off; dev's distilled guidance does the work

    def claims(self, shapes) -> bool:
        return model_detection.transformer_family(shapes) == "FLUX.1"

    def load(self, path: Path, cache_dir: Path, dtype: torch.dtype, parts: Parts) -> checkpoints.Components:
        if path.suffix.lower() == ".gguf":  # city96's quantised transformers: the parts come from the folders
            from backend import gguf_files

            transformer = gguf_files.load_gguf_transformer(path, dtype)
            transformer.keeps_its_dtype = True  # quantised weights compute in `dtype`; never cast them
            files, config = flow_files.FileParts(path, {}, False, {}), dict(transformer.config)
        else:
            from backend import flux_layout

            files, config, transformer = flow_files.read_transformer(
                path, flux_layout, "FluxTransformer2DModel", dtype, self.name in parts.fp8_families)
        wanted = f"{path.name} (a {self.label} transformer)"
        encoders = [files.text_encoder("clip_l", "CLIP-L (clip_l.safetensors)", wanted, parts, dtype,
                                       with_projection=False),  # FLUX takes CLIP's pooled output, unprojected
                    files.text_encoder("t5xxl", "T5 XXL (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors)",
                                       wanted, parts, dtype)]
        vae = files.vae(self.name, self.latent_channels, "the FLUX.1 VAE (ae.safetensors)", wanted, parts, dtype)
        spec = model_detection.ModelSpec(family=self.name, label=self.label, unet=dict(config), vae=dict(vae.config),
                                         text_encoders=(), scheduler={}, native_size=self.native_size,
                                         prediction_type="flow")
        return checkpoints.Components(spec=spec, unet=transformer, vae=vae, text_encoders=encoders,
                                      tokenizers=flow_files.tokenizers(("clip", "t5"), cache_dir, parts),
                                      scheduler_config={"prediction_type": "flow"}, prediction_type="flow")

    # -- sampling ------------------------------------------------------------------------------------
    @staticmethod
    def distilled(model) -> bool:
        """dev and its fine-tunes take a guidance input; schnell does not."""
        return bool(model.unet.config.guidance_embeds)

    def shift(self, model, run) -> flow_sampling.Shift:
        if run.shift > 0:
            return flow_sampling.Shift(run.shift)
        if not self.distilled(model):
            return flow_sampling.Shift(1.0)  # schnell: no shift
        patch = 2 * model.vae_scale_factor  # a token is 2x2 latents
        tokens = (run.height // patch) * (run.width // patch)
        return flow_sampling.Shift(flow_sampling.resolution_mu(tokens), exponential=True)

    def presets(self, model, defaults: dict) -> dict:
        steps = defaults["steps"] if self.distilled(model) else 4  # schnell is distilled to 4 steps
        return {**super().presets(model, defaults), "steps": steps}

    def infotext_parameters(self, model, run) -> dict:
        distilled = {"Distilled CFG Scale": run.distilled_cfg_scale} if self.distilled(model) else {}
        return {**distilled, **super().infotext_parameters(model, run)}

    def t5_limit(self, model) -> int:
        return T5_TOKENS[self.distilled(model)]

    # -- conditioning -------------------------------------------------------------------------------
    def encode_prompt(self, model, text: str, emphasis: str) -> PromptEmbedding:
        from backend import flow_conditioning

        clip, t5 = model.text_encoders
        clip_tokenizer, t5_tokenizer = model.tokenizers
        with model.use(clip, t5):
            _, pooled = flow_conditioning.encode_clip(clip, clip_tokenizer, text, emphasis, model.device)
            context = flow_conditioning.encode_t5(t5, t5_tokenizer, text, emphasis, self.t5_limit(model), model.device)
        return PromptEmbedding(context.to(model.dtype), pooled.to(model.dtype))

    def added_conditioning(self, model, run, embeddings: list, n: int) -> dict:
        pooled = torch.cat([e.pooled[None].expand(n, -1) for e in embeddings])
        added = {"pooled": pooled}
        if self.distilled(model):
            added["guidance"] = torch.full((pooled.shape[0],), float(run.distilled_cfg_scale), device=model.device,
                                           dtype=torch.float32)
        return added

    def call_network(self, model, sample: torch.Tensor, t, context: torch.Tensor, added: dict | None,
                     extra: Mapping[str, Any]) -> torch.Tensor:
        batch, channels, height, width = sample.shape
        # 2x2 patches of the latent as tokens, in row order, each with its (0, row, column) position
        tokens = sample.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        tokens = tokens.reshape(batch, (height // 2) * (width // 2), channels * 4)
        rows = torch.arange(height // 2, device=sample.device)[:, None].expand(-1, width // 2)
        columns = torch.arange(width // 2, device=sample.device)[None, :].expand(height // 2, -1)
        image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).to(sample.dtype)
        text_ids = torch.zeros(context.shape[1], 3, device=sample.device, dtype=sample.dtype)
        timestep = torch.as_tensor(t, device=sample.device, dtype=sample.dtype).expand(batch)
        out = model.unet(hidden_states=tokens, timestep=timestep, guidance=added.get("guidance"),
                         pooled_projections=added["pooled"], encoder_hidden_states=context, txt_ids=text_ids,
                         img_ids=image_ids, return_dict=False)[0]
        out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width)


FAMILY = Flux()
