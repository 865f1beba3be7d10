"""Recognise a Stable Diffusion checkpoint from its tensors (keys and shapes) and derive its configs.

Works on a `{key: shape}` mapping, so a file can be identified from its header alone. The family's
shipped config (`backend/configs/<family>.json`) supplies what weights cannot tell (attention head
counts, VAE scaling factor, scheduler); every size the weights do tell is read from them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from backend.errors import ModelFileError

Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

CONFIG_DIR = Path(__file__).parent / "configs"
FAMILIES = ("sd1", "sd2", "sdxl")


class CheckpointFormatError(ModelFileError, ValueError):
    """The file is readable but is not a Stable Diffusion checkpoint Easel can load."""


@dataclass(frozen=True)
class ModelSpec:
    family: str
    label: str
    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]
    scheduler: dict
    native_size: int
    # None when the weights alone cannot tell (SD 2.x): the loader probes the UNet.
    prediction_type: str | None

    @property
    def is_inpainting(self) -> bool:
        return self.unet["in_channels"] == 9


@cache
def _family_config(family: str) -> dict:
    return json.loads((CONFIG_DIR / f"{family}.json").read_text())


def family_config(family: str) -> dict:
    """A fresh copy of the shipped config of one family."""
    return copy.deepcopy(_family_config(family))


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes if (m := regex.match(key))})


def _explain_non_checkpoint(shapes: Shapes) -> str:
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k for k in keys):
        return "it is a LoRA; put it in models/Lora and use <lora:name:1> in the prompt"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) and not any(k.startswith(UNET_PREFIX) for k in keys):
        return "it is a VAE; put it in models/VAE and pick it in the VAE setting"
    if "emb_params" in keys or "string_to_param.*" in keys or "clip_l" in keys:
        return "it is a textual inversion embedding; put it in models/embeddings"
    return "it has no Stable Diffusion UNet weights (keys starting with 'model.diffusion_model.')"


# The diffusion transformers that followed SDXL, by their blocks' names (with or without ComfyUI's, Forge's
# and Stability's `model.diffusion_model.` prefix): shapes cannot tell a small one from an SD UNet.
# In order: diffusers' FLUX transformer has SD3's `transformer_blocks` too, beside its single blocks.
_TRANSFORMER_FAMILIES = (("double_blocks.", "FLUX.1"), ("single_transformer_blocks.", "FLUX.1"),
                         ("joint_blocks.", "Stable Diffusion 3"), ("transformer_blocks.0.attn.add_k_proj.",
                                                                   "Stable Diffusion 3"))


def transformer_family(shapes: Shapes) -> str | None:
    """"FLUX.1" or "Stable Diffusion 3" (SD 3 and 3.5) when the file holds that model's transformer, else None."""
    bare = [key.removeprefix(UNET_PREFIX).removeprefix("diffusion_model.") for key in shapes]
    for start, name in _TRANSFORMER_FAMILIES:
        if any(key.startswith(start) for key in bare):
            return name
    return None


