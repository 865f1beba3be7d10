"""LoRA files: reading the formats users download into one `LayerUpdate` per layer, and the library
of files in `models/Lora` with its parsed-file cache and A1111's short hashes."""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.errors import InputError
from backend.model_index import HashCache, ModelFile, scan

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


class LoraError(InputError):
    """A LoRA that cannot be used: unreadable, an unsupported type, or made for another base model."""


# -- reading files -----------------------------------------------------------------------------------
# Formats: kohya-ss `.safetensors` as civitai serves them (`lora_unet_*`, `lora_te_*`, SDXL's
# `lora_te1_*`/`lora_te2_*`, with `alpha`; module names in the diffusers or the original LDM layout),
# LoCon (conv layers, also with a CP `lora_mid`), LyCORIS LoHa and LoKr, full weight differences
# (`diff`), and diffusers/peft files (`unet.*`/`text_encoder.*` with `lora_A`/`lora_B`, or the older
# `to_q_lora.down` attention-processor names). FLUX.1 and SD 3.x files use the same parts under their own
# layer names (`backend.flow_lora`): kohya's `lora_unet_double_blocks_0_img_attn_qkv`, the original layout
# with peft parts (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`), diffusers' `transformer.*`.
#
# Each tensor key is "<layer name>.<part>"; the parts say which kind of update the layer holds.
_PARTS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff", "diff_b"),
}
_REQUIRED = {"lora": ("lora_down.weight", "lora_up.weight"), "lokr": (), "full": ("diff",),
             "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
_SHARED_PARTS = ("alpha",)
# Other spellings of the same parts: diffusers/peft and the older attention-processor layout.
_PART_ALIASES = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "down.weight": "lora_down.weight", "up.weight": "lora_up.weight",
}
# Parts of LyCORIS types that Easel does not apply, named in the error.
_UNSUPPORTED = {
    "dora_scale": "DoRA", "oft_blocks": "OFT", "oft_diag": "OFT", "isp": "BOFT",
    "on_input": "IA3", "a1.weight": "GLoRA", "w_norm": "norm layers",
}


Ranges = tuple[tuple[int, int], ...]  # [start, stop) row ranges, in order


