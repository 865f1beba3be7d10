"""IP-Adapter files, read offline from `models/ControlNet` (where sd-webui-controlnet and Forge keep them):
h94's releases (`ip-adapter_sd15`, `_light`, `-plus_sd15`, `-plus-face_sd15`, `_sdxl`, `_sdxl_vit-h`,
`-plus_sdxl_vit-h`) as `.safetensors` (`image_proj.*` / `ip_adapter.*`) or `.bin` ({"image_proj": ...,
"ip_adapter": ...}, read weights-only), told apart by their tensors. (Applying them: `ip_adapter_attention`.)

- `inspect(path) -> IPAdapterInfo`: plain or plus (a Resampler), base family, the image encoder it needs;
- `load_ip_adapter(path, unet, family)`: an `IPAdapter` (image projection plus the key and value layers of
  each of the UNet's cross-attention layers); refuses an adapter for another base (`IPAdapterBaseError`);
- `find_encoder(info, library)` / `check_encoder(info, encoder_info)`: the image encoder it needs, refused
  with one sentence naming both sides (`IPAdapterEncoderError`); `IPAdapter.image_tokens(encoding)`.
Damaged or foreign files raise `IPAdapterFileError` naming the file.
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from backend.checkpoints import read_shapes, read_state_dict
from backend.clip_vision import ClipVisionFile, ClipVisionInfo, ClipVisionLibrary, ImageEncoding, encoder_name
from backend.errors import InputError, ModelFileError
from backend.model_detection import FAMILIES, family_config

FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # the UNet's cross-attention (text) width
RESAMPLER_HEAD_DIM = 64  # h94's Resampler: every release uses 64-channel heads
_DAMAGED_PICKLE = (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, LookupError, TypeError,
                   AttributeError, AssertionError, ArithmeticError, struct.error)


class IPAdapterFileError(ModelFileError):
    """An IP-Adapter file that is damaged, or is something else."""


class IPAdapterBaseError(InputError):
    """An IP-Adapter made for another base model than the loaded checkpoint."""


class IPAdapterEncoderError(InputError):
    """No image encoder of the kind an IP-Adapter needs (or the wrong one given)."""


@dataclass(frozen=True)
class IPAdapterInfo:
    path: Path
    kind: str  # "plain" (4 tokens from the image embeds) or "plus" (a Resampler over the hidden states)
    family: str | None  # "sd1"/"sd2"/"sdxl" when the context width is a released base's, else None
    context_dim: int  # the UNet's cross-attention width it writes tokens for
    tokens: int  # image tokens per image
    encoder_width: int  # the encoder's image_embeds width (plain) or hidden width (plus) it reads
    layer_shapes: tuple[tuple[int, int], ...]  # (inner, context) of each cross-attention layer it patches
    dtype: str

    @property
    def encoder(self) -> str:
        """The kind of image encoder it needs: "ViT-H", "ViT-bigG", ..."""
        return encoder_name(hidden_size=self.encoder_width) if self.kind == "plus" else \
            encoder_name(projection_dim=self.encoder_width)

    def accepts(self, encoder: ClipVisionInfo) -> bool:
        width = encoder.hidden_size if self.kind == "plus" else encoder.projection_dim
        return width == self.encoder_width


# -- reading ------------------------------------------------------------------------------------------
def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """h94's `.bin`: {"image_proj": {...}, "ip_adapter": {...}}, read weights-only, flattened to the
    `.safetensors` names (a flat state dict is taken as it is)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise IPAdapterFileError(f"refused to load {path.name}: it holds code that safe loading will not run; "
                                 "use the .safetensors release of the same IP-Adapter") from None
    except _DAMAGED_PICKLE as exc:
        raise IPAdapterFileError(f"could not read {path.name}: the file is truncated or damaged "
                                 f"({type(exc).__name__}); download it again") from None
    if not isinstance(data, dict):
        raise IPAdapterFileError(f"{path.name} holds no tensors; it is not an IP-Adapter")
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
        elif isinstance(value, torch.Tensor):
            flat[key] = value
    return flat


