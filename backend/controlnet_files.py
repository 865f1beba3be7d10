"""ControlNet files read offline: the files users have (lllyasviel's originals, diffusers folders and files,
union models, TencentARC's T2I-Adapters, which share the folder as in sd-webui-controlnet) detected and loaded
into a diffusers `ControlNetModel` / `ControlNetUnionModel` / `T2IAdapter`. Formats are told apart by tensors,
never file names. (Listing and titling them: `controlnet_library`; reading adapters: `adapter_files`.)

- `inspect(path) -> ControlNetInfo`: family ("sd1"/"sd2"/"sdxl"), layout ("lllyasviel"/"tencentarc"/
  "diffusers"), kind ("controlnet"/"union"/"t2i_adapter"), stored dtype, config; a .safetensors header suffices.
- `load_controlnet(path, family, dtype, device, unet_config=None)`: refuses a model for another base
  (`ControlNetBaseError`, an InputError); `unet_config`, the base UNet's config, gives what weights cannot
  tell (attention heads, SDXL's size-embedding width). Damaged or foreign files raise
  `ControlNetFileError` (a ModelFileError) naming the file.
"""

from __future__ import annotations

import inspect as signature_inspect
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backend import adapter_files
from backend.checkpoints import read_state_dict
from backend.errors import InputError, ModelFileError, NotFoundError
from backend.model_detection import FAMILIES, family_config

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


class ControlNetFileError(ModelFileError):
    """A ControlNet file that is damaged, or is something else (a Control-LoRA, an IP-Adapter, a LoRA)."""


class ControlNetBaseError(InputError):
    """A ControlNet or T2I-Adapter made for another base model than the loaded checkpoint."""


class ControlNetNotFoundError(NotFoundError):
    pass


@dataclass(frozen=True)
class ControlNetInfo:
    path: Path
    family: str  # "sd1", "sd2" or "sdxl", as `model_detection` names checkpoint families
    layout: str  # "lllyasviel", "tencentarc" (T2I-Adapters) or "diffusers"
    kind: str  # "controlnet", "union" or "t2i_adapter"
    dtype: str  # of the stored weights: "float16", "float32", "bfloat16"
    config: dict = field(repr=False)  # the diffusers config fields the tensors tell


