"""Random-weight FLUX.1 and SD 3.5 model sets (transformer, 16-channel VAE, text encoders) written as users
download them: a transformer-only file with `ae.safetensors`, `clip_l.safetensors` and `t5xxl_fp16.safetensors`
beside it in Forge's folders, or one all-in-one file with ComfyUI's / Stability's prefixes. For tests and benches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from backend import ldm_layout, random_flux, random_text_encoders
from backend.random_models import TINY_VAE

TRANSFORMER_PREFIX = "model.diffusion_model."
ENCODER_PREFIX = "text_encoders.{role}.transformer."
T5_WIDTH_FOR_SD3 = 96
ENCODER_FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}


@dataclass
class FlowModel:
    family: str  # "flux" or "sd3"
    transformer: torch.nn.Module
    vae: torch.nn.Module
    encoders: dict[str, torch.nn.Module] = field(default_factory=dict)  # by role, in the family's order


def tiny_vae(family: str, seed: int = 0):
    """A two-level AutoencoderKL with 16 latent channels and no quant convolutions, as FLUX's and SD 3's."""
    from diffusers import AutoencoderKL

    from backend.model_detection import family_config

    config = family_config(family)["vae"]
    config.update(TINY_VAE)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(config).eval()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return vae


def build_flux(guidance: bool = True, seed: int = 0) -> FlowModel:
    """Tiny FLUX.1 dev (guidance=True) or schnell: transformer, VAE, CLIP-L and T5."""
    transformer = random_flux.build_transformer(random_flux.tiny_config(guidance), seed)
    encoders = {"clip_l": random_text_encoders.tiny_clip_l(seed + 1), "t5xxl": random_text_encoders.tiny_t5(seed + 2)}
    return FlowModel("flux", transformer, tiny_vae("flux", seed + 3), encoders)


def build_sd3(qk_norm: bool = True, dual_attention: bool = False, t5: bool = True, seed: int = 0) -> FlowModel:
    """Tiny SD 3.5 Large-like (qk_norm), SD 3.5 Medium-like (dual_attention) or SD 3 Medium-like model: CLIP-L
    (32 wide) and CLIP-G (48) with projections, and a 96-wide T5 so the joined CLIP states (80) fit its width."""
    from backend import random_sd3

    clip_l = random_text_encoders.tiny_clip_l(seed + 1, projection=True)
    clip_g = random_text_encoders.tiny_clip_g(seed + 2)
    pooled = clip_l.config.projection_dim + clip_g.config.projection_dim
    config = random_sd3.tiny_config(dual_attention=dual_attention, qk_norm=qk_norm, pooled_projection_dim=pooled,
                                    joint_attention_dim=T5_WIDTH_FOR_SD3)
    config["pos_embed_max_size"] = 48  # up to 192 px with the tiny VAE, for hires tests
    encoders = {"clip_l": clip_l, "clip_g": clip_g}
    if t5:
        encoders["t5xxl"] = random_text_encoders.tiny_t5(seed + 3, d_model=T5_WIDTH_FOR_SD3)
    return FlowModel("sd3", random_sd3.build_transformer(config, seed), tiny_vae("sd3", seed + 4), encoders)


def transformer_tensors(model: FlowModel, dtype: torch.dtype) -> dict:
    state = {key: value.detach().to(dtype) for key, value in model.transformer.state_dict().items()}
    if model.family == "flux":
        from backend import flux_layout

        layout = flux_layout.from_diffusers(state, model.transformer.config)
    else:
        from backend import sd3_layout

        layout = sd3_layout.from_diffusers(state, model.transformer.config)
    return {key: value.contiguous() for key, value in layout.items()}


def vae_tensors(vae, prefix: str = "", dtype: torch.dtype = torch.float32) -> dict:
    """The VAE in the original layout (`encoder.down.*`), as `ae.safetensors` stores it."""
    state = {key: value.detach().to(dtype) for key, value in vae.state_dict().items()}
    return {key: value.contiguous() for key, value in ldm_layout.vae_to_ldm(state, prefix).items()}


def save_separate(model: FlowModel, models_dir: Path, name: str, dtype: torch.dtype = torch.bfloat16,
                  encoder_dtype: torch.dtype = torch.float16) -> Path:
    """Forge's layout: `Stable-diffusion/<name>.safetensors` (the transformer alone), `VAE/ae.safetensors`
    (`sd3_vae.safetensors` for SD 3) and `text_encoder/<role>.safetensors`. Returns the checkpoint's path."""
    from safetensors.torch import save_file

    models_dir = Path(models_dir)
    for folder in ("Stable-diffusion", "VAE", "text_encoder"):
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
    checkpoint = models_dir / "Stable-diffusion" / f"{name}.safetensors"
    save_file(transformer_tensors(model, dtype), str(checkpoint))
    vae_name = "ae.safetensors" if model.family == "flux" else "sd3_vae.safetensors"
    save_file(vae_tensors(model.vae), str(models_dir / "VAE" / vae_name))
    for role, encoder in model.encoders.items():
        random_text_encoders.save_encoder(models_dir / "text_encoder" / ENCODER_FILES[role], encoder, encoder_dtype)
    return checkpoint


def save_all_in_one(model: FlowModel, path: Path, dtype: torch.dtype = torch.bfloat16,
                    encoder_dtype: torch.dtype = torch.float16, vae_prefix: str = "vae.") -> Path:
    """One file: the transformer under `model.diffusion_model.`, the VAE under `vae.` (ComfyUI, Forge) or
    `first_stage_model.` (Stability), each encoder under `text_encoders.<role>.transformer.`."""
    from safetensors.torch import save_file

    tensors = {TRANSFORMER_PREFIX + key: value for key, value in transformer_tensors(model, dtype).items()}
    tensors.update(vae_tensors(model.vae, vae_prefix))
    for role, encoder in model.encoders.items():
        prefix = ENCODER_PREFIX.format(role=role)
        tensors.update({prefix + key: value
                        for key, value in random_text_encoders.encoder_tensors(encoder, encoder_dtype).items()})
    path = Path(path)
    save_file(tensors, str(path))
    return path