def _read(path: Path, shapes_only: bool) -> dict:
    if path.suffix.lower() != ".safetensors":
        tensors = _read_pickle(path)
        return {k: tuple(v.shape) for k, v in tensors.items()} if shapes_only else tensors
    try:
        return read_shapes(path) if shapes_only else read_state_dict(path)
    except ModelFileError as exc:  # the checkpoint reader's message names the file and the fix
        raise IPAdapterFileError(str(exc)) from None


def _indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})


def _explain_foreign(keys: list[str]) -> str:
    if any(k.startswith(("image_proj.proj.0.", "image_proj.perceiver_resampler.")) for k in keys):
        return ("it is an IP-Adapter FaceID or full-face model, which needs face embeddings Easel does not "
                "compute; use ip-adapter-plus-face instead")
    if any("input_hint_block" in k or "controlnet_cond_embedding" in k for k in keys):
        return "it is a ControlNet; use it as a ControlNet model"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k for k in keys):
        return "it is a LoRA; put it in models/Lora"
    return "it has no IP-Adapter weights (image_proj.* and ip_adapter.*)"


def _identify(path: Path, shapes: Mapping[str, tuple], dtype: str) -> IPAdapterInfo:
    """What an IP-Adapter is, from its tensors' shapes under the `.safetensors` names."""
    keys, name = list(shapes), path.name
    ids = _indices(keys, r"ip_adapter\.(\d+)\.to_k_ip\.weight$")
    plain = "image_proj.proj.weight" in shapes and "image_proj.norm.weight" in shapes
    if not ids or not (plain or "image_proj.latents" in shapes):
        raise IPAdapterFileError(f"{name} is not an IP-Adapter Easel can load: {_explain_foreign(keys)}")
    try:
        layers = tuple(shapes[f"ip_adapter.{i}.to_k_ip.weight"] for i in ids)
        if any(shapes[f"ip_adapter.{i}.to_v_ip.weight"] != shape for i, shape in zip(ids, layers)):
            raise KeyError("to_v_ip of the same shape as to_k_ip")
        if plain:
            context = shapes["image_proj.norm.weight"][0]
            tokens, width = shapes["image_proj.proj.weight"][0] // context, shapes["image_proj.proj.weight"][1]
        else:
            context, tokens = shapes["image_proj.proj_out.weight"][0], shapes["image_proj.latents"][1]
            width = shapes["image_proj.proj_in.weight"][1]
    except KeyError as exc:
        raise IPAdapterFileError(f"{name}: the IP-Adapter's weights are incomplete (no {exc}); the file is "
                                 "damaged: download it again") from None
    if any(len(s) != 2 or s[1] != context for s in layers):
        raise IPAdapterFileError(f"{name}: its attention layers do not take {context}-wide image tokens; the file "
                                 "is damaged")
    return IPAdapterInfo(path, "plain" if plain else "plus", FAMILY_BY_CONTEXT.get(context), context, tokens, width,
                         layers, dtype)


def _dtype_name(tensors: Mapping) -> str:
    return Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values()).most_common(1)[0][0]


