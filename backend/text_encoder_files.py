"""Text-encoder files for FLUX.1 and SD 3.5 (`models/text_encoder`, or inside all-in-one checkpoints):
CLIP-L, CLIP-G and T5-XXL recognised from their tensors and loaded without a random init, fp8 included.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from backend import checkpoints, fp8_storage, model_detection
from backend.model_detection import CheckpointFormatError, Shapes

logger = logging.getLogger(__name__)

ROLES = ("clip_l", "clip_g", "t5xxl")
LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
# ComfyUI's and Forge's FLUX files and Stability's SD 3.5 files all store their encoders this way.
EMBEDDED_PREFIX = "text_encoders.{role}.transformer."

_CLIP_EMBEDDING = "embeddings.token_embedding.weight"
_CLIP_PROJECTION = "text_projection.weight"
_CLIP_WIDTHS = {768: "clip_l", 1280: "clip_g"}
_T5_ATTENTION = "encoder.block.0.layer.0.SelfAttention."
_T5_BIAS = _T5_ATTENTION + "relative_attention_bias.weight"
_T5_FINAL_NORM = "encoder.final_layer_norm.weight"
_T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")
_T5_GATED = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
_T5_UNGATED = "encoder.block.0.layer.1.DenseReluDense.wi.weight"
_SCALED_FP8_MARKER, _SCALE_SUFFIXES = fp8_storage.SCALED_FP8_MARKER, fp8_storage.SCALE_SUFFIXES
# bitsandbytes' NF4/FP4 and int8 layouts, which store packed bytes plus their quantisation state.
_PACKED_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")


def _kind(role: str) -> str:
    return "t5" if role == "t5xxl" else "clip"


def _clip_base(shapes: Shapes) -> str | None:
    """`text_model.` for the layout users download, "" for the flat one transformers 5 writes."""
    for base in ("text_model.", ""):
        if base + _CLIP_EMBEDDING in shapes:
            return base
    return None


def encoder_role(shapes: Shapes, name: str = "") -> str | None:
    """"clip_l", "clip_g" or "t5xxl" for a standalone text-encoder file's tensors; None when it is not one.

    CLIP-L is 768 wide, CLIP-G 1280. A CLIP of another width (test models, unknown fine-tunes) is the one its
    file `name` names ("clip_l", "clip_g"), else CLIP-G when it carries a projection, as only CLIP-G always does.
    """
    if _T5_FINAL_NORM in shapes and _T5_BIAS in shapes:
        return "t5xxl"
    base = _clip_base(shapes)
    if base is None:
        return None
    width = shapes[base + _CLIP_EMBEDDING][1]
    if width in _CLIP_WIDTHS:
        return _CLIP_WIDTHS[width]
    named = [role for role in ("clip_l", "clip_g") if role in name.lower()]
    if len(named) == 1:
        return named[0]
    return "clip_g" if _CLIP_PROJECTION in shapes else "clip_l"


def embedded_encoders(shapes: Shapes) -> dict[str, str]:
    """{role: prefix} for the text encoders inside an all-in-one file, e.g.
    {"clip_l": "text_encoders.clip_l.transformer.", "t5xxl": "text_encoders.t5xxl.transformer."}."""
    found = {}
    for role in ROLES:
        prefix = EMBEDDED_PREFIX.format(role=role)
        inner = {key[len(prefix) :]: shape for key, shape in shapes.items() if key.startswith(prefix)}
        if not inner:
            continue
        detected = encoder_role(inner)
        if detected is not None and _kind(detected) == _kind(role):
            found[role] = prefix
        else:
            logger.warning("Ignoring %s*: its tensors are not a %s text encoder", prefix, LABELS[role])
    return found


def clip_config(shapes: Shapes, role: str, with_projection: bool | None = None) -> dict:
    """The CLIP text-encoder config (as `checkpoints.build_text_encoder` takes it) read from the tensors.

    CLIP-G, and CLIP-L when its file carries `text_projection.weight`, build `CLIPTextModelWithProjection`;
    `with_projection` overrides that (False drops the projection, True requires one).
    """
    if _kind(role) != "clip":
        raise ValueError(f"clip_config needs role 'clip_l' or 'clip_g', not {role!r}")
    base = _clip_base(shapes)
    if base is None:
        raise CheckpointFormatError(f"the {LABELS[role]} weights have no token embedding ({_CLIP_EMBEDDING})")
    template = model_detection.family_config("sdxl")["text_encoders"][0 if role == "clip_l" else 1]
    try:
        config = model_detection._clip_config(shapes, "", template)
    except KeyError as exc:
        raise CheckpointFormatError(f"the {LABELS[role]} weights are incomplete (no {exc})") from exc
    projection = shapes.get(_CLIP_PROJECTION)
    if with_projection is None:
        with_projection = role == "clip_g" or projection is not None
    config["projection_dim"] = projection[0] if projection is not None else config["hidden_size"]
    config["architectures"] = ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"]
    return config


def t5_config(shapes: Shapes):
    """A `transformers.T5Config` for a T5 encoder (T5 v1.1 as FLUX and SD 3.5 use it) read from the tensors."""
    from transformers import T5Config

    try:
        buckets, heads = shapes[_T5_BIAS]
        inner, d_model = shapes[_T5_ATTENTION + "q.weight"]
        vocab = next(shapes[key][0] for key in _T5_EMBEDDINGS if key in shapes)
        gated = _T5_GATED in shapes
        d_ff = shapes[_T5_GATED if gated else _T5_UNGATED][0]
    except (KeyError, StopIteration) as exc:
        missing = exc if isinstance(exc, KeyError) else " / ".join(_T5_EMBEDDINGS)
        raise CheckpointFormatError(f"the T5 weights are incomplete (no {missing})") from exc
    layers = model_detection._indices(shapes, re.escape("encoder.block.") + r"(\d+)\.")
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=len(layers),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        # "gated-gelu" is T5 v1.1's feed-forward: transformers runs it with gelu_new.
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
    )


def _refuse_packed(state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    packed = [k for k, v in state_dict.items() if k.endswith(_PACKED_SUFFIXES) or v.dtype in (torch.uint8, torch.int8)]
    if packed:
        raise CheckpointFormatError(
            f"{name}: its weights are packed by a quantiser Easel does not read (e.g. {packed[0]}); "
            "use the fp16 or fp8_e4m3fn version of this text encoder"
        )


def _cast(state_dict: Mapping[str, torch.Tensor], dtype, keep_fp32: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The weights in `dtype` (those ending in `keep_fp32` in float32), scaled fp8 multiplied back,
    one tensor at a time, so no full float32 copy of a large encoder is ever made."""
    cast = {}
    for key, value in state_dict.items():
        if key == _SCALED_FP8_MARKER or key.endswith(_SCALE_SUFFIXES):
            continue
        scale = state_dict.get(key.removesuffix("weight") + "scale_weight") if key.endswith(".weight") else None
        target = torch.float32 if keep_fp32 and key.endswith(keep_fp32) else dtype
        cast[key] = fp8_storage.dequantized(key, value, scale, target)
    return cast


