"""CLIP image encoders for IP-Adapters, read offline from `models/clip_vision` (Forge's and ComfyUI's folder):
transformers' `CLIPVisionModelWithProjection` files (h94's `image_encoder` folder with its config.json,
ComfyUI's `clip_vision_h.safetensors` / `clip_vision_g.safetensors`, a full CLIP's `pytorch_model.bin`) and
open_clip's `visual.*` layout, the whole config told by tensor shapes. Also the library and cache of them.

- `inspect(path) -> ClipVisionInfo`; `load_clip_vision(path, dtype, device) -> ClipVisionEncoder`, whose
  `encode(image)` gives `ImageEncoding`: the projected `image_embeds` and the penultimate hidden states;
- `preprocess(image, size)`: CLIPImageProcessor's pixels (shortest side to `size` bicubic, centre crop, CLIP
  mean and std), written here so the result is the same with every transformers version.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.checkpoints import read_shapes, read_state_dict
from backend.controlnet_files import sidecar_config
from backend.errors import ModelFileError, NotFoundError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, which every CLIP image processor uses
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
FOLDER_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
# The released encoders by width: name, heads (weights cannot tell), activation (OpenAI's models use quick_gelu).
KNOWN_WIDTHS = {768: ("ViT-B", 12, "quick_gelu"), 1024: ("ViT-L", 16, "quick_gelu"), 1280: ("ViT-H", 16, "gelu"),
                1664: ("ViT-bigG", 16, "gelu")}
_PROJECTIONS = {512: "ViT-B", 768: "ViT-L", 1024: "ViT-H", 1280: "ViT-bigG"}  # their image_embeds widths


class ClipVisionFileError(ModelFileError):
    """An image encoder file that is damaged, or is something else."""


class ClipVisionNotFoundError(NotFoundError):
    pass


def encoder_name(hidden_size: int | None = None, projection_dim: int | None = None) -> str:
    """"ViT-H", from the hidden width or else the image_embeds width; a description for other sizes."""
    if hidden_size is not None:
        return KNOWN_WIDTHS[hidden_size][0] if hidden_size in KNOWN_WIDTHS else f"{hidden_size}-wide CLIP ViT"
    return _PROJECTIONS.get(projection_dim, f"CLIP ViT with {projection_dim}-wide image embeds")


@dataclass(frozen=True)
class ClipVisionInfo:
    path: Path
    layout: str  # "transformers" or "open_clip"
    config: dict = field(repr=False)  # CLIPVisionConfig fields

    @property
    def name(self) -> str:  # "ViT-H/14"
        return f"{encoder_name(self.config['hidden_size'])}/{self.config['patch_size']}"

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def projection_dim(self) -> int:
        return self.config["projection_dim"]


# -- reading ------------------------------------------------------------------------------------------
def _weights_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in FOLDER_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise ClipVisionFileError(f"{path.name} is a folder without image encoder weights ({FOLDER_WEIGHTS[0]})")


def _read(path: Path, shapes_only: bool) -> dict:
    try:
        found = read_shapes(path) if shapes_only else read_state_dict(path)
    except ModelFileError as exc:  # the checkpoint reader's message names the file and the fix
        raise ClipVisionFileError(str(exc)) from None
    return {k: v if isinstance(v, (torch.Tensor, tuple)) else tuple(v) for k, v in found.items()}


def _indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})


_OPEN_CLIP_NAMES = (("conv1.weight", "embeddings.patch_embedding.weight"), ("class_embedding", "embeddings.class_embedding"),
                    ("positional_embedding", "embeddings.position_embedding.weight"), ("ln_pre.", "pre_layrnorm."),
                    ("ln_post.", "post_layernorm."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                    ("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def _from_open_clip(weights: Mapping) -> dict:
    """open_clip's `visual.*` (tensors or shapes) under transformers' names: the fused attention input split
    into q, k, v, and `proj` (hidden x projection) transposed into `visual_projection.weight`."""
    out = {}
    for key, value in weights.items():
        if not key.startswith("visual."):
            continue
        name = key.removeprefix("visual.").replace("transformer.resblocks.", "encoder.layers.")
        if name == "proj":
            out["visual_projection.weight"] = value.T.contiguous() if isinstance(value, torch.Tensor) else value[::-1]
            continue
        if ".attn.in_proj_" in name:
            kind = name.rsplit("_", 1)[1]  # "weight" or "bias"
            parts = value.chunk(3) if isinstance(value, torch.Tensor) else [(value[0] // 3, *value[1:])] * 3
            for part, piece in zip(("q", "k", "v"), parts):
                out["vision_model." + name.split(".attn.")[0] + f".self_attn.{part}_proj.{kind}"] = piece
            continue
        for old, new in _OPEN_CLIP_NAMES:
            if name.startswith(old) or f".{old}" in name:
                name = new + name[len(old):] if name.startswith(old) else name.replace(f".{old}", f".{new}")
                break
        out["vision_model." + name] = value
    return out


def _vision_weights(weights: Mapping, name: str) -> tuple[str, dict]:
    """(layout, the image encoder's weights under transformers' names); a full CLIP's text half is dropped."""
    keys = list(weights)
    if "visual.conv1.weight" in weights:
        return "open_clip", _from_open_clip(weights)
    if "vision_model.embeddings.patch_embedding.weight" not in weights:
        what = ("a Stable Diffusion checkpoint" if any(k.startswith("model.diffusion_model.") for k in keys)
                else "an IP-Adapter (it belongs in models/ControlNet)" if any(k.startswith(("image_proj", "ip_adapter"))
                                                                             for k in keys)
                else "not a CLIP image encoder (no vision_model.* or visual.* weights)")
        raise ClipVisionFileError(f"{name} is {what}; models/clip_vision holds CLIP image encoders such as "
                                  "clip_vision_h.safetensors")
    kept = {k: v for k, v in weights.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    kept.pop("vision_model.embeddings.position_ids", None)  # a buffer older transformers saved
    return "transformers", kept


def _derive_config(shapes: Mapping[str, tuple], name: str, shipped: Mapping | None) -> dict:
    """CLIPVisionConfig fields from tensor shapes; heads and activation from a config.json when one is beside
    the file, else from the released model of that width (or width / 64 heads and GELU for others)."""
    embeddings = "vision_model.embeddings."
    if "visual_projection.weight" not in shapes:
        raise ClipVisionFileError(f"{name} has no visual projection: it is a CLIP vision model without its "
                                  "projection; IP-Adapters need the one with it (CLIPVisionModelWithProjection)")
    try:
        hidden, channels, patch = shapes[embeddings + "patch_embedding.weight"][:3]
        positions = shapes[embeddings + "position_embedding.weight"][0]
        intermediate = shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0]
    except (KeyError, ValueError) as exc:
        raise ClipVisionFileError(f"{name}: the image encoder's weights are incomplete (no {exc}); the file is "
                                  "damaged: download it again") from None
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ClipVisionFileError(f"{name}: {positions} position embeddings are not a square grid plus one; "
                                  "the file is damaged or not a CLIP ViT")
    _, heads, activation = KNOWN_WIDTHS.get(hidden, (None, max(1, hidden // 64), "gelu"))
    shipped = dict(shipped.get("vision_config", shipped)) if shipped else {}
    if shipped.get("hidden_size", hidden) != hidden:  # a config.json beside the file, of another model
        shipped = {}
    if hidden % int(shipped.get("num_attention_heads", heads)) == 0:
        heads = int(shipped.get("num_attention_heads", heads))
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_channels=channels, patch_size=patch,
                image_size=side * patch, projection_dim=shapes["visual_projection.weight"][0],
                num_hidden_layers=len(_indices(shapes, r"vision_model\.encoder\.layers\.(\d+)\.")),
                num_attention_heads=heads, hidden_act=shipped.get("hidden_act", activation),
                layer_norm_eps=float(shipped.get("layer_norm_eps", 1e-5)))


def _identify(path: Path, weights_file: Path, weights: Mapping) -> tuple[ClipVisionInfo, dict]:
    layout, converted = _vision_weights(weights, path.name)
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in converted.items()}
    config = _derive_config(shapes, path.name, sidecar_config(weights_file, "image encoder"))
    return ClipVisionInfo(path, layout, config), converted


def inspect(path: Path) -> ClipVisionInfo:
    """What an image encoder file or folder is (a .safetensors header suffices)."""
    path = Path(path)
    weights_file = _weights_file(path)
    return _identify(path, weights_file, _read(weights_file, shapes_only=True))[0]


# -- pixels and encodings -----------------------------------------------------------------------------
def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """(1, 3, size, size) float32 pixel values as CLIPImageProcessor makes them with PIL (transformers 4, and
    5's `CLIPImageProcessorPil`): transparency over white, the shortest side resized to `size` (the other
    truncated) bicubic, the centre cropped, scaled to [0, 1] in float64 and normalised in float32."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    width, height = image.size
    short, long = sorted((width, height))
    resized = (size, int(size * long / short)) if width <= height else (int(size * long / short), size)
    pixels = np.asarray(image.resize(resized, Image.BICUBIC))
    top, left = (resized[1] - size) // 2, (resized[0] - size) // 2
    pixels = (pixels[top : top + size, left : left + size].astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


@dataclass(frozen=True)
class ImageEncoding:
    """One image through an encoder: what plain IP-Adapters read (`image_embeds`) and plus ones read (the
    penultimate layer's `hidden_states`), with the unconditional input each was trained with (h94's):
    zero image embeds, and the hidden states of all-zero pixel values."""

    image_embeds: torch.Tensor  # (1, projection_dim)
    hidden_states: torch.Tensor  # (1, 1 + patches, hidden_size)
    uncond_hidden_states: torch.Tensor  # (1, 1 + patches, hidden_size)

    @property
    def uncond_image_embeds(self) -> torch.Tensor:
        return torch.zeros_like(self.image_embeds)


class ClipVisionEncoder:
    """A loaded image encoder (transformers' CLIPVisionModelWithProjection) and what it is."""

    def __init__(self, model, info: ClipVisionInfo):
        self.model, self.info = model, info
        self._uncond: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    @torch.no_grad()
    def encode(self, image: Image.Image) -> ImageEncoding:
        pixels = preprocess(image, self.info.config["image_size"]).to(self.device, self.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        if self._uncond is None:
            self._uncond = self.model(pixel_values=torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        return ImageEncoding(out.image_embeds, out.hidden_states[-2], self._uncond)


def load_clip_vision(path: Path, dtype=torch.float32, device="cpu") -> ClipVisionEncoder:
    """The image encoder of a file or folder, in `dtype` on `device`."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path)
    weights_file = _weights_file(path)
    info, weights = _identify(path, weights_file, _read(weights_file, shapes_only=False))
    with init_empty_weights():
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**info.config))
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        detail = (f"no {missing[0]}" if missing else f"unknown weights, e.g. {extra[0]}" if extra
                  else f"{wrong[0]} is {tuple(weights[wrong[0]].shape)}")
        raise ClipVisionFileError(f"{path.name}: the image encoder's weights do not fit a CLIP ViT ({detail}); "
                                  "the file is damaged: download it again")
    state = {k: weights.pop(k).to(device=device, dtype=dtype, copy=True) for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    return ClipVisionEncoder(model.to(device).eval().requires_grad_(False), info)


# -- the library and cache ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipVisionFile:
    name: str  # file stem, or folder name
    path: Path  # a weights file, or a folder with config.json
    relative: str  # path under its root folder, without the suffix


def _scan(root: Path) -> list[ClipVisionFile]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = here != root and "config.json" in filenames and any(n in filenames for n in FOLDER_WEIGHTS)
        if folder:  # h94's `image_encoder`: one entry; other files beside it stay their own
            found.append(ClipVisionFile(here.name, here, here.relative_to(root).as_posix()))
        for filename in sorted(filenames):
            path = here / filename
            if path.suffix.lower() in SUFFIXES and not filename.startswith(".") and not (folder and filename in
                                                                                         FOLDER_WEIGHTS):
                found.append(ClipVisionFile(path.stem, path, path.relative_to(root).with_suffix("").as_posix()))
    return found


class ClipVisionLibrary:
    """The image encoders in one or more folders (subfolders included); `refresh()` rescans. What each file
    is, is remembered by path, size and mtime (a pickle has to be read whole to tell)."""

    def __init__(self, folders: Path | Sequence[Path]):
        self.folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
        self._infos: dict[tuple, ClipVisionInfo] = {}
        self.files: list[ClipVisionFile] = []
        self.refresh()

    def refresh(self) -> None:
        files = [f for root in self.folders if root.is_dir() for f in _scan(root)]
        self.files = sorted(files, key=lambda f: f.relative.lower())

    def names(self) -> list[str]:
        return [f.relative for f in self.files]

    def resolve(self, text: str) -> ClipVisionFile:
        """The encoder a name, file name or relative path names."""
        wanted = text.strip().lower()
        for _ in range(2):
            for file in self.files:
                if wanted in (file.name.lower(), file.path.name.lower(), file.relative.lower()):
                    return file
            self.refresh()
        raise ClipVisionNotFoundError(f"image encoder '{text}' not found in {', '.join(map(str, self.folders))}; "
                                      f"available: {', '.join(self.names()) or 'none'}")

    def info(self, file: ClipVisionFile) -> ClipVisionInfo:
        weights = _weights_file(file.path)
        stat = weights.stat()
        key = (str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._infos:
            self._infos[key] = inspect(file.path)
        return self._infos[key]

    def described(self) -> list[tuple[ClipVisionFile, ClipVisionInfo | None]]:
        """Every file with what it is (None, logged, for one that cannot be read)."""
        out = []
        for file in self.files:
            try:
                out.append((file, self.info(file)))
            except (ModelFileError, OSError) as exc:
                logger.warning("Skipping image encoder %s: %s", file.path, exc)
                out.append((file, None))
        return out


class ClipVisionCache:
    """Loaded image encoders, at most `size` (they are large: ViT-H 2.5 GB in fp32), least recently used
    dropped first."""

    def __init__(self, library: ClipVisionLibrary, size: int = 1):
        self.library, self.size = library, size
        self._encoders: dict[tuple, ClipVisionEncoder] = {}

    def load(self, file: ClipVisionFile, dtype=torch.float32, device="cpu") -> ClipVisionEncoder:
        key = (str(file.path), str(dtype), str(device))
        encoder = self._encoders.pop(key, None)
        if encoder is None:
            while self._encoders and len(self._encoders) >= self.size:
                self._encoders.pop(next(iter(self._encoders)))
            encoder = load_clip_vision(file.path, dtype, device)
        self._encoders[key] = encoder  # most recently used last
        return encoder

    def clear(self) -> None:
        self._encoders.clear()
