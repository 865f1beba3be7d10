"""Prompt styles in A1111's `styles.csv` format (columns `name,prompt,negative_prompt`).

Applying a style puts the user's text where the style says `{prompt}`, or appends the style after a
comma when it has no placeholder, as A1111 does. Saving rewrites the file atomically.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FIELDS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def unmerge_prompt(style_text: str, text: str) -> str | None:
    """The prompt that `merge_prompt(style_text, prompt)` turned into `text`, or None if it did not."""
    if "{prompt}" in style_text:
        before, _, after = style_text.partition("{prompt}")
        if text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after):
            return text[len(before) : len(text) - len(after)]
        return None
    style = style_text.strip()
    if text.strip() == style:
        return ""
    if text.endswith(", " + style):
        return text[: -len(", " + style)]
    return None


def merge_prompt(style_text: str, prompt: str) -> str:
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


class StyleDatabase:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.styles: dict[str, Style] = {}
        self.reload()

    def reload(self) -> None:
        self.styles = {}
        if not self.path.is_file():
            return
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as handle:
                for row in csv.DictReader(handle, skipinitialspace=True):
                    name = (row.get("name") or "").strip()
                    if name:
                        self.styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            logger.warning("Cannot read styles from %s: %s", self.path, exc)

    @property
    def names(self) -> list[str]:
        return list(self.styles)

    def apply(self, names: list[str], prompt: str, negative_prompt: str) -> tuple[str, str]:
        """The prompts with the named styles applied in order; unknown names are ignored."""
        for name in names:
            style = self.styles.get(name)
            if style is None:
                continue
            prompt = merge_prompt(style.prompt, prompt) if style.prompt else prompt
            if style.negative_prompt:
                negative_prompt = merge_prompt(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    def extract(self, names: list[str], prompt: str, negative_prompt: str) -> tuple[str, str] | None:
        """Undo `apply(names, ...)`: the prompts before the styles, or None when they do not unwind
        (A1111 does this when it pastes an infotext with a `Styles array`)."""
        for name in reversed(names):
            style = self.styles.get(name)
            if style is None:
                return None
            if style.prompt:
                prompt = unmerge_prompt(style.prompt, prompt)
            if style.negative_prompt and prompt is not None:
                negative_prompt = unmerge_prompt(style.negative_prompt, negative_prompt)
            if prompt is None or negative_prompt is None:
                return None
        return prompt, negative_prompt

    def save(self, style: Style) -> None:
        """Add or replace a style and rewrite the file (the old one stays until the new one is complete)."""
        if not style.name.strip():
            raise ValueError("a style needs a name")
        self.styles[style.name.strip()] = Style(style.name.strip(), style.prompt, style.negative_prompt)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".styles-", suffix=".csv")
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=FIELDS)
                writer.writeheader()
                for item in self.styles.values():
                    writer.writerow({"name": item.name, "prompt": item.prompt, "negative_prompt": item.negative_prompt})
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