def inspect(path: Path) -> IPAdapterInfo:
    """What an IP-Adapter file is, without building it (a .safetensors header suffices)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        shapes = _read(path, shapes_only=True)
        info = _identify(path, shapes, "")
        with safe_open(str(path), framework="pt") as handle:
            stored = str(handle.get_slice(next(iter(shapes))).get_dtype())
        return replace(info, dtype={"F16": "float16", "F32": "float32", "BF16": "bfloat16"}.get(stored, stored))
    tensors = _read(path, shapes_only=False)
    return _identify(path, {k: tuple(v.shape) for k, v in tensors.items()}, _dtype_name(tensors))


def is_ip_adapter(path: Path) -> bool:
    """Whether a file in models/ControlNet is an IP-Adapter (its keys; a .safetensors header suffices)."""
    try:
        keys = _read(Path(path), shapes_only=True)
    except (ModelFileError, OSError):
        return False
    return any(k.startswith("ip_adapter.") for k in keys) and any(k.startswith("image_proj.") for k in keys)


# -- fitting the UNet and the image encoder ------------------------------------------------------------
def cross_attention_layers(unet) -> list:
    """The UNet's cross-attention modules in the order h94 numbers them (diffusers' `attn_processors` order:
    down blocks, up blocks, middle block; `ip_adapter.1`, `.3`, `.5`, ... in the files)."""
    return [unet.get_submodule(name.removesuffix(".processor")) for name in unet.attn_processors
            if name.endswith("attn2.processor")]


def _label(family: str | None) -> str:
    return family_config(family)["label"] if family in FAMILIES else str(family)


def check_base(info: IPAdapterInfo, unet, family: str | None = None) -> None:
    """Refuse an IP-Adapter made for another base than `unet` (of checkpoint family `family`)."""
    name = info.path.name
    if family is not None and info.family is not None and info.family != family:
        mine, theirs = _label(info.family), _label(family)
        raise IPAdapterBaseError(f"{name} is an IP-Adapter for {mine} models, but the loaded checkpoint is {theirs}: "
                                 f"pick an {theirs} IP-Adapter, or switch to an {mine} checkpoint")
    layers = cross_attention_layers(unet)
    shapes = tuple((getattr(a, "inner_kv_dim", a.inner_dim), a.cross_attention_dim) for a in layers)
    if shapes != info.layer_shapes:
        wanted = f"an IP-Adapter made for {_label(family)} models" if family else "an IP-Adapter made for this model"
        raise IPAdapterBaseError(
            f"{name} does not fit the loaded checkpoint's UNet (the IP-Adapter patches {len(info.layer_shapes)} "
            f"cross-attention layers of {info.context_dim}-wide context; the UNet has {len(layers)} of "
            f"{unet.config.cross_attention_dim}): pick {wanted}")


def check_encoder(info: IPAdapterInfo, encoder: ClipVisionInfo) -> None:
    if not info.accepts(encoder):
        raise IPAdapterEncoderError(f"{info.path.stem} needs a {info.encoder} image encoder, but {encoder.path.name} "
                                    f"is a {encoder.name}: pick a {info.encoder} one from models/clip_vision")


def find_encoder(info: IPAdapterInfo, library: ClipVisionLibrary) -> ClipVisionFile:
    """The first image encoder in the library that `info`'s adapter can read."""
    described = library.described()
    for file, encoder in described:
        if encoder is not None and info.accepts(encoder):
            return file
    found = ", ".join(f"{f.relative} ({e.name if e else 'unreadable'})" for f, e in described) or "none"
    folders = ", ".join(str(f) for f in library.folders)
    raise IPAdapterEncoderError(f"{info.path.stem} needs a {info.encoder} image encoder in {folders}; found: {found}")


# -- the model -----------------------------------------------------------------------------------------
class IPAdapter(torch.nn.Module):
    """An IP-Adapter: `image_proj` (diffusers' ImageProjection or IPAdapterPlusImageProjection) turns an
    image encoding into tokens; `to_k_ip[i]` / `to_v_ip[i]` attend to them in the UNet's i-th cross-attention
    layer (in `cross_attention_layers` order)."""

    def __init__(self, info: IPAdapterInfo, image_proj: torch.nn.Module):
        super().__init__()
        self.info, self.image_proj = info, image_proj
        self.to_k_ip = torch.nn.ModuleList(torch.nn.Linear(c, h, bias=False) for h, c in info.layer_shapes)
        self.to_v_ip = torch.nn.ModuleList(torch.nn.Linear(c, h, bias=False) for h, c in info.layer_shapes)

    @torch.no_grad()
    def image_tokens(self, encoding: ImageEncoding) -> tuple[torch.Tensor, torch.Tensor]:
        """(the image's tokens, the unconditional tokens), each (1, tokens, context): h94's unconditional
        input is zero image embeds for plain adapters, the encoding of all-zero pixels for plus ones."""
        if self.info.kind == "plus":
            image, uncond = encoding.hidden_states, encoding.uncond_hidden_states
        else:
            image, uncond = encoding.image_embeds, encoding.uncond_image_embeds
        if image.shape[-1] != self.info.encoder_width:
            raise IPAdapterEncoderError(f"{self.info.path.stem} needs a {self.info.encoder} image encoder, but the "
                                        f"image was encoded {image.shape[-1]} wide: pick a {self.info.encoder} one")
        weight = next(self.image_proj.parameters())
        return tuple(self.image_proj(x.to(weight.device, weight.dtype)) for x in (image, uncond))


