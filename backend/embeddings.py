"""Textual inversion embeddings: files in `models/embeddings`, whose file name is the token.

Formats: A1111's `.pt` (`string_to_param`), `.safetensors` with `emb_params`, SDXL's `clip_l` +
`clip_g`, and diffusers' `learned_embeds.bin` ({token: vector}); one or many vectors. An embedding
fits a model when it has vectors of each text encoder's width; others are listed as skipped.
In a prompt the name is matched as a whole word, case-insensitively (CLIP lowercases text), and its
vectors replace the token embeddings at those positions (`backend.conditioning`).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.errors import InputError
from backend.model_index import HashCache, ModelFile, scan

logger = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


class EmbeddingError(InputError):
    pass


def read_vectors(path: Path) -> dict[str, torch.Tensor]:
    """{"default": (n, dim)} or SDXL's {"clip_l": (n, 768), "clip_g": (n, 1280)}."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise EmbeddingError(f"cannot read {path.name} ({error}); the file is damaged or not an embedding") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name} is not an embedding (expected a dictionary of tensors)")
    if "clip_l" in data and "clip_g" in data:
        vectors = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif "string_to_param" in data:  # A1111: {"string_to_param": {"*": tensor}, "name": ..., "step": ...}
        vectors = {"default": next(iter(data["string_to_param"].values()))}
    elif "emb_params" in data:
        vectors = {"default": data["emb_params"]}
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):  # diffusers {token: vector}
        vectors = {"default": next(iter(data.values()))}
    else:
        raise EmbeddingError(f"{path.name}: no embedding vectors found (keys: {', '.join(map(str, list(data)[:6]))})")
    out = {}
    for key, tensor in vectors.items():
        tensor = tensor.detach().float()
        out[key] = tensor[None] if tensor.dim() == 1 else tensor.reshape(-1, tensor.shape[-1])
    return out


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: dict[str, torch.Tensor]

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def for_encoders(self, widths: list[int]) -> list[torch.Tensor] | None:
        """Vectors for each text encoder (by width), or None when the embedding does not fit."""
        if len(widths) == 2 and set(self.vectors) == {"clip_l", "clip_g"}:
            parts = [self.vectors["clip_l"], self.vectors["clip_g"]]
        elif len(widths) == 1 and "default" in self.vectors:
            parts = [self.vectors["default"]]
        else:
            return None
        return parts if [p.shape[1] for p in parts] == widths else None


@dataclass
class EncoderVocabulary:
    """The embeddings usable with one text encoder: a pattern that finds their names, and vectors."""

    pattern: re.Pattern | None
    vectors: dict[str, torch.Tensor]  # lowercased name -> (n, width)

    def split(self, text: str) -> list[tuple[str, torch.Tensor | None, str]]:
        """Text -> pieces: (text, None, "") for plain text, (name, vectors, name) for an embedding."""
        if self.pattern is None:
            return [(text, None, "")]
        pieces, start = [], 0
        for found in self.pattern.finditer(text):
            if found.start() > start:
                pieces.append((text[start:found.start()], None, ""))
            name = found.group(0).lower()
            pieces.append((found.group(0), self.vectors[name], name))
            start = found.end()
        if start < len(text):
            pieces.append((text[start:], None, ""))
        return pieces


NO_EMBEDDINGS = EncoderVocabulary(None, {})


@dataclass
class EmbeddingSet:
    """The embeddings that fit one model, per text encoder, and the names of those that do not."""

    embeddings: dict[str, Embedding]  # lowercased name -> embedding
    per_encoder: list[EncoderVocabulary]
    skipped: list[str]

    def used(self, *texts: str) -> list[Embedding]:
        """Embeddings named in the texts, in order of first use."""
        if not self.per_encoder or self.per_encoder[0].pattern is None:
            return []
        names = dict.fromkeys(m.group(0).lower() for t in texts for m in self.per_encoder[0].pattern.finditer(t))
        return [self.embeddings[n] for n in names]


def _pattern(names: list[str]) -> re.Pattern | None:
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w\-])(?:{alternatives})(?![\w\-])", re.IGNORECASE)


class EmbeddingLibrary:
    """The embedding files in a folder (and subfolders), read once each (again when changed)."""

    def __init__(self, folder: Path, hashes: HashCache):
        self.folder = Path(folder)
        self.hashes = hashes
        self._files: list[ModelFile] = []
        self._loaded: dict[Path, tuple[tuple, Embedding]] = {}
        self.errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._last_set: tuple[tuple, EmbeddingSet] | None = None  # (encoder widths and files, their set)
        self.refresh()

    def refresh(self) -> None:
        self._files = scan(self.folder, EMBEDDING_SUFFIXES)

    @property
    def files(self) -> list[ModelFile]:
        return list(self._files)

    def _load(self, file: ModelFile) -> Embedding | None:
        stat = file.path.stat()
        key = (stat.st_size, stat.st_mtime)
        cached = self._loaded.get(file.path)
        if cached and cached[0] == key:
            return cached[1]
        try:
            embedding = Embedding(Path(file.name).name, file.path, read_vectors(file.path))
        except EmbeddingError as error:
            if self.errors.get(file.name) != str(error):
                logger.warning("Embedding skipped: %s", error)
            self.errors[file.name] = str(error)
            return None
        self.errors.pop(file.name, None)
        self._loaded[file.path] = (key, embedding)
        return embedding

    def for_model(self, model) -> EmbeddingSet:
        """Rescans the folder first (new files work at once, as in A1111); the set is rebuilt only when a
        file or the model changed (the token counter asks on every keystroke)."""
        self.refresh()
        # FLUX.1 and SD 3.x read prompts through T5 and CLIP their own way: no textual inversion there yet
        widths = [] if model.engine.encodes_prompts else [encoder.get_input_embeddings().embedding_dim
                                                         for encoder in model.text_encoders]
        signature = (tuple(widths), tuple(self._stamp(f) for f in self._files))  # what the set depends on
        last = self._last_set
        if last is not None and last[0] == signature:
            return last[1]
        found = self._build(widths)
        self._last_set = (signature, found)
        return found

    @staticmethod
    def _stamp(file: ModelFile) -> tuple:
        try:
            stat = file.path.stat()
        except OSError:
            return (str(file.path), None, None)
        return (str(file.path), stat.st_size, stat.st_mtime_ns)

    def _build(self, widths: list[int]) -> EmbeddingSet:
        fitting: dict[str, Embedding] = {}
        parts: dict[str, list[torch.Tensor]] = {}
        skipped = []
        with self._lock:
            for file in self._files:
                embedding = self._load(file)
                if embedding is None:
                    continue
                vectors = embedding.for_encoders(widths)
                if vectors is None or embedding.name.lower() in fitting:
                    skipped.append(embedding.name)
                    continue
                fitting[embedding.name.lower()] = embedding
                parts[embedding.name.lower()] = vectors
        pattern = _pattern(list(fitting))
        per_encoder = [EncoderVocabulary(pattern, {n: v[i] for n, v in parts.items()}) for i in range(len(widths))]
        return EmbeddingSet(fitting, per_encoder, skipped)

    def short_hash(self, embedding: Embedding) -> str:
        """A1111's `TI hashes` entry: the first 12 hex digits of the file's sha256."""
        return self.hashes.sha256(embedding.path)[:12]