@dataclass
class LayerUpdate:
    """One layer's update in a LoRA file: its kind, its tensors and its alpha (None: scale 1). `rows`, when
    set, keeps only those rows of the update, in that order (see `take_rows`)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    rows: Ranges | None = None

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["lora_down.weight"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            for key in ("lokr_w1_b", "lokr_w2_b"):
                if key in t:
                    return t[key].shape[0]
        return None

    @property
    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if self.alpha is not None and rank else 1.0

    def add_to(self, weight: torch.Tensor, strength: float, in_place: bool = False) -> torch.Tensor:
        """weight + strength x update: a new tensor, or written into `weight` with `in_place`.
        A plain LoRA is one fused multiply-add (addmm) over the weight; the rest go through `delta`."""
        t = self.tensors
        if self.kind == "lora" and "lora_mid.weight" not in t and self.rows is None:
            up = t["lora_up.weight"].flatten(1).to(weight.device, weight.dtype)
            down = t["lora_down.weight"].flatten(1).to(weight.device, weight.dtype)
            if up.shape[0] * down.shape[1] != weight.numel():
                raise LoraError(f"an update of shape {(up.shape[0], down.shape[1])} does not fit a weight of "
                                f"shape {tuple(weight.shape)}")
            if in_place:
                weight.view(up.shape[0], down.shape[1]).addmm_(up, down, alpha=self.scale * strength)
                return weight
            return torch.addmm(weight.reshape(up.shape[0], down.shape[1]), up, down,
                               alpha=self.scale * strength).view(weight.shape)
        delta = self.delta(weight.shape, weight.device) * strength
        if in_place:
            return weight.add_(delta.to(weight.dtype))
        return weight + delta if weight.dtype == torch.float32 else (weight.float() + delta).to(weight.dtype)

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The update to add to a weight of `shape`, in fp32, before the strength is applied."""
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"].flatten(1)
            if "lora_mid.weight" in t:  # LoCon with a CP-decomposed kernel
                updown = torch.einsum("nmkl,in,mj->ijkl", t["lora_mid.weight"], up, down)
            else:
                updown = up @ down
        elif self.kind == "loha":
            updown = (_tucker(t, "hada_t1", "hada_w1_a", "hada_w1_b")
                      * _tucker(t, "hada_t2", "hada_w2_a", "hada_w2_b"))
        elif self.kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            updown = torch.kron(w1, w2)
        else:
            updown = t["diff"]
        if self.rows is not None:
            updown = _select_rows(updown, self.rows)
        if updown.numel() != shape.numel():
            raise LoraError(f"an update of shape {tuple(updown.shape)} does not fit a weight of shape {tuple(shape)}")
        return updown.reshape(shape) * self.scale

    def fits(self, shape: torch.Size) -> bool:
        """Whether this update has the size of a weight of `shape` (without computing it)."""
        t = self.tensors
        if self.rows is not None:  # a share of a layer whose whole update was checked before it was taken
            return shape[0] == sum(stop - start for start, stop in self.rows)
        if self.kind == "lora":
            inputs = shape[1] if "lora_mid.weight" in t else shape[1:].numel()
            return t["lora_up.weight"].shape[0] == shape[0] and t["lora_down.weight"].flatten(1).shape[1] == inputs
        if self.kind == "loha":
            if "hada_t1" in t:
                core = t["hada_t1"].shape
                return t["hada_w1_a"].shape[1] * t["hada_w1_b"].shape[1] * core[2:].numel() == shape.numel()
            return t["hada_w1_a"].shape[0] * t["hada_w1_b"].shape[1:].numel() == shape.numel()
        if self.kind == "lokr":
            w1 = t["lokr_w1"].numel() if "lokr_w1" in t else t["lokr_w1_a"].shape[0] * t["lokr_w1_b"].shape[1]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"].numel()
            elif "lokr_t2" in t:
                w2 = t["lokr_w2_a"].shape[1] * t["lokr_w2_b"].shape[1] * t["lokr_t2"].shape[2:].numel()
            else:
                w2 = t["lokr_w2_a"].shape[0] * t["lokr_w2_b"].shape[1:].numel()
            return w1 * w2 == shape.numel()
        return t["diff"].numel() == shape.numel()

    def take_rows(self, rows: Ranges) -> LayerUpdate:
        """The layer's update restricted to these rows, in this order: a module's share of a fused layer (FLUX's
        qkv), or the halves swapped. Factors are sliced, never the full update; a LoKr keeps the rows of w1 needed."""
        t = dict(self.tensors)
        if self.kind == "lora":
            t["lora_up.weight"] = _select_rows(t["lora_up.weight"], rows)
        elif self.kind == "loha":
            for key, core in (("hada_w1_a", "hada_t1"), ("hada_w2_a", "hada_t2")):
                # With a Tucker core the output channels are the factor's columns.
                t[key] = _select_rows(t[key], rows, dim=1 if core in t else 0)
        elif self.kind == "full":
            t["diff"] = _select_rows(t["diff"], rows)
        else:
            return self._lokr_rows(rows)
        return LayerUpdate(self.kind, t, self.alpha)

    def _lokr_rows(self, rows: Ranges) -> LayerUpdate:
        # Row r of kron(w1, w2) is built from row r // len(w2) of w1: keep the rows of w1 the ranges touch (the
        # scale folded in: the rank that set it may go with the dropped factor). With a Tucker core, the output
        # channels are the factor's columns.
        t = {k: v.float() for k, v in self.tensors.items()}
        w1 = t.pop("lokr_w1") if "lokr_w1" in t else t.pop("lokr_w1_a") @ t.pop("lokr_w1_b")
        w2_rows = t["lokr_w2"].shape[0] if "lokr_w2" in t else t["lokr_w2_a"].shape[1 if "lokr_t2" in t else 0]
        first = min(start for start, _ in rows) // w2_rows
        last = -(-max(stop for _, stop in rows) // w2_rows)
        t["lokr_w1"] = w1[first:last] * self.scale
        offset = first * w2_rows
        return LayerUpdate("lokr", t, None, tuple((start - offset, stop - offset) for start, stop in rows))


def _select_rows(tensor: torch.Tensor, rows: Ranges, dim: int = 0) -> torch.Tensor:
    parts = [tensor.narrow(dim, start, stop - start) for start, stop in rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _tucker(t: dict[str, torch.Tensor], core: str, a: str, b: str) -> torch.Tensor:
    if core in t:
        return torch.einsum("ijkl,jr,ip->prkl", t[core], t[b], t[a])
    return t[a] @ t[b]


def _normalise_layer(name: str) -> str:
    """Old diffusers attention-processor names -> module names."""
    name = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", name)
    name = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", name)
    return re.sub(r"\.lora_linear_layer$", "", name)


def group_layers(state_dict: dict[str, torch.Tensor]) -> dict[str, LayerUpdate]:
    """Tensor keys -> one `LayerUpdate` per layer name; unknown or unsupported parts raise LoraError."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    known = sorted({p for group in _PARTS.values() for p in group} | set(_SHARED_PARTS) | set(_PART_ALIASES),
                   key=len, reverse=True)
    for key, tensor in state_dict.items():
        for unsupported, label in _UNSUPPORTED.items():
            if key.endswith("." + unsupported):
                raise LoraError(f"unsupported LyCORIS type: {label} (key {key})")
        part = next((p for p in known if key.endswith("." + p)), None)
        if part is None:
            raise LoraError(f"not a LoRA tensor: {key}")
        layer = _normalise_layer(key[: -len(part) - 1])
        parts.setdefault(layer, {})[_PART_ALIASES.get(part, part)] = tensor
    layers = {}
    for layer, tensors in parts.items():
        alpha = tensors.pop("alpha", None)
        kind = next((k for k, names in _PARTS.items() if any(n in tensors for n in names)), None)
        if kind is None:
            continue  # an alpha alone
        if any(m not in tensors for m in _REQUIRED[kind]):
            raise LoraError(f"layer {layer} is incomplete: has {', '.join(sorted(tensors))}")
        tensors.pop("diff_b", None)  # bias differences: rare, and A1111 leaves most of them alone too
        layers[layer] = LayerUpdate(kind, tensors, float(alpha) if alpha is not None else None)
    if not layers:
        raise LoraError("no LoRA layers in the file")
    return layers


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file; LoraError names the file and the fix when it is unreadable."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        loaded = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(loaded, dict):
            raise ValueError("not a dictionary of tensors")
        return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}, {}
    except LoraError:
        raise
    except Exception as error:  # any parse failure: truncated download, wrong file type
        raise LoraError(f"cannot read {path.name} ({error}); the file is damaged or not a LoRA: "
                        "download it again") from None


# Layer names of FLUX.1's and SD 3.x's original layouts (kohya's underscores or dots), and diffusers' FLUX
# single blocks; the transformer blocks both families have in diffusers' layout are told apart by width.
_FLUX_BLOCKS = re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d")
_SD3_BLOCKS = re.compile(r"(^|[._])joint_blocks[._]\d")
_MMDIT_QUERY = re.compile(r"^(transformer\.|lora_transformer_)?transformer_blocks[._]\d+[._]attn[._]to_q$")
_MMDIT_WIDTHS = {3072: "flux", 1536: "sd3", 2432: "sd3"}  # FLUX.1; SD 3 / 3.5 Medium; SD 3.5 Large


@dataclass
class LoraFile:
    """A parsed LoRA: its layers by name (in the file's own naming) and what it says about itself."""

    name: str
    path: Path
    layers: dict[str, LayerUpdate]
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in layer.tensors.values())

    @property
    def base(self) -> str | None:
        """The base family it was trained for: from kohya/ModelSpec metadata, else from its layer names
        and shapes."""
        version = (self.metadata.get("ss_base_model_version", "") + " "
                   + self.metadata.get("modelspec.architecture", "")).lower()
        if "flux" in version:
            return "flux"
        if "sd3" in version or "stable-diffusion-3" in version:
            return "sd3"
        if "xl" in version:
            return "sdxl"
        if "v2" in version or "sd_2" in version or "v2-" in version:
            return "sd2"
        if "v1" in version or "sd_v1" in version:
            return "sd1"
        names = list(self.layers)
        if any(_FLUX_BLOCKS.search(n) for n in names):
            return "flux"
        if any(_SD3_BLOCKS.search(n) for n in names):
            return "sd3"
        for name, layer in self.layers.items():
            if _MMDIT_QUERY.match(name) and layer.kind == "lora":
                return _MMDIT_WIDTHS.get(layer.tensors["lora_down.weight"].shape[1])
        if any(n.startswith(("lora_te3_", "text_encoder_3.")) for n in names):
            return None  # a T5 beside the CLIPs: SD 3.x or FLUX.1, not SDXL
        if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in names):
            return "sdxl"
        for name, layer in self.layers.items():
            if ("attn2_to_k" in name or "attn2.to_k" in name) and layer.kind == "lora":
                width = layer.tensors["lora_down.weight"].shape[1]
                return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
        return None


def load_lora(file: ModelFile) -> LoraFile:
    tensors, metadata = read_state_dict(file.path)
    try:
        layers = group_layers(tensors)
    except LoraError as error:
        raise LoraError(f"{file.filename}: {error}") from None
    return LoraFile(Path(file.name).name, file.path, layers, metadata)


# -- the library: files, parsed-file cache, hashes ----------------------------------------------------
class LoraLibrary:
    """The LoRA files in `models/Lora` (and subfolders), a bounded cache of parsed files, and A1111's
    short hashes. Changing a LoRA's strength reuses the parsed file; an edited file is read again."""

    def __init__(self, folder: Path, hashes: HashCache, cache_mb: int = 1024):
        self.folder = Path(folder)
        self.hashes = hashes
        self.cache_bytes = cache_mb * 2**20
        self._files: list[ModelFile] = []
        self._cache: OrderedDict[tuple, LoraFile] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # files parsed since start: lets tests see the cache work
        self.refresh()

    def refresh(self) -> None:
        self._files = scan(self.folder, LORA_SUFFIXES)

    @property
    def files(self) -> list[ModelFile]:
        return list(self._files)

    def find(self, name: str) -> ModelFile:
        """By file stem (`<lora:name:...>` as in A1111), or by path relative to the folder."""
        candidates = [f for f in self._files if name in (f.name, Path(f.name).name)]
        if not candidates:
            lowered = name.lower()
            candidates = [f for f in self._files if lowered in (f.name.lower(), Path(f.name).name.lower())]
        if not candidates:
            self.refresh()  # a file added since the last scan
            candidates = [f for f in self._files if name in (f.name, Path(f.name).name)]
        if not candidates:
            raise LoraError(f"LoRA '{name}' not found in {self.folder}; put the file there or check the name")
        return candidates[0]

    def load(self, name: str) -> LoraFile:
        file = self.find(name)
        stat = file.path.stat()
        key = (str(file.path), stat.st_size, stat.st_mtime)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        lora = load_lora(file)
        self.reads += 1
        with self._lock:
            self._cache[key] = lora
            while len(self._cache) > 1 and sum(v.nbytes for v in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return lora

    def short_hash(self, lora: LoraFile) -> str:
        """A1111's `Lora hashes` entry: the first 12 hex digits of the addnet hash for .safetensors,
        of the whole file's sha256 otherwise."""
        addnet = lora.path.suffix.lower() == ".safetensors"
        return self.hashes.sha256(lora.path, addnet=addnet)[:12]

    def metadata(self, file: ModelFile) -> dict:
        """The file's metadata for the extra networks panel (kohya's JSON fields decoded)."""
        if file.path.suffix.lower() != ".safetensors":
            return {}
        try:
            from safetensors import safe_open

            with safe_open(str(file.path), "pt") as handle:
                raw = dict(handle.metadata() or {})
        except Exception as error:  # shown on the card, never raised
            return {"error": str(error)}
        decoded = {}
        for key, value in raw.items():
            try:
                decoded[key] = json.loads(value) if value[:1] in "{[" else value
            except ValueError:
                decoded[key] = value
        return decoded