def detect_family(shapes: Shapes) -> str:
    """'sd1', 'sd2' or 'sdxl', from which text encoders the file carries and the UNet's context size."""
    keys = shapes.keys()
    transformer = transformer_family(shapes)
    if transformer is not None:
        raise CheckpointFormatError(f"it is a {transformer} model, not an SD 1.x, SD 2.x or SDXL checkpoint")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointFormatError(f"not a Stable Diffusion checkpoint: {_explain_non_checkpoint(shapes)}")
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has(SDXL_OPENCLIP_PREFIX) and has(SDXL_CLIP_PREFIX):
        return "sdxl"
    if has(SDXL_REFINER_OPENCLIP_PREFIX):
        raise CheckpointFormatError("this is an SDXL refiner, which Easel does not run yet; use an SDXL base model")
    if has(SD2_OPENCLIP_PREFIX):
        return "sd2"
    if has(SD1_CLIP_PREFIX):
        return "sd1"
    context = [s[1] for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    hint = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(context[0] if context else 0)
    found = f" (its UNet looks like {hint})" if hint else ""
    raise CheckpointFormatError(f"the checkpoint has a UNet but no text encoder{found}; it cannot be used alone")


def _unet_config(shapes: Shapes, template: dict) -> dict:
    p = UNET_PREFIX
    config = dict(template)
    conv_in = shapes[p + "input_blocks.0.0.weight"]
    config["in_channels"] = conv_in[1]
    config["out_channels"] = shapes[p + "out.2.weight"][0]

    downsamples = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
    layers = downsamples[0] - 1 if downsamples else max(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\."))
    levels = len(downsamples) + 1
    channels, down_types, depths = [], [], []
    for level in range(levels):
        first = (layers + 1) * level + 1
        channels.append(shapes[f"{p}input_blocks.{first}.0.out_layers.3.weight"][0])
        blocks = _indices(shapes, re.escape(f"{p}input_blocks.{first}.1.transformer_blocks.") + r"(\d+)\.")
        down_types.append("CrossAttnDownBlock2D" if blocks else "DownBlock2D")
        depths.append(len(blocks) or 1)
    up_types = []
    for level in range(levels):
        first = (layers + 1) * level
        has_attention = f"{p}output_blocks.{first}.1.proj_in.weight" in shapes
        up_types.append("CrossAttnUpBlock2D" if has_attention else "UpBlock2D")

    config.update(
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=down_types,
        up_block_types=up_types,
    )
    attention_keys = [k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight")]
    config["cross_attention_dim"] = shapes[attention_keys[0]][1]
    proj_in = [k for k in shapes if k.startswith(p) and k.endswith(".proj_in.weight")]
    config["use_linear_projection"] = len(shapes[proj_in[0]]) == 2
    if "transformer_layers_per_block" in template or any(d > 1 for d in depths):
        config["transformer_layers_per_block"] = depths
    if isinstance(template["attention_head_dim"], list):
        # SD 2.x and SDXL use 64-channel heads; tiny test models get at least one head.
        config["attention_head_dim"] = [max(1, c // 64) for c in channels]
    if p + "label_emb.0.0.weight" in shapes:
        config["projection_class_embeddings_input_dim"] = shapes[p + "label_emb.0.0.weight"][1]
    return config


def _vae_config(shapes: Shapes, prefix: str, template: dict) -> dict:
    config = dict(template)
    levels = _indices(shapes, re.escape(prefix + "encoder.down.") + r"(\d+)\.")
    layers = _indices(shapes, re.escape(prefix + "encoder.down.0.block.") + r"(\d+)\.")
    channels = [shapes[f"{prefix}encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    config.update(
        block_out_channels=channels,
        layers_per_block=len(layers),
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        latent_channels=shapes[prefix + "decoder.conv_in.weight"][1],
        in_channels=shapes[prefix + "encoder.conv_in.weight"][1],
        out_channels=shapes[prefix + "decoder.conv_out.weight"][0],
        use_quant_conv=prefix + "quant_conv.weight" in shapes,
        use_post_quant_conv=prefix + "post_quant_conv.weight" in shapes,
    )
    return config


def vae_config_from_shapes(shapes: Shapes, family: str = "sd1") -> dict:
    """Config of a standalone VAE file in the original layout (keys `encoder.*`, `decoder.*`)."""
    return _vae_config(shapes, "", family_config(family)["vae"])


def _clip_config(shapes: Shapes, prefix: str, template: dict) -> dict:
    base = prefix + ("text_model." if prefix + "text_model.embeddings.token_embedding.weight" in shapes else "")
    vocab, hidden = shapes[base + "embeddings.token_embedding.weight"]
    layers = _indices(shapes, re.escape(base + "encoder.layers.") + r"(\d+)\.")
    return dict(
        template,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=shapes[base + "encoder.layers.0.mlp.fc1.weight"][0],
        max_position_embeddings=shapes[base + "embeddings.position_embedding.weight"][0],
    )


def _open_clip_config(shapes: Shapes, prefix: str, template: dict, drop_last_layer: bool) -> dict:
    vocab, hidden = shapes[prefix + "token_embedding.weight"]
    layers = len(_indices(shapes, re.escape(prefix + "transformer.resblocks.") + r"(\d+)\."))
    projection = shapes.get(prefix + "text_projection")
    return dict(
        template,
        vocab_size=vocab,
        hidden_size=hidden,
        # SD 2.x conditions on the penultimate layer: the last one is never used, so it is not loaded.
        num_hidden_layers=layers - 1 if drop_last_layer else layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        max_position_embeddings=shapes[prefix + "positional_embedding"][0],
        projection_dim=projection[1] if projection else template["projection_dim"],
    )


def detect(shapes: Shapes) -> ModelSpec:
    """Identify the family and derive every component's config from a checkpoint's tensor shapes."""
    family = detect_family(shapes)
    template = family_config(family)
    unet = _unet_config(shapes, template["unet"])
    if unet["in_channels"] not in (4, 9):
        kind = "an instruct-pix2pix model" if unet["in_channels"] == 8 else f"a {unet['in_channels']}-channel UNet"
        raise CheckpointFormatError(f"{kind} is not supported yet; use a standard or an inpainting checkpoint")
    if not any(k.startswith(VAE_PREFIX) for k in shapes):
        raise CheckpointFormatError("the checkpoint has no VAE weights (first_stage_model.*); it cannot be used alone")
    vae = _vae_config(shapes, VAE_PREFIX, template["vae"])
    if family == "sd1":
        encoders = (_clip_config(shapes, SD1_CLIP_PREFIX, template["text_encoders"][0]),)
    elif family == "sd2":
        encoders = (_open_clip_config(shapes, SD2_OPENCLIP_PREFIX, template["text_encoders"][0], True),)
    else:
        encoders = (
            _clip_config(shapes, SDXL_CLIP_PREFIX, template["text_encoders"][0]),
            _open_clip_config(shapes, SDXL_OPENCLIP_PREFIX, template["text_encoders"][1], False),
        )
    if family == "sdxl":
        # The added conditioning is [pooled text, 6 Fourier-embedded size/crop numbers].
        pooled = encoders[1]["projection_dim"]
        unet["addition_time_embed_dim"] = (unet["projection_class_embeddings_input_dim"] - pooled) // 6
    scheduler = template["scheduler"]
    prediction_type = "epsilon"
    if "v_pred" in shapes:  # marker tensors written by v-prediction SDXL fine-tunes
        prediction_type = "v_prediction"
        scheduler["rescale_betas_zero_snr"] = "ztsnr" in shapes
    elif family == "sd2":
        prediction_type = None
    return ModelSpec(
        family=family,
        label=template["label"],
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        scheduler=scheduler,
        native_size=template["native_size"],
        prediction_type=prediction_type,
    )
