"""Model files on disk: which folder holds each kind, listing, resolving names, and A1111's hashes.

Hashes (sha256 of the whole file, shown as its first 10 hex digits) are cached by path, size and
mtime, so a multi-GB file is hashed once, not at every start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from backend.errors import NotFoundError
from backend.settings import Settings

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".gguf")  # .gguf: quantised FLUX.1 transformers
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
TEXT_ENCODER_SUFFIXES = (".safetensors",)


class ModelNotFoundError(NotFoundError):
    pass


@dataclass(frozen=True)
class ModelFile:
    """One checkpoint or VAE the user can pick: a file, or a diffusers folder."""

    name: str  # path relative to its root folder, without the suffix: "anime/model-v2"
    path: Path

    @property
    def filename(self) -> str:
        return self.path.name

    @property
    def is_diffusers_folder(self) -> bool:
        return self.path.is_dir()


class HashCache:
    """sha256 of files, remembered on disk by (path, size, mtime)."""

    def __init__(self, cache_file: Path):
        self.cache_file = Path(cache_file)
        self._lock = threading.Lock()
        self._entries: dict | None = None

    def _load(self) -> dict:
        if self._entries is None:
            try:
                self._entries = json.loads(self.cache_file.read_text())
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def _save(self) -> None:
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_file.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(self._entries, handle, indent=1)
        os.replace(tmp, self.cache_file)

    def sha256(self, path: Path, addnet: bool = False) -> str:
        """The file's sha256; with `addnet`, of a .safetensors file's tensor data after its header
        (the hash kohya's tools and A1111 use for LoRAs, unchanged by edits to the metadata)."""
        path = Path(path).resolve()
        stat = path.stat()
        key = ("addnet:" if addnet else "") + str(path)
        with self._lock:
            entry = self._load().get(key)
            if entry and entry["size"] == stat.st_size and entry["mtime"] == stat.st_mtime:
                return entry["sha256"]
        logger.info("Calculating sha256 for %s", path.name)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            if addnet:
                header_length = int.from_bytes(handle.read(8), "little")
                handle.seek(8 + header_length)
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        value = digest.hexdigest()
        with self._lock:
            self._load()[key] = {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": value}
            self._save()
        return value

    def cached(self, path: Path, addnet: bool = False) -> str | None:
        """The sha256 if it was computed for this version of the file, else None (never reads the file)."""
        path = Path(path).resolve()
        try:
            stat = path.stat()
        except OSError:
            return None
        with self._lock:
            entry = self._load().get(("addnet:" if addnet else "") + str(path))
        if entry and entry["size"] == stat.st_size and entry["mtime"] == stat.st_mtime:
            return entry["sha256"]
        return None

    def short_hash(self, path: Path) -> str:
        """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
        return self.sha256(path)[:10]


def _is_diffusers_folder(path: Path) -> bool:
    # SD 1.x/2.x/SDXL pipelines have a unet/, FLUX.1 and SD 3.x ones a transformer/
    return (path / "model_index.json").is_file() and ((path / "unet").is_dir() or (path / "transformer").is_dir())


def scan(root: Path, suffixes: tuple[str, ...], folders: bool = False) -> list[ModelFile]:
    """Model files under `root` (recursively), sorted by name; diffusers folders when `folders`."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if folders and here != root and _is_diffusers_folder(here):
            found.append(ModelFile(here.relative_to(root).as_posix(), here))
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            path = here / filename
            if path.suffix.lower() in suffixes and not filename.startswith("."):
                found.append(ModelFile(path.relative_to(root).with_suffix("").as_posix(), path))
    return sorted(found, key=lambda f: f.name.lower())


def _is_vae_sidecar(file: ModelFile) -> bool:
    return file.name.endswith(".vae")


class ModelIndex:
    """Lists and resolves checkpoints and VAEs in the configured folders; `refresh()` rescans."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.hashes = HashCache(settings.cache_dir / "hashes.json")
        self._checkpoints: list[ModelFile] = []
        self._vaes: list[ModelFile] = []
        self._text_encoders: list[ModelFile] = []
        self.refresh()

    def refresh(self) -> None:
        checkpoints = scan(self.settings.model_dir("checkpoints"), CHECKPOINT_SUFFIXES, folders=True)
        self._checkpoints = [c for c in checkpoints if not _is_vae_sidecar(c)]
        self._vaes = scan(self.settings.model_dir("vae"), VAE_SUFFIXES)
        self._text_encoders = scan(self.settings.model_dir("text_encoder"), TEXT_ENCODER_SUFFIXES)

    @property
    def checkpoints(self) -> list[ModelFile]:
        return list(self._checkpoints)

    @property
    def vaes(self) -> list[ModelFile]:
        return list(self._vaes)

    @property
    def text_encoders(self) -> list[ModelFile]:
        """Files in `models/text_encoder` (FLUX.1's and SD 3.5's CLIP-L, CLIP-G and T5 XXL)."""
        return list(self._text_encoders)

    def _resolve(self, name: str, files: list[ModelFile], what: str, folder: Path) -> ModelFile:
        name = name.strip()
        # Accept A1111's titles ("name.safetensors [hash]"), bare names, file names and short hashes.
        bare = name.split(" [")[0].strip()
        for file in files:
            if bare in (file.name, file.filename, file.path.name, str(file.path)):
                return file
        stem_matches = [f for f in files if Path(f.name).name == Path(bare).stem or Path(f.name).name == bare]
        if len(stem_matches) == 1:
            return stem_matches[0]
        if len(bare) == 10 and all(c in "0123456789abcdef" for c in bare.lower()):
            for file in files:
                if file.path.is_file() and self.hashes.short_hash(file.path) == bare.lower():
                    return file
        available = ", ".join(f.filename for f in files) or "none"
        raise ModelNotFoundError(f"{what} '{name}' not found in {folder}; available: {available}")

    def resolve_checkpoint(self, name: str) -> ModelFile:
        return self._resolve(name, self._checkpoints, "checkpoint", self.settings.model_dir("checkpoints"))

    def resolve_vae(self, name: str) -> ModelFile:
        return self._resolve(name, self._vaes, "VAE", self.settings.model_dir("vae"))

    def resolve_text_encoder(self, name: str) -> ModelFile:
        return self._resolve(name, self._text_encoders, "text encoder", self.settings.model_dir("text_encoder"))

    def sidecar_vae(self, checkpoint: ModelFile) -> ModelFile | None:
        """A1111's "Automatic" VAE: `<checkpoint>.vae.*` beside the checkpoint or in the VAE folder."""
        stem = Path(checkpoint.name).name
        candidates = [checkpoint.path.with_name(stem + ".vae" + s) for s in VAE_SUFFIXES]
        candidates += [self.settings.model_dir("vae") / (stem + s) for s in VAE_SUFFIXES]
        candidates += [self.settings.model_dir("vae") / (stem + ".vae" + s) for s in VAE_SUFFIXES]
        for path in candidates:
            if path.is_file():
                return ModelFile(path.stem, path)
        return None

    def title(self, file: ModelFile, compute: bool = True) -> str:
        """A1111's checkpoint title: "name.safetensors [shorthash]". Without `compute`, a file whose hash
        was never computed is titled "name.safetensors" (as A1111 lists it until it hashes the file)."""
        if file.is_diffusers_folder:
            return file.name
        sha = self.hashes.sha256(file.path) if compute else self.hashes.cached(file.path)
        return f"{file.name}{file.path.suffix}" + (f" [{sha[:10]}]" if sha else "")