def _check_materialised(model, what: str, name: str) -> None:
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    left = [key for key, tensor in tensors if tensor.is_meta]
    if left:
        raise CheckpointFormatError(f"{name}: {len(left)} {what} tensors were never loaded (e.g. {left[0]}); "
                                    "the file is damaged or of an architecture Easel does not know")


def _load_t5(state_dict: Mapping[str, torch.Tensor], name: str, dtype):
    from transformers import T5EncoderModel

    # 1. Config from the tensors, then an empty (meta) model: no random init.
    config = t5_config({key: tuple(value.shape) for key, value in state_dict.items()})
    model = checkpoints.empty_module(lambda: T5EncoderModel(config))
    # 2. fp16 keeps the feed-forward output (`wo`) in float32 as transformers does: T5-XXL overflows fp16 there.
    keep = tuple(f".{module}.weight" for module in model._keep_in_fp32_modules or ()) if dtype == torch.float16 else ()
    weights = _cast(state_dict, dtype, keep)
    # 3. Files store the token embedding as `shared.weight`, `encoder.embed_tokens.weight` or both: one tensor.
    embedding = next((weights[key] for key in _T5_EMBEDDINGS if key in weights), None)
    if embedding is None:
        raise CheckpointFormatError(f"{name}: the T5 weights have no token embedding ({' / '.join(_T5_EMBEDDINGS)})")
    weights.update(dict.fromkeys(_T5_EMBEDDINGS, embedding))
    expected = model.state_dict().keys()
    missing = [key for key in expected if key not in weights]
    if missing:
        raise CheckpointFormatError(f"{name}: the T5 weights are incomplete ({len(missing)} missing, e.g. {missing[0]}); "
                                    "the file is damaged or of an architecture Easel does not know")
    try:
        model.load_state_dict({key: weights[key] for key in expected}, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointFormatError(f"{name}: the T5 weights do not fit the detected architecture: {exc}") from exc
    # 4. init_empty_weights breaks the tie transformers makes: share one Parameter again.
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.eval().requires_grad_(False)


def load_encoder(state_dict: Mapping[str, torch.Tensor], role: str, name: str, dtype=torch.float32,
                 *, with_projection: bool | None = None):
    """An eval, frozen `CLIPTextModel` / `CLIPTextModelWithProjection` (clip_l, clip_g) or `T5EncoderModel`
    (t5xxl) holding the weights of `state_dict` (keys without any all-in-one prefix), cast to `dtype`.

    fp8 weights are cast, ComfyUI's scaled fp8 multiplied back; see `clip_config` for `with_projection`.
    """
    if role not in ROLES:
        raise ValueError(f"unknown text encoder role {role!r}; expected one of {', '.join(ROLES)}")
    _refuse_packed(state_dict, name)
    if role == "t5xxl":
        model = _load_t5(state_dict, name, dtype)
    else:
        config = clip_config({key: tuple(value.shape) for key, value in state_dict.items()}, role, with_projection)
        model = checkpoints.build_text_encoder(config, _cast(state_dict, dtype), name, dtype)
    _check_materialised(model, LABELS[role], name)
    return model


def _explain_not_encoder(shapes: Shapes) -> str:
    keys = list(shapes)
    family = model_detection.transformer_family(shapes)
    if family is not None:
        return f"it is a {family} model; put it in models/Stable-diffusion"
    checkpoint_prefixes = (model_detection.UNET_PREFIX, "text_encoders.", "cond_stage_model.", "conditioner.")
    if any(key.startswith(checkpoint_prefixes) for key in keys):
        return "it is a checkpoint; put it in models/Stable-diffusion"
    if any(key.startswith(("decoder.", "encoder.down", "encoder.conv_in", model_detection.VAE_PREFIX)) for key in keys):
        return "it is a VAE; put it in models/VAE"
    if any(key.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in key for key in keys):
        return "it is a LoRA; put it in models/Lora"
    return ("it has neither CLIP (text_model.embeddings.token_embedding.weight) nor T5 (encoder.block.*) weights; "
            "models/text_encoder holds clip_l, clip_g and t5xxl files")


def _checked_role(shapes: Shapes, role: str | None, name: str) -> str:
    """The file's role; a requested one wins only where the tensors cannot tell (CLIP of an unknown width)."""
    found = encoder_role(shapes)
    if found is None:
        raise CheckpointFormatError(f"{name} is not a text encoder: {_explain_not_encoder(shapes)}")
    if role is None or role == found:
        return found
    if role not in ROLES:
        raise ValueError(f"unknown text encoder role {role!r}; expected one of {', '.join(ROLES)}")
    width = shapes[_clip_base(shapes) + _CLIP_EMBEDDING][1] if _kind(found) == "clip" else None
    if _kind(role) != _kind(found) or width in _CLIP_WIDTHS:
        raise CheckpointFormatError(f"{name} is a {LABELS[found]} text encoder, not {LABELS[role]}; "
                                    f"pick it as the {LABELS[found]} encoder")
    return role


def load_encoder_file(path: Path, dtype=torch.float32, role: str | None = None,
                      *, with_projection: bool | None = None) -> tuple[str, object]:
    """(role, model) for a standalone text-encoder file (`.safetensors` or pickled); the role is detected
    from the tensors unless given. Checkpoints, VAEs and LoRAs are refused with the folder they belong in."""
    path = Path(path)
    role = _checked_role(checkpoints.read_shapes(path), role, path.name)
    model = load_encoder(checkpoints.read_state_dict(path), role, path.name, dtype, with_projection=with_projection)
    return role, model
