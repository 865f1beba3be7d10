"""Diffusers -> original (CompVis/LDM) key layout, the single-file format users share.

The other direction (original -> diffusers) is diffusers' own `single_file_utils`. This one writes
what A1111, Forge and ComfyUI read: used to save checkpoints and to build test fixtures that are
byte-for-byte in the format users download.
"""

from __future__ import annotations

import torch

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTENTION = [
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for new, old in pairs:
        key = key.replace(f".{new}.", f".{old}.")
    return key


def unet_to_ldm(state_dict: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    per_level = layers_per_block + 1
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if key.startswith("time_embedding."):
            new = key.replace("linear_1", "0").replace("linear_2", "2").replace("time_embedding", "time_embed")
        elif key.startswith("add_embedding."):
            new = key.replace("add_embedding.linear_1", "label_emb.0.0").replace("add_embedding.linear_2", "label_emb.0.2")
        elif key.startswith("conv_in."):
            new = "input_blocks.0.0." + parts[-1]
        elif key.startswith("conv_norm_out."):
            new = "out.0." + parts[-1]
        elif key.startswith("conv_out."):
            new = "out.2." + parts[-1]
        elif key.startswith("down_blocks."):
            level, kind, index = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{per_level * (level + 1)}.0.op.{parts[-1]}"
            else:
                block = per_level * level + index + 1
                new = f"input_blocks.{block}.{0 if kind == 'resnets' else 1}.{rest}"
        elif key.startswith("up_blocks."):
            level, kind, index = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "upsamplers":
                has_attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in state_dict)
                new = f"output_blocks.{per_level * level + layers_per_block}.{2 if has_attention else 1}.{rest}"
            else:
                new = f"output_blocks.{per_level * level + index}.{0 if kind == 'resnets' else 1}.{rest}"
        elif key.startswith("mid_block."):
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{1 if kind == 'attentions' else 2 * index}.{rest}"
        else:
            raise KeyError(f"unexpected UNet key {key}")
        if ".resnets." in key or key.startswith("mid_block.resnets."):
            new = _rename("." + new, _RESNET)[1:]
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.up_blocks."))
    out = {}
    for key, value in state_dict.items():
        new = key
        parts = key.split(".")
        if key.startswith("encoder.down_blocks."):
            level, kind = parts[2], parts[3]
            if kind == "downsamplers":
                new = f"encoder.down.{level}.downsample.{'.'.join(parts[5:])}"
            else:
                new = f"encoder.down.{level}.block.{'.'.join(parts[4:])}"
        elif key.startswith("decoder.up_blocks."):
            level, kind = levels - 1 - int(parts[2]), parts[3]
            if kind == "upsamplers":
                new = f"decoder.up.{level}.upsample.{'.'.join(parts[5:])}"
            else:
                new = f"decoder.up.{level}.block.{'.'.join(parts[4:])}"
        elif ".mid_block.resnets." in key:
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif ".mid_block.attentions." in key:
            new = f"{parts[0]}.mid.attn_1.{'.'.join(parts[4:])}"
            if value.ndim == 2:  # the original stores attention projections as 1x1 convolutions
                value = value[:, :, None, None]
        new = new.replace("conv_norm_out", "norm_out")
        new = _rename("." + new + ".", _VAE_RESNET + _VAE_ATTENTION)[1:-1]
        out[prefix + new] = value
    return out


def clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel -> the HF-in-LDM layout SD 1.x and SDXL's first encoder use."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        out[f"{prefix}text_model.{key}"] = value
    return out


def open_clip_to_ldm(
    state_dict: dict[str, torch.Tensor], prefix: str, extra_layer_from: int | None = None
) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel(WithProjection) -> open_clip's layout (SD 2.x, SDXL's second encoder).

    `extra_layer_from`: SD 2.x files carry one more layer than the loader uses; copy the weights of
    this layer index into it so the written file has the real layer count.
    """
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    hidden = sd["embeddings.token_embedding.weight"].shape[1]
    out[prefix + "text_projection"] = (
        sd["text_projection.weight"].T.contiguous() if "text_projection.weight" in sd else torch.eye(hidden)
    )
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    sources = layers + ([extra_layer_from] if extra_layer_from is not None else [])
    for target, source in enumerate(sources):
        src, dst = f"encoder.layers.{source}.", f"{prefix}transformer.resblocks.{target}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[dst + f"attn.out_proj.{kind}"] = sd[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = sd[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = sd[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
    return out


def open_clip_from_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's text tower (prefix already removed) -> transformers' CLIPTextModelWithProjection keys."""
    hidden = state_dict["token_embedding.weight"].shape[1]
    out = {
        "text_model.embeddings.token_embedding.weight": state_dict["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state_dict["positional_embedding"],
        "text_model.final_layer_norm.weight": state_dict["ln_final.weight"],
        "text_model.final_layer_norm.bias": state_dict["ln_final.bias"],
    }
    if "text_projection" in state_dict:
        out["text_projection.weight"] = state_dict["text_projection"].T.contiguous()
    renames = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for key, value in state_dict.items():
        if not key.startswith("transformer.resblocks."):
            continue
        layer, rest = key.split(".")[2], ".".join(key.split(".")[3:])
        dst = f"text_model.encoder.layers.{layer}."
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]
            for name, chunk in zip(("q", "k", "v"), value.split(hidden, dim=0)):
                out[dst + f"self_attn.{name}_proj.{kind}"] = chunk
            continue
        module, _, kind = rest.rpartition(".")
        out[dst + f"{renames[module]}.{kind}"] = value
    return out
