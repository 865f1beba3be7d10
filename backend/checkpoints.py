"""Read checkpoint files safely and build the diffusers/transformers modules they describe.

Single-file `.safetensors` / `.ckpt` in the original layout, fully offline:
configs come from `model_detection` and the shipped family configs, tokenizers from `clip_tokenizer`.
"""

from __future__ import annotations

import logging
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backend import clip_tokenizer, ldm_layout, model_detection
from backend.errors import ModelFileError
from backend.model_detection import CheckpointFormatError, ModelSpec

logger = logging.getLogger(__name__)


class CheckpointLoadError(ModelFileError):
    """A checkpoint could not be loaded; the message names the file and the fix."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A pickled checkpoint refused because unpickling it would import or run code."""


# What a malformed pickle makes torch's weights-only unpickler raise besides UnpicklingError
# (an empty stack, a missing memo entry, an allow-listed function called with wrong arguments).
_MALFORMED_PICKLE_ERRORS = (LookupError, TypeError, AttributeError, AssertionError, ArithmeticError, struct.error)
# Lines of torch's refusal that are advice for Python programmers, not the reason.
_TORCH_ADVICE = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the documentation")


class _LightningCheckpointCallback:
    """Stands in for `pytorch_lightning`'s ModelCheckpoint, pickled inside many original .ckpt files.

    Allow-listing it by name lets weights-only unpickling read those files without importing
    (or running) anything from pytorch_lightning.
    """

    def __setstate__(self, state: Any) -> None:
        self.state = state


