"""The ControlNet library: the models in `models/ControlNet` (files and diffusers folders, subfolders
included), titled "name [hash]" and resolved from what a client sends, the way sd-webui-controlnet does.

- `ControlNetLibrary(folders)`: `.files` (`ControlNetFile`: name, title "name [hash]", path, relative),
  `.titles()`, `.refresh()`, `.resolve(text)`: a title, name, file name or relative path; "None" -> None;
  an unknown name raises `ControlNetNotFoundError`.
- `model_hash(path)`: A1111's old 8-digit model hash, which the titles carry as sd-webui-controlnet's do.
- `ControlNetCache(library, encoders=, settings=)`: the models loaded for the active checkpoint, `.load(name,
  model)`, with IP-Adapters' image encoders (`.encoder`) and preprocessors' models (`.annotator_weights`);
  `.set_size(n)` (the `control_net_model_cache_size` option) frees the least recently used beyond `n`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from backend import devices
from backend.controlnet_files import DIFFUSERS_WEIGHTS, ControlNetNotFoundError, load_controlnet
from backend.errors import InputError

logger = logging.getLogger(__name__)

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")  # sd-webui-controlnet's list


def model_hash(path: Path) -> str:
    """A1111's old model hash, which sd-webui-controlnet puts in its titles: the first 8 hex digits of the
    sha256 of the 64 KiB at 1 MiB into the file (of nothing, e3b0c442, for a file under 1 MiB)."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


@dataclass(frozen=True)
class ControlNetFile:
    name: str  # file stem, or folder name: what sd-webui-controlnet matches
    title: str  # "name [hash]", as sd-webui-controlnet lists it
    path: Path  # a weights file or a diffusers folder
    relative: str  # path under its root folder, without the suffix: "sdxl/canny"


def _scan(root: Path) -> list[tuple[Path, Path]]:
    """(path, hashed file) of every model under `root`: weights files, and diffusers folders (config.json
    and diffusion_pytorch_model.*) as one entry whose other weights files are listed on their own."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        main = next((n for n in DIFFUSERS_WEIGHTS if n in filenames), None) if "config.json" in filenames else None
        if main and here != root:
            found.append((here, here / main))
        for filename in sorted(filenames):
            path = here / filename
            taken = here != root and main is not None and filename in DIFFUSERS_WEIGHTS
            if path.suffix.lower() in CONTROLNET_SUFFIXES and not filename.startswith(".") and not taken:
                found.append((path, path))
    return found


class ControlNetLibrary:
    """The ControlNets in one or more folders (subfolders included), titled and resolved the way
    sd-webui-controlnet does it; `refresh()` rescans. Hashes are remembered by path, size and mtime."""

    def __init__(self, folders: Path | Sequence[Path]):
        self.folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
        self._hashes: dict[tuple, str] = {}
        self._files: list[ControlNetFile] = []
        self.refresh()

    def _hash(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = model_hash(path)
        return self._hashes[key]

    def refresh(self) -> None:
        files = []
        for root in self.folders:
            for path, hashed in _scan(root) if root.is_dir() else []:
                name = path.name if path.is_dir() else path.stem
                if name == "None":  # sd-webui-controlnet's word for "no model"
                    continue
                relative = path.relative_to(root)
                relative = relative if path.is_dir() else relative.with_suffix("")
                try:
                    title = f"{name} [{self._hash(hashed)}]"
                except OSError as exc:  # a broken link or an unreadable file: leave it out, say so
                    logger.warning("Skipping ControlNet %s: %s", path, exc)
                    continue
                files.append(ControlNetFile(name, title, path, relative.as_posix()))
        # sd-webui-controlnet sorts by file name; the first folder wins a tie
        self._files = sorted(files, key=lambda f: f.path.name)

    @property
    def files(self) -> list[ControlNetFile]:
        return list(self._files)

    def titles(self) -> list[str]:
        """What sd-webui-controlnet's `/controlnet/model_list` answers (without its leading "None")."""
        return list(dict.fromkeys(f.title for f in self._files))

    def _find(self, text: str) -> ControlNetFile | None:
        for file in self._files:
            if file.title == text:
                return file
        # A title whose hash differs (another copy of the file) still names the model.
        bare = re.sub(r"\s*\[[0-9a-fA-F]{8,}\]$", "", text).lower()
        for file in self._files:
            if bare in (file.name.lower(), file.path.name.lower(), file.relative.lower()):
                return file
        # sd-webui-controlnet's last resort: the shortest name containing the text.
        matches = sorted((f for f in self._files if bare in f.name.lower()), key=lambda f: len(f.name))
        if matches:
            logger.info("ControlNet '%s' taken to mean %s", text, matches[0].title)
        return matches[0] if matches else None

    def resolve(self, text: str | None) -> ControlNetFile | None:
        """The model a client names (title, name, file name or relative path); None for "None"."""
        text = (text or "").strip()
        if text.lower() in ("", "none"):
            return None
        found = self._find(text)
        if found is None:
            self.refresh()  # a file added since the last scan
            found = self._find(text)
        if found is None:
            available = ", ".join(self.titles()) or "none"
            folders = ", ".join(str(f) for f in self.folders)
            raise ControlNetNotFoundError(f"ControlNet model '{text}' not found in {folders}; available: {available}")
        return found