# -- reading -------------------------------------------------------------------------------------------
def _weights_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).is_file():
            return path / name
    sharded = any(path.glob("diffusion_pytorch_model*.index.json"))
    raise ControlNetFileError(f"{path.name} is a folder without " + ("single-file weights (Easel does not read sharded "
                              "ones)" if sharded else f"ControlNet weights ({DIFFUSERS_WEIGHTS[0]})"))


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], str]:
    """Shapes and the most common dtype of a .safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
            dtypes = Counter(s.get_dtype() for s in slices.values())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ControlNetFileError(f"could not read {path.name}: the file is truncated or damaged ({exc}); "
                                  "download it again") from None
    if not shapes:
        raise ControlNetFileError(f"{path.name} holds no tensors; it is not a ControlNet")
    stored = dtypes.most_common(1)[0][0]
    return shapes, _SAFETENSORS_DTYPES.get(stored, stored.lower())


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(path)
    except ModelFileError as exc:  # the checkpoint reader's message names the file and the fix
        raise ControlNetFileError(str(exc)) from None


def _dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    return Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values()).most_common(1)[0][0]


# What else people put in models/ControlNet, by a key it carries, and where it belongs.
_FOREIGN = (
    (lambda k: k == "lora_controlnet", "a Control-LoRA, which Easel does not load; use a full ControlNet instead"),
    (lambda k: "lllite" in k, "a kohya ControlNet-LLLite, which Easel does not load"),
    (lambda k: k.startswith(("image_proj.", "ip_adapter.")), "an IP-Adapter, which Easel does not load"),
    (lambda k: ".motion_modules." in k, "an AnimateDiff SparseCtrl model, which Easel does not load"),
    (lambda k: k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k,
     "a LoRA; put it in models/Lora and use <lora:name:1> in the prompt"),
    (lambda k: k.startswith("model.diffusion_model."), "a Stable Diffusion checkpoint; put it in models/Stable-diffusion"),
)


def _explain_foreign(keys: Sequence[str]) -> str:
    what = next((text for test, text in _FOREIGN if any(test(k) for k in keys)), None)
    return f"it is {what}" if what else "it has no ControlNet weights (input_hint_block or controlnet_cond_embedding)"


def _indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})


def _to_diffusers_layout(weights: Mapping, name: str) -> tuple[str, dict]:
    """('lllyasviel' or 'diffusers', the weights under diffusers' names); values are tensors or shapes."""
    if "controlnet_cond_embedding.conv_in.weight" in weights:
        return "diffusers", dict(weights)
    if any(k.startswith("control_model.") for k in weights):  # 1.0 files also carry the whole SD model
        weights = {k.removeprefix("control_model."): v for k, v in weights.items() if k.startswith("control_model.")}
    keys = list(weights)
    if "input_hint_block.0.weight" not in weights or "lora_controlnet" in weights:
        raise ControlNetFileError(f"{name} is not a ControlNet Easel can load: {_explain_foreign(keys)}")
    if "difference" in weights:
        raise ControlNetFileError(f"{name} is an early 'difference' ControlNet that needs its base model added; "
                                  "use the ControlNet 1.1 release of the same type")
    if "task_embedding" in weights:
        raise ControlNetFileError(f"{name} is a union ControlNet in the original layout; use its diffusers "
                                  "release (config.json + diffusion_pytorch_model.safetensors)")
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    downsamples = _indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight")
    layers = downsamples[0] - 1 if downsamples else max(_indices(keys, r"input_blocks\.(\d+)\.")) or 1
    converted = convert_controlnet_checkpoint(weights, {"layers_per_block": layers})
    converted = {k: v for k, v in converted.items() if not k.startswith("controlnet_cond_embedding.")}
    converted.update(_hint_encoder(weights))
    for part, ldm in (("linear_1", "0"), ("linear_2", "2")):  # SDXL's size embedding, not mapped by diffusers
        for kind in ("weight", "bias"):
            if f"label_emb.0.{ldm}.{kind}" in weights:
                converted[f"add_embedding.{part}.{kind}"] = weights[f"label_emb.0.{ldm}.{kind}"]
    missing = [k for k, v in converted.items() if v is None]
    if missing:
        raise ControlNetFileError(f"{name}: the ControlNet weights are incomplete (no weights for {missing[0]}); "
                                  "the file is damaged: download it again")
    return "lllyasviel", converted


def _hint_encoder(weights: Mapping) -> dict:
    """`input_hint_block`'s convolutions (every other index of one Sequential, SiLUs between) under diffusers'
    names: the first is `conv_in`, the last `conv_out`, those between `blocks.N`. Counted, not assumed: a
    ControlNet for a VAE that downsamples 4x has two fewer convolutions than the 8x ones diffusers maps."""
    indices = _indices(weights, r"input_hint_block\.(\d+)\.weight")
    names = ["conv_in"] + [f"blocks.{i}" for i in range(len(indices) - 2)] + ["conv_out"]
    return {f"controlnet_cond_embedding.{name}.{kind}": weights[f"input_hint_block.{index}.{kind}"]
            for name, index in zip(names, indices) for kind in ("weight", "bias")}


# -- configs -------------------------------------------------------------------------------------------
def _derive_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The diffusers config fields that diffusers-layout tensor shapes tell."""
    keys = list(shapes)
    levels = _indices(keys, r"down_blocks\.(\d+)\.")
    mid_depth = len(_indices(keys, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))
    channels, types, depths = [], [], []
    for level in levels:
        channels.append(shapes[f"down_blocks.{level}.resnets.0.conv2.weight"][0])
        attention = f"down_blocks.{level}.attentions.0.proj_in.weight" in shapes
        types.append("CrossAttnDownBlock2D" if attention else "DownBlock2D")
        pattern = rf"down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d+)\."
        # diffusers takes the middle block's depth from the last entry (unused by a level without attention)
        depths.append(len(_indices(keys, pattern)) if attention else mid_depth if level == levels[-1] else 1)
    embedding = _indices(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    config = dict(
        in_channels=shapes["conv_in.weight"][1],
        conditioning_channels=shapes["controlnet_cond_embedding.conv_in.weight"][1],
        conditioning_embedding_out_channels=[shapes["controlnet_cond_embedding.conv_in.weight"][0]]
        + [shapes[f"controlnet_cond_embedding.blocks.{i}.weight"][0] for i in embedding[1::2]],
        block_out_channels=channels,
        layers_per_block=len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")),
        down_block_types=types,
        transformer_layers_per_block=depths,
    )
    context = [s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")]
    if context:
        config["cross_attention_dim"] = context[0]
    projections = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    if projections:
        config["use_linear_projection"] = len(projections[0]) == 2
    if "add_embedding.linear_1.weight" in shapes:
        config.update(addition_embed_type="text_time",
                      projection_class_embeddings_input_dim=shapes["add_embedding.linear_1.weight"][1])
    if "task_embedding" in shapes:  # a union ControlNet: its task transformer's sizes
        types_count, width = shapes["task_embedding"]
        config.update(num_control_type=types_count, num_trans_channel=width,
                      num_trans_layer=len(_indices(keys, r"transformer_layes\.(\d+)\.")),
                      num_proj_channel=shapes["spatial_ch_projs.weight"][0],
                      addition_time_embed_dim=shapes["control_add_embedding.linear_1.weight"][1] // types_count)
    return config


_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _family(config: Mapping) -> str:
    """SDXL has the size embedding; SD 1.x and 2.x differ by context width (768 vs 1024) and, where the
    width is not a released one (small test models), by SD 2's linear attention projections."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    known = _CONTEXT_FAMILY.get(config.get("cross_attention_dim"))
    if known:
        return known
    return "sd2" if config.get("use_linear_projection") else "sd1"


def _global_pooling(path: Path) -> bool:
    """lllyasviel's shuffle model pools its residuals. Weights cannot tell: read the `.yaml` beside the
    file as A1111 does, else follow sd-webui-controlnet, which looks for "shuffle" in the name."""
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():
        import yaml

        try:
            params = yaml.safe_load(sidecar.read_text(encoding="utf-8"))["model"]["params"]
            return bool(params["control_stage_config"]["params"].get("global_average_pooling", False))
        except (yaml.YAMLError, KeyError, TypeError, OSError):
            logger.warning("Ignoring %s: not a ControlNet model config", sidecar)
    return "shuffle" in path.stem.lower()


def _model_class(kind: str):
    from diffusers import ControlNetModel, ControlNetUnionModel, T2IAdapter

    return {"union": ControlNetUnionModel, "t2i_adapter": T2IAdapter}.get(kind, ControlNetModel)


def _full_config(derived: dict, family: str, kind: str, unet_config: Mapping | None) -> dict:
    """The derived fields over the base UNet's config (else the family's): a ControlNet is a trained copy
    of its base UNet's encoder, so attention heads and the size-embedding width are the base's."""
    base = dict(unet_config) if unet_config else family_config(family)["unet"]
    if not unet_config:  # the families' conventions: SD 1.x has 8 heads, SD 2.x and SDXL 64-channel heads
        heads = base.get("attention_head_dim", 8)
        base["attention_head_dim"] = [max(1, c // 64) for c in derived["block_out_channels"]] \
            if isinstance(heads, list) else heads
        base["num_attention_heads"] = None
    config = {**base, **derived}
    accepted = signature_inspect.signature(_model_class(kind).__init__).parameters
    return {k: v for k, v in config.items() if k in accepted}


def sidecar_config(weights: Path, what: str = "ControlNet") -> dict | None:
    """The `config.json` beside a weights file (a diffusers or transformers folder), None when there is none
    or it does not read (then the config comes from the weights, as the warning says)."""
    config_file = weights.parent / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring %s (%s); reading the %s's config from its weights", config_file, exc, what)
        return None


# -- inspecting and loading ----------------------------------------------------------------------------
def _shapes(weights: Mapping) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in weights.items()}


def _identify_adapter(path: Path, weights: Mapping, dtype: str) -> tuple[ControlNetInfo, dict]:
    try:
        layout, converted = adapter_files.to_diffusers_layout(weights)
        config = adapter_files.derive_config(_shapes(converted))
    except adapter_files.AdapterFormatError as exc:
        raise ControlNetFileError(f"{path.name} is not a ControlNet Easel can load: it is {exc}") from None
    except (KeyError, IndexError) as exc:
        raise ControlNetFileError(f"{path.name}: the T2I-Adapter weights are incomplete (no {exc}); "
                                  "the file is damaged: download it again") from None
    return ControlNetInfo(path, adapter_files.family(config), layout, "t2i_adapter", dtype, config), converted


def _identify(path: Path, weights: Mapping, dtype: str) -> tuple[ControlNetInfo, dict]:
    """The info of a ControlNet or T2I-Adapter from its weights (tensors or shapes), and the weights in
    diffusers' layout."""
    if adapter_files.is_adapter(weights):
        return _identify_adapter(path, weights, dtype)
    layout, converted = _to_diffusers_layout(weights, path.name)
    shapes = _shapes(converted)
    try:
        config = _derive_config(shapes)
    except (KeyError, IndexError) as exc:
        raise ControlNetFileError(f"{path.name}: the ControlNet weights are incomplete (no {exc}); "
                                  "the file is damaged: download it again") from None
    kind = "union" if "num_control_type" in config else "controlnet"
    return ControlNetInfo(path, _family(config), layout, kind, dtype, config), converted


def inspect(path: Path) -> ControlNetInfo:
    """What a ControlNet file or folder is, without building the model (a .safetensors header suffices)."""
    path = Path(path)
    weights_file = _weights_file(path)
    if weights_file.suffix.lower() == ".safetensors":
        return _identify(path, *_read_header(weights_file))[0]
    tensors = _read_tensors(weights_file)
    return _identify(path, tensors, _dtype_name(tensors))[0]


def _label(family: str) -> str:
    return family_config(family)["label"] if family in FAMILIES else family


def _fits_unet(info: ControlNetInfo, unet_config: Mapping) -> bool:
    if info.kind == "t2i_adapter":
        return adapter_files.fits_unet(info.config, unet_config)
    context = info.config.get("cross_attention_dim", unet_config.get("cross_attention_dim"))
    return (list(unet_config["block_out_channels"]) == info.config["block_out_channels"]
            and context == unet_config.get("cross_attention_dim"))


def _check_base(info: ControlNetInfo, family: str, unet_config: Mapping | None) -> None:
    name, mine = info.path.name, _label(info.family)
    noun = "T2I-Adapter" if info.kind == "t2i_adapter" else "ControlNet"
    if family != info.family:
        theirs = _label(family)
        raise ControlNetBaseError(f"{name} is a {noun} for {mine} models, but the loaded checkpoint is {theirs}: "
                                  f"pick an {theirs} {noun}, or switch to an {mine} checkpoint")
    if unet_config is None or _fits_unet(info, unet_config):
        return
    channels = adapter_files.feature_channels(info.config) if info.kind == "t2i_adapter" \
        else info.config["block_out_channels"]
    raise ControlNetBaseError(
        f"{name} does not fit the loaded checkpoint's UNet ({noun} channels {channels}, "
        f"UNet channels {list(unet_config['block_out_channels'])}): pick a {noun} made for this model")


def _build(config: dict, weights: dict[str, torch.Tensor], kind: str, name: str, dtype, device):
    """The model of `config` holding exactly `weights` (which it takes out of the dict, one at a time, so
    the file's copy is freed as the model's is made); ControlNetFileError when they do not fit."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = _model_class(kind).from_config(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    details = [f"{len(missing)} missing, e.g. {missing[0]}"] if missing else []
    details += [f"unknown weights, e.g. {extra[0]}"] if extra else []
    details += [f"{k} is {tuple(weights[k].shape)}, not {tuple(expected[k].shape)}" for k in wrong[:1]]
    if details:
        noun = "T2I-Adapter" if kind == "t2i_adapter" else "ControlNet"
        raise ControlNetFileError(f"{name}: the {noun} weights do not fit its architecture ({'; '.join(details)}); "
                                  "the file is damaged or of a kind Easel does not know")
    # Copies, not views into the file's buffer: those are unaligned (slower, and not bit-identical on CPUs).
    state = {k: weights.pop(k).to(device=device, dtype=dtype, copy=True) for k in list(expected)}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def load_controlnet(path: Path, family: str, dtype=torch.float32, device="cpu", unet_config: Mapping | None = None):
    """A ControlNet for a checkpoint of `family`, as a diffusers ControlNetModel (ControlNetUnionModel for
    a union file, T2IAdapter for an adapter) in `dtype` on `device`; refused with ControlNetBaseError when made
    for another base."""
    path = Path(path)
    weights_file = _weights_file(path)
    # 1. Refuse a wrong base before reading gigabytes, where the header tells
    if weights_file.suffix.lower() == ".safetensors":
        _check_base(_identify(path, *_read_header(weights_file))[0], family, unet_config)
    # 2. Read the tensors into diffusers' layout
    tensors = _read_tensors(weights_file)
    info, weights = _identify(path, tensors, _dtype_name(tensors))
    del tensors
    _check_base(info, family, unet_config)
    derived = dict(info.config)
    if info.layout == "lllyasviel":
        derived["global_pool_conditions"] = _global_pooling(weights_file)
    # 3. A diffusers config.json when it fits the weights, else the config the tensors tell
    shipped = sidecar_config(weights_file) if info.layout == "diffusers" else None
    if shipped is not None:
        accepted = signature_inspect.signature(_model_class(info.kind).__init__).parameters
        try:
            return _build({k: v for k, v in shipped.items() if k in accepted}, weights, info.kind, path.name,
                          dtype, device)
        except ControlNetFileError as exc:
            logger.warning("%s; using the config its weights tell instead", exc)
    # An adapter's tensors tell its whole config; a ControlNet's attention heads are its base UNet's
    config = derived if info.kind == "t2i_adapter" else _full_config(derived, info.family, info.kind, unet_config)
    return _build(config, weights, info.kind, path.name, dtype, device)