_SAFE_GLOBALS = [
    (_LightningCheckpointCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _numpy_safe_globals() -> list:
    """numpy scalars and small arrays (epochs, scores) that training code pickled beside the weights.

    Files written with numpy 1.x name `numpy.core.multiarray`, numpy 2 renamed it `numpy._core`;
    both names are allow-listed for the same functions.
    """
    import numpy as np
    from numpy._core import multiarray

    found: list = [np.dtype, np.ndarray]
    found.extend(type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool"))
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found.append((multiarray.scalar, f"{module}.scalar"))
        found.append((multiarray._reconstruct, f"{module}._reconstruct"))
    return found


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that says what it refused ("Unsupported global: GLOBAL
    print was not an allowed global by default"), without its advice and terminal colour codes."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_TORCH_ADVICE)] or lines or ["no reason given"]
    reason = reasons[-1].removeprefix("WeightsUnpickler error:").strip()
    return reason.split(" Please use", 1)[0].rstrip(".")[:200]


def _load_pickled(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS + _numpy_safe_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refused to load {path.name}: it holds code, or pickle instructions, that safe loading will not run "
            f"({_refusal_reason(exc)}). Only load such a file if you trust its source, and then "
            "convert it to .safetensors; a .safetensors version of the same model is usually published."
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointLoadError(
            f"could not read {path.name}: the file is truncated or corrupt ({exc}); download it again"
        ) from exc
    except _MALFORMED_PICKLE_ERRORS as exc:
        raise CheckpointLoadError(
            f"could not read {path.name}: its pickle is malformed ({type(exc).__name__}: {str(exc)[:200]}); "
            "the file is damaged or not a checkpoint; download it again, or get a .safetensors version"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)} if isinstance(data, dict) else {}
        if not tensors:
            raise CheckpointFormatError(f"{path.name} holds no tensors; it is not a model file")
        data = tensors
    return data


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` or pickled (`.ckpt`, `.pt`, `.pth`, `.bin`) file, on the CPU."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointLoadError(
                f"could not read {path.name}: the file is truncated or corrupt ({exc}); download it again"
            ) from exc
    return _load_pickled(path)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a file; for safetensors only the header is read."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointLoadError(f"could not read {path.name}: the file is truncated or corrupt ({exc})") from exc
    return {key: tuple(value.shape) for key, value in read_state_dict(path).items()}


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (empty for other formats)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return dict(handle.metadata() or {})


def modelspec(metadata: dict[str, str]) -> tuple[str | None, int | None]:
    """(prediction type, native size) from Stability's ModelSpec keys, when the file carries them."""
    prediction = {"v": "v_prediction", "epsilon": "epsilon"}.get(metadata.get("modelspec.prediction_type", ""))
    size = None
    resolution = metadata.get("modelspec.resolution", "")
    if "x" in resolution:
        try:
            size = max(int(v) for v in resolution.split("x"))
        except ValueError:
            size = None
    return prediction, size


@dataclass
class Components:
    """The modules of one Stable Diffusion model, before they are placed on a device."""

    spec: ModelSpec
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    prediction_type: str
    native_size: int | None = None  # from the file's metadata; None: the family's


def empty_module(factory):
    """Build a module without allocating (or randomly initialising) its weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def adopt(model, state_dict: dict[str, torch.Tensor], what: str, name: str, dtype, keep=None):
    """Give an empty module the checkpoint's tensors in `dtype` (those `keep(key, tensor)` accepts as they are),
    refusing incomplete or mismatched weights."""
    expected = model.state_dict().keys()
    state_dict = {k: v if keep is not None and keep(k, v) else v.to(dtype)
                  for k, v in state_dict.items() if k in expected}
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise CheckpointFormatError(
            f"{name}: the {what} weights are incomplete ({len(missing)} missing, e.g. {missing[0]}); "
            "the file is damaged or of an architecture Easel does not know"
        )
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointFormatError(f"{name}: the {what} weights do not fit the detected architecture: {exc}") from exc
    return model.eval().requires_grad_(False)


def text_encoder_class(config: dict):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if config["architectures"][0] == "CLIPTextModelWithProjection" else CLIPTextModel


def text_config(config: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("pad_token", "model_type")})


def _fit_text_keys(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 flattened CLIPTextModel (no `text_model.` prefix); the projection model kept it."""
    wrapped = hasattr(model, "text_model")
    fitted = {}
    for key, value in state_dict.items():
        bare = key.removeprefix("text_model.")
        if bare.startswith("text_projection") or bare.startswith("logit_scale"):
            fitted[bare] = value
        else:
            fitted[("text_model." if wrapped else "") + bare] = value
    return fitted


def build_text_encoder(config: dict, state_dict: dict[str, torch.Tensor], name: str, dtype):
    cls = text_encoder_class(config)
    model = empty_module(lambda: cls(text_config(config)))
    return adopt(model, _fit_text_keys(model, state_dict), "text encoder", name, dtype)


def build_vae(config: dict, state_dict: dict[str, torch.Tensor], name: str, dtype):
    """An AutoencoderKL from original-layout (`encoder.down.*`) or diffusers-layout weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if not any(".down_blocks." in k for k in state_dict):
        state_dict = convert_ldm_vae_checkpoint(state_dict, config)
    return adopt(empty_module(lambda: AutoencoderKL.from_config(config)), state_dict, "VAE", name, dtype)


def build_unet(config: dict, checkpoint: dict[str, torch.Tensor], name: str, dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state_dict = convert_ldm_unet_checkpoint(checkpoint, config)
    return adopt(empty_module(lambda: UNet2DConditionModel.from_config(config)), state_dict, "UNet", name, dtype)


def _text_encoder_weights(spec: ModelSpec, checkpoint: dict[str, torch.Tensor]) -> list[dict]:
    def strip(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}

    def open_clip(prefix: str, drop_layer: int | None) -> dict:
        sd = ldm_layout.open_clip_from_ldm(strip(prefix))
        if drop_layer is not None:
            sd = {k: v for k, v in sd.items() if not k.startswith(f"encoder.layers.{drop_layer}.")}
        return sd

    if spec.family == "sd1":
        return [strip(model_detection.SD1_CLIP_PREFIX)]
    if spec.family == "sd2":
        return [open_clip(model_detection.SD2_OPENCLIP_PREFIX, spec.text_encoders[0]["num_hidden_layers"])]
    return [
        strip(model_detection.SDXL_CLIP_PREFIX),
        open_clip(model_detection.SDXL_OPENCLIP_PREFIX, None),
    ]


def load_tokenizers(spec_encoders, cache_dir: Path) -> list:
    return [
        clip_tokenizer.load_clip_tokenizer(str(cache_dir), config.get("pad_token", clip_tokenizer.PAD_END_OF_TEXT))
        for config in spec_encoders
    ]


def _sidecar_prediction_type(path: Path) -> str | None:
    """A1111 reads `<checkpoint>.yaml` beside the file; its `parameterization: "v"` marks v-prediction."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    import yaml

    try:
        text = yaml.safe_load(sidecar.read_text(encoding="utf-8"))
        params = text["model"]["params"]
    except (yaml.YAMLError, KeyError, TypeError, OSError):
        logger.warning("Ignoring %s: not an LDM model config", sidecar)
        return None
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


@torch.no_grad()
def probe_v_prediction(unet) -> bool:
    """Whether an SD 2.x UNet predicts v: at t=999 an epsilon model returns roughly its input,
    a v model roughly its negation (the test A1111 uses)."""
    param = next(unet.parameters())
    channels = unet.config.in_channels
    x = torch.full((1, channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=context).sample
    return (out.float() - x[:, : out.shape[1]].float()).mean().item() < -1


def load_single_file(path: Path, cache_dir: Path, dtype=torch.float32) -> Components:
    """Load an original-layout checkpoint (`.safetensors` or `.ckpt`), detecting its family from the tensors."""
    path = Path(path)
    checkpoint = read_state_dict(path)
    try:
        spec = model_detection.detect({k: tuple(v.shape) for k, v in checkpoint.items()})
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{path.name}: {exc}") from exc
    except KeyError as exc:
        raise CheckpointFormatError(f"{path.name}: the weights are incomplete (no {exc}); download it again") from exc
    unet = build_unet(spec.unet, checkpoint, path.name, dtype)
    vae = build_vae(spec.vae, checkpoint, path.name, dtype)
    encoders = [
        build_text_encoder(config, weights, path.name, dtype)
        for config, weights in zip(spec.text_encoders, _text_encoder_weights(spec, checkpoint))
    ]
    del checkpoint
    spec_prediction, native_size = modelspec(read_metadata(path))
    prediction_type = _sidecar_prediction_type(path) or spec_prediction or spec.prediction_type
    if prediction_type is None:
        prediction_type = "v_prediction" if probe_v_prediction(unet) else "epsilon"
    scheduler_config = dict(spec.scheduler, prediction_type=prediction_type)
    return Components(
        spec=spec,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=load_tokenizers(spec.text_encoders, cache_dir),
        scheduler_config=scheduler_config,
        prediction_type=prediction_type,
        native_size=native_size,
    )


def load_vae_file(path: Path, family: str, dtype=torch.float32):
    """A standalone VAE (`models/VAE`): original layout, diffusers layout, or a full checkpoint's VAE part."""
    path = Path(path)
    state_dict = read_state_dict(path)
    if any(k.startswith(model_detection.VAE_PREFIX) for k in state_dict):
        prefix = model_detection.VAE_PREFIX
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not any(k.startswith(("encoder.", "decoder.")) for k in state_dict):
        raise CheckpointFormatError(f"{path.name} is not a VAE: it has no encoder/decoder weights")
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    if any(".down_blocks." in k for k in state_dict):
        config = dict(model_detection.family_config(family)["vae"])
    else:
        try:
            config = model_detection.vae_config_from_shapes(shapes, family)
        except KeyError as exc:
            raise CheckpointFormatError(f"{path.name}: the VAE weights are incomplete (no {exc})") from exc
    return build_vae(config, state_dict, path.name, dtype)