class ControlNetCache:
    """The models of units (ControlNets, T2I-Adapters, IP-Adapters) loaded for the active checkpoint: at most
    `size`, least recently used freed first, all freed when another checkpoint asks (they are converted for
    its family and precision). Stored as the checkpoint's UNet is: on the CPU under --medvram/--lowvram.
    `encoders` (a `clip_vision.ClipVisionCache`) gives IP-Adapters their image encoder; `settings`, the
    preprocessors their models (`annotators`)."""

    def __init__(self, library: ControlNetLibrary, size: int = 2, encoders=None, settings=None):
        self.library, self.size, self.encoders, self.settings = library, size, encoders, settings
        self._owner = None
        self._nets: dict = {}

    def load(self, name: str, model):
        """(model, its title) for `name` as a client gives it, loaded for the checkpoint `model`."""
        file = self.library.resolve(name)
        if file is None:
            raise InputError(f"ControlNet model {name!r}: choose a model (available: "
                             f"{', '.join(self.library.titles()) or 'none'})")
        if self._owner != model.file.path:
            self.clear()
            self._owner = model.file.path
        if file.path not in self._nets:
            while len(self._nets) >= self.size:
                self._nets.pop(next(iter(self._nets)))
            self._nets[file.path] = self._read(file.path, model)
        net = self._nets.pop(file.path)
        self._nets[file.path] = net  # most recently used last
        return net, file.title

    @staticmethod
    def _read(path: Path, model):
        from backend import ip_adapter

        if ip_adapter.is_ip_adapter(path):  # small: kept on the compute device
            return ip_adapter.load_ip_adapter(path, model.unet, model.family, model.dtype, model.device)
        net = load_controlnet(path, model.family, model.dtype, "cpu", unet_config=model.unet.config).eval()
        model.place_beside_unet(net)
        return net

    def encoder(self, info, model):
        """The image encoder an IP-Adapter (`info`) reads, loaded, placed as the checkpoint's modules are."""
        from backend import ip_adapter

        if self.encoders is None:
            raise InputError("IP-Adapters need image encoders, and this engine was started without models/clip_vision")
        file = ip_adapter.find_encoder(info, self.encoders.library)
        encoder = self.encoders.load(file, model.dtype, "cpu")
        model.place_beside_unet(encoder.model)
        return encoder

    def annotator_weights(self, module: str):
        """The model a preprocessor needs (downloaded on first use when allowed), None for most."""
        if self.settings is None:
            return None
        from backend import annotators

        return annotators.weights_for(module, self.settings)

    def set_size(self, size: int) -> None:
        """Keep at most `size` models from now on; extra ones (least recently used first) are freed at once."""
        if size < 1:
            raise InputError(f"the ControlNet model cache size must be at least 1, not {size}")
        self.size = size
        if len(self._nets) <= size:
            return
        while len(self._nets) > size:
            path = next(iter(self._nets))
            logger.info("Unloading ControlNet %s (cache size %d)", path.name, size)
            del self._nets[path]
        devices.empty_cache()

    def loaded(self) -> list[Path]:
        """The loaded models' paths, least recently used first."""
        return list(self._nets)

    def clear(self) -> None:
        self._nets.clear()
        self._owner = None
