"""Loading diffusers folders (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...) from disk only."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from backend import model_detection
from backend.checkpoints import CheckpointLoadError, Components, load_tokenizers, text_encoder_class


def _family_from_folder(folder: Path, unet_config: dict) -> str:
    """SDXL has added time conditioning; SD 1.x's OpenAI CLIP uses quick_gelu, SD 2.x's OpenCLIP gelu."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    try:
        text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointLoadError(f"{folder.name}/text_encoder/config.json is missing or unreadable: {exc}") from exc
    return "sd1" if text_config.get("hidden_act") == "quick_gelu" else "sd2"


def load_diffusers_folder(folder: Path, cache_dir: Path, dtype=torch.float32) -> Components:
    """Load a diffusers folder from disk only; its own tokenizer is used when it ships one."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder = Path(folder)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, local_files_only=True)
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointLoadError(f"could not load the diffusers folder {folder.name}: {exc}") from exc
    family = _family_from_folder(folder, dict(unet.config))
    template = model_detection.family_config(family)
    encoders, tokenizers, encoder_configs = [], [], []
    for index, config in enumerate(template["text_encoders"]):
        suffix = "" if index == 0 else f"_{index + 1}"
        cls = text_encoder_class(config)
        try:
            encoder = cls.from_pretrained(folder / f"text_encoder{suffix}", torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointLoadError(f"could not load {folder.name}/text_encoder{suffix}: {exc}") from exc
        encoders.append(encoder.eval().requires_grad_(False))
        encoder_configs.append(dict(config, **{k: v for k, v in encoder.config.to_dict().items() if k in config}))
        tokenizer_dir = folder / f"tokenizer{suffix}"
        if (tokenizer_dir / "vocab.json").is_file():
            tokenizers.append(CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
        else:
            tokenizers.extend(load_tokenizers([config], cache_dir))
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    spec = model_detection.ModelSpec(
        family=family,
        label=template["label"],
        unet=dict(unet.config),
        vae=dict(vae.config),
        text_encoders=tuple(encoder_configs),
        scheduler=scheduler_config,
        native_size=unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1),
        prediction_type=prediction_type,
    )
    return Components(
        spec=spec,
        unet=unet.eval().requires_grad_(False),
        vae=vae.eval().requires_grad_(False),
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler_config=dict(template["scheduler"], **scheduler_config),
        prediction_type=prediction_type,
    )