_RESAMPLER_NAMES = ((r"\.0\.norm1\.", ".ln0."), (r"\.0\.norm2\.", ".ln1."), (r"\.0\.to_q\.", ".attn.to_q."),
                    (r"\.0\.to_out\.", ".attn.to_out.0."), (r"\.1\.0\.", ".ff.0."), (r"\.1\.1\.", ".ff.1.net.0.proj."),
                    (r"\.1\.3\.", ".ff.1.net.2."))


def _to_module_names(weights: Mapping[str, torch.Tensor], info: IPAdapterInfo) -> dict[str, torch.Tensor]:
    """h94's names -> `IPAdapter`'s: `ip_adapter.{2i+1}` -> layer i, the Resampler's blocks into diffusers'."""
    out = {}
    ids = _indices(weights, r"ip_adapter\.(\d+)\.to_k_ip\.weight$")
    for layer, key_id in enumerate(ids):
        for part in ("to_k_ip", "to_v_ip"):
            out[f"{part}.{layer}.weight"] = weights[f"ip_adapter.{key_id}.{part}.weight"]
    for key, value in weights.items():
        if not key.startswith("image_proj."):
            continue
        name = key.removeprefix("image_proj.")
        if info.kind == "plain":
            out["image_proj." + name.replace("proj.", "image_embeds.")] = value
        elif name.endswith(".0.to_kv.weight"):
            block = name.removesuffix(".0.to_kv.weight")
            out[f"image_proj.{block}.attn.to_k.weight"], out[f"image_proj.{block}.attn.to_v.weight"] = value.chunk(2)
        else:
            for pattern, replacement in _RESAMPLER_NAMES:
                name = re.sub(r"^(layers\.\d+)" + pattern, r"\1" + replacement, name)
            out["image_proj." + name] = value
    return out


def _image_projection(info: IPAdapterInfo, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    if info.kind == "plain":
        return ImageProjection(image_embed_dim=info.encoder_width, cross_attention_dim=info.context_dim,
                               num_image_text_embeds=info.tokens)
    hidden = weights["image_proj.latents"].shape[2]
    return IPAdapterPlusImageProjection(
        embed_dims=info.encoder_width, output_dims=info.context_dim, hidden_dims=hidden,
        depth=len(_indices(weights, r"image_proj\.layers\.(\d+)\.")), dim_head=RESAMPLER_HEAD_DIM,
        heads=max(1, weights["image_proj.layers.0.0.to_q.weight"].shape[0] // RESAMPLER_HEAD_DIM),
        num_queries=info.tokens, ffn_ratio=weights["image_proj.layers.0.1.1.weight"].shape[0] / hidden)


def load_ip_adapter(path: Path, unet, family: str | None = None, dtype=torch.float32, device="cpu") -> IPAdapter:
    """An IP-Adapter for `unet` (of checkpoint family `family`), in `dtype` on `device`; refused with
    IPAdapterBaseError when made for another base."""
    from accelerate import init_empty_weights

    path = Path(path)
    # 1. Refuse a wrong base before reading the tensors, where the header tells
    if path.suffix.lower() == ".safetensors":
        check_base(inspect(path), unet, family)
    # 2. Read and identify the tensors
    weights = _read(path, shapes_only=False)
    info = _identify(path, {k: tuple(v.shape) for k, v in weights.items()}, _dtype_name(weights))
    check_base(info, unet, family)
    # 3. Build the model holding exactly them
    try:
        with init_empty_weights():
            adapter = IPAdapter(info, _image_projection(info, weights))
        state = _to_module_names(weights, info)
        expected = adapter.state_dict()
        bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape] + \
              [k for k in state if k not in expected]
        if bad:
            raise KeyError(bad[0])
    except (KeyError, ValueError) as exc:
        raise IPAdapterFileError(f"{path.name}: the IP-Adapter's weights do not fit its architecture ({exc}); the "
                                 "file is damaged or of a kind Easel does not know") from None
    adapter.load_state_dict({k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()},
                            strict=True, assign=True)
    return adapter.to(device).eval().requires_grad_(False)
