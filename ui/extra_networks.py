"""The extra networks panel: cards for LoRAs and embeddings, search, subfolder filter, and clicking a
card to put its tag into the prompt (clicking again takes it out), as in A1111.

Card images: `<name>.png` or `<name>.preview.png` (also .jpg/.jpeg/.webp) beside the file; otherwise a
placeholder drawn with the name's initials.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from backend.embeddings import EmbeddingError, read_vectors
from backend.model_index import ModelFile

PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ALL_FOLDERS = "All"
DEFAULT_LORA_STRENGTH = 1  # A1111's "extra_networks_default_multiplier"


@dataclass(frozen=True)
class Card:
    kind: str  # "lora" or "embedding"
    name: str  # file stem: what the tag uses
    folder: str  # subfolder relative to the kind's root ("" at the top)
    file: ModelFile

    @property
    def tag(self) -> str:
        return f"<lora:{self.name}:{DEFAULT_LORA_STRENGTH}>" if self.kind == "lora" else self.name


def cards(kind: str, files: list[ModelFile]) -> list[Card]:
    return [Card(kind, Path(f.name).name, Path(f.name).parent.as_posix().strip("."), f) for f in files]


def folders(all_cards: list[Card]) -> list[str]:
    return [ALL_FOLDERS] + sorted({c.folder for c in all_cards if c.folder})


def filter_cards(all_cards: list[Card], search: str = "", folder: str = ALL_FOLDERS) -> list[Card]:
    """Cards whose name (or subfolder path) holds every word of the search, in the chosen subfolder."""
    words = search.lower().split()
    chosen = []
    for card in all_cards:
        if folder not in ("", ALL_FOLDERS) and card.folder != folder and not card.folder.startswith(folder + "/"):
            continue
        haystack = f"{card.folder}/{card.name}".lower()
        if all(word in haystack for word in words):
            chosen.append(card)
    return chosen


def preview_path(file: ModelFile) -> Path | None:
    stem = file.path.with_suffix("")
    for base in (stem, Path(f"{stem}.preview")):
        for suffix in PREVIEW_SUFFIXES:
            candidate = base.with_name(base.name + suffix)
            if candidate.is_file():
                return candidate
    return None


SERVED_PREVIEWS = "card-previews"  # cache subfolder of preview copies
PLACEHOLDERS = "card-placeholders"


def placeholder(name: str, cache_dir: Path, size: int = 256) -> Path:
    """A card image for a file without a preview: its initials on a colour derived from its name."""
    digest = hashlib.sha1(name.encode()).hexdigest()
    path = Path(cache_dir) / PLACEHOLDERS / f"{digest[:16]}.png"
    if path.is_file():
        return path
    hue = int(digest[:2], 16)
    background = tuple(int(60 + 120 * abs(((hue / 255 + shift) % 1) * 2 - 1)) for shift in (0.0, 0.33, 0.66))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    initials = "".join(word[0] for word in re.split(r"[\W_]+", name) if word)[:3].upper() or "?"
    draw.text((size / 2, size / 2), initials, fill=(255, 255, 255), anchor="mm", font_size=size // 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(path)
    return path


def card_image(card: Card, cache_dir: Path) -> Path:
    """The card's picture, as a file the UI may serve: a copy of the preview in the cache (the model
    folders themselves are never served), or a placeholder."""
    preview = preview_path(card.file)
    return served_copy(preview, Path(cache_dir) / SERVED_PREVIEWS) if preview else placeholder(card.name, cache_dir)


def served_copy(path: Path, folder: Path) -> Path:
    """A copy of `path` in `folder`, named by the file's path, size and time (made once per version)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    target = folder / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}{path.suffix.lower()}"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)
    return target


def toggle_tag(prompt: str, tag: str) -> str:
    """Append the tag (space-separated, as A1111 does), or remove it when the prompt already holds it.
    A LoRA counts as present whatever its strength."""
    lora = re.fullmatch(r"<lora:([^:>]+):[^>]*>", tag)
    pattern = (rf"\s*<lora:{re.escape(lora.group(1))}(?::[^>]*)?>" if lora
               else rf"(?:\s*,)?\s*(?<![\w\-]){re.escape(tag)}(?![\w\-])")
    if re.search(pattern, prompt, re.IGNORECASE):
        return re.sub(pattern, "", prompt, count=1, flags=re.IGNORECASE).strip()
    return f"{prompt.rstrip()} {tag}".strip()


def _top_tags(frequency: str | dict, count: int = 20) -> list[str]:
    """kohya's `ss_tag_frequency` ({dataset: {tag: n}}) -> the most frequent tags."""
    if isinstance(frequency, str):
        try:
            frequency = json.loads(frequency)
        except ValueError:
            return []
    totals: dict[str, int] = {}
    for tags in (frequency or {}).values():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                totals[tag.strip()] = totals.get(tag.strip(), 0) + int(n)
    return [tag for tag, _ in sorted(totals.items(), key=lambda item: -item[1])[:count]]


def lora_details(file: ModelFile, metadata: dict) -> dict:
    """What a LoRA card shows: base model, network size, training tags, from kohya/ModelSpec metadata."""
    base = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "unknown"
    details = {
        "file": file.path.name,
        "size": f"{file.path.stat().st_size / 2**20:.1f} MiB",
        "base model": base,
        "network": metadata.get("ss_network_module"),
        "rank (dim)": metadata.get("ss_network_dim"),
        "alpha": metadata.get("ss_network_alpha"),
        "trained on": metadata.get("ss_sd_model_name"),
        "title": metadata.get("modelspec.title") or metadata.get("ss_output_name"),
        "training tags": _top_tags(metadata.get("ss_tag_frequency", {})) or None,
    }
    if "error" in metadata:
        details["error"] = metadata["error"]
    return {k: v for k, v in details.items() if v not in (None, "", [])}


def embedding_details(file: ModelFile) -> dict:
    details = {"file": file.path.name, "size": f"{file.path.stat().st_size / 1024:.1f} KiB"}
    try:
        vectors = read_vectors(file.path)
    except EmbeddingError as error:
        return {**details, "error": str(error)}
    details["vectors"] = next(iter(vectors.values())).shape[0]
    details["for"] = ("SDXL (clip_l + clip_g)" if "clip_g" in vectors
                      else {768: "SD 1.x", 1024: "SD 2.x"}.get(vectors["default"].shape[1],
                                                              f"width {vectors['default'].shape[1]}"))
    return details
