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


# A flow family's folder: (model_index class prefix, family, transformer class, text encoder classes in order)
_FLOW_FOLDERS = (("Flux", "flux", "FluxTransformer2DModel", ("CLIPTextModel", "T5EncoderModel")),
                 ("StableDiffusion3", "sd3", "SD3Transformer2DModel",
                  ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")))


def _pipeline_class(folder: Path) -> str:
    try:
        return str(json.loads((folder / "model_index.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def load_diffusers_folder(folder: Path, cache_dir: Path, dtype=torch.float32) -> Components:
    """Load a diffusers folder from disk only; its own tokenizer is used when it ships one."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder = Path(folder)
    if (folder / "transformer").is_dir():
        return _load_flow_folder(folder, cache_dir, dtype)
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


def _load_flow_folder(folder: Path, cache_dir: Path, dtype) -> Components:
    """A FLUX.1 (`FluxPipeline`) or SD 3.x (`StableDiffusion3Pipeline`) folder: transformer, VAE and text
    encoders from their subfolders (SD 3's T5 may be absent), tokenizers from the folder when it ships them."""
    import diffusers
    import transformers

    from backend import families

    name = _pipeline_class(folder)
    found = next((row for row in _FLOW_FOLDERS if name.startswith(row[0])), None)
    if found is None:
        raise CheckpointLoadError(f"{folder.name} holds a {name or 'diffusers'} pipeline, which Easel does not run; "
                                  "FLUX.1 and SD 3.x folders, and SD 1.x/2.x/SDXL ones, run")
    _, family, transformer_class, encoder_classes = found
    try:
        transformer = getattr(diffusers, transformer_class).from_pretrained(
            folder / "transformer", torch_dtype=dtype, local_files_only=True)
        vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, local_files_only=True)
        encoders, tokenizers = [], []
        for index, class_name in enumerate(encoder_classes):
            suffix = "" if index == 0 else f"_{index + 1}"
            if not (folder / f"text_encoder{suffix}").is_dir() and class_name == "T5EncoderModel" and family == "sd3":
                encoders.append(None)
                tokenizers.append(None)
                continue
            encoder = getattr(transformers, class_name).from_pretrained(
                folder / f"text_encoder{suffix}", torch_dtype=dtype, local_files_only=True)
            encoders.append(encoder.eval().requires_grad_(False))
            tokenizers.append(_flow_tokenizer(folder / f"tokenizer{suffix}", class_name, index, cache_dir))
    except (OSError, ValueError) as exc:
        raise CheckpointLoadError(f"could not load the diffusers folder {folder.name}: {exc}") from exc
    engine = families.get(family)
    spec = model_detection.ModelSpec(family=family, label=engine.label, unet=dict(transformer.config),
                                     vae=dict(vae.config), text_encoders=(), scheduler={},
                                     native_size=engine.native_size, prediction_type="flow")
    return Components(spec=spec, unet=transformer.eval().requires_grad_(False), vae=vae.eval().requires_grad_(False),
                      text_encoders=encoders, tokenizers=tokenizers, scheduler_config={"prediction_type": "flow"},
                      prediction_type="flow")


def _flow_tokenizer(folder: Path, encoder_class: str, index: int, cache_dir: Path):
    from backend import clip_tokenizer, t5_tokenizer

    if encoder_class == "T5EncoderModel":
        if (folder / "tokenizer.json").is_file():
            from transformers import T5TokenizerFast

            return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
        return t5_tokenizer.load_t5_tokenizer(cache_dir, allow_fetch=False)
    if (folder / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return clip_tokenizer.load_clip_tokenizer(str(cache_dir), clip_tokenizer.PAD_END_OF_TEXT if index == 0 else "!")
