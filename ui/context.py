"""What the UI's parts share: `UIContext` (the runtime, how the server is reached, each browser's
job), the constants and CSS, and small pure helpers tested without a browser.
"""

from __future__ import annotations

import html
import logging
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from backend import clip_tokenizer, conditioning, infotext
from backend.embeddings import NO_EMBEDDINGS, EncoderVocabulary
from backend.errors import describe
from backend.extra_networks import parse_tags
from backend.job_queue import DeviceQueue
from backend.model_manager import ModelManager
from backend.options import Options
from backend.runtime import Runtime
from backend.styles import StyleDatabase
from backend.wildcards import Wildcards
from ui import controlnet_panel, jobs

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 75
EXTRA_NETWORK_KINDS = {"Lora": "lora", "Textual Inversion": "embedding"}
IMG2IMG_MODES = ("img2img", "sketch", "inpaint", "inpaint upload")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
UI_IMAGES = "ui-images"  # cache subfolder of the images the UI serves from outside the outputs folder
CSS = """
#easel-topbar {align-items: end}
.easel-tokens {text-align: right; font-size: 0.8em; opacity: 0.7; min-height: 1em}
.easel-infotext {font-family: monospace; font-size: 0.85em; white-space: pre-wrap; word-break: break-word}
.easel-status {min-height: 1.5em}
.easel-error {color: #d33}
.easel-bar {height: 6px; background: var(--neutral-200); border-radius: 3px; overflow: hidden}
.easel-bar > div {height: 100%; background: var(--color-accent); transition: width 0.2s}
.easel-cards .grid-container {grid-template-columns: repeat(auto-fill, minmax(110px, 140px)) !important;
                              grid-auto-rows: 140px !important}
.easel-cards .thumbnail-item {aspect-ratio: 1 / 1; height: auto !important}
"""


@dataclass
class UIContext:
    """What the handlers share: the runtime, how the server is reached, and the per-session jobs."""

    runtime: Runtime
    public: bool = False  # served beyond this machine: no server-side folder opening
    authenticated: bool = False  # the UI asks for a login (--gradio-auth)
    allow_extension_install: bool = True  # local, or --enable-insecure-extension-access
    jobs: jobs.JobRegistry = field(default_factory=jobs.JobRegistry)
    _tokenizer: Any = None

    @property
    def manager(self) -> ModelManager:
        return self.runtime.manager

    @property
    def options(self) -> Options:
        return self.runtime.options

    @property
    def settings(self):
        return self.runtime.settings

    @property
    def device(self) -> DeviceQueue:
        return self.runtime.device

    @property
    def styles(self) -> StyleDatabase:
        return self.runtime.styles

    def tokenizer(self):
        if self._tokenizer is None:  # every SD family uses CLIP's BPE vocabulary: one counts for all
            self._tokenizer = clip_tokenizer.load_clip_tokenizer(str(self.settings.cache_dir))
        return self._tokenizer

    def wildcards(self) -> Wildcards:
        return Wildcards(self.settings.wildcards_folder)

    def checkpoint_choices(self) -> list[str]:
        return [file.filename for file in self.manager.index.checkpoints]

    def active_checkpoint(self) -> str | None:
        """The loaded checkpoint; with --workers (nothing loads here) the server's current one."""
        active = self.manager.active
        return active.file.filename if active is not None else self.manager.selected

    def native_size(self) -> int:
        """The loaded model's native size; with --workers (nothing loads here) read from the current
        checkpoint's file."""
        active, selected = self.manager.active, self.manager.selected
        if active is not None:
            return active.native_size
        try:
            return self.manager.file_native_size(selected) if selected else 512
        except Exception:  # a file that went away or is not a checkpoint: the UI still opens
            return 512


# -- small pure helpers (tested without a browser) ---------------------------------------------------
def workers_html(rows: list[dict], queued: int) -> str:
    """The status line of `--workers`: each replica, its device, what it holds and what it runs."""
    parts = []
    for row in rows:
        held = ", ".join(name.split(" [")[0] for name in row.get("loaded") or []) or "nothing loaded"
        doing = f"running job {row['running'][:8]}" if row.get("running") else "idle"
        parts.append(f"<b>{html.escape(str(row['id']))}</b> ({html.escape(str(row.get('device')))}; "
                     f"{html.escape(held)}): {doing}")
    if not parts:
        return "<div>Workers: none running yet (starting, or restarting after a failure)</div>"
    return (f"<div>{len(parts)} worker{'s' if len(parts) != 1 else ''} · " + " · ".join(parts)
            + f" · {queued} waiting</div>")


def token_counter(tokenizer, text: str, vocabulary: EncoderVocabulary = NO_EMBEDDINGS) -> str:
    """A1111's counter: tokens used / the capacity of the 75-token chunks they take. Extra network
    tags do not count; an embedding counts as its vectors."""
    count = conditioning.count_tokens(tokenizer, parse_tags(text)[0], vocabulary)
    capacity = max(1, -(-count // CHUNK_TOKENS)) * CHUNK_TOKENS
    return f"{count}/{capacity}"


def mask_from_editor(value: dict | None) -> Image.Image | None:
    """The painted strokes of an ImageEditor value as an L mask (white = repaint), or None."""
    if not value or not value.get("layers"):
        return None
    background = value.get("background")
    size = background.size if background is not None else value["layers"][0].size
    mask = Image.new("L", size, 0)
    for layer in value["layers"]:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A").resize(size)
        mask.paste(255, (0, 0), alpha.point(lambda a: 255 if a > 0 else 0))
    return mask if mask.getbbox() else None


def init_from_img2img_inputs(mode: str, image, sketch, editor, upload_image, upload_mask):
    """(init image, mask) for the chosen img2img mode, with a message naming what is missing."""
    if mode == "img2img":
        return need(image, "img2img needs an image: drop one in the img2img tab"), None
    if mode == "sketch":
        composite = (sketch or {}).get("composite") or (sketch or {}).get("background")
        return need(composite, "sketch needs an image to draw on"), None
    if mode == "inpaint":
        background = need((editor or {}).get("background"), "inpaint needs an image to paint a mask on")
        mask = mask_from_editor(editor)
        if mask is None:
            raise gr.Error("inpaint needs a mask: paint over the part of the image to repaint")
        return background, mask
    base = need(upload_image, "inpaint upload needs an image")
    mask = need(upload_mask, "inpaint upload needs a mask image (white = repaint)")
    return base, mask


def need(value, message: str):
    if value is None:
        raise gr.Error(message)
    return value


def fields_from_infotext(text: str) -> dict[str, Any]:
    """Parsed infotext -> GenerationRequest field values (prompt, seed, size... all of them); a text
    Easel cannot read is a message in the browser."""
    try:
        return infotext.request_fields(infotext.parse_infotext(text))
    except infotext.InfotextError as exc:
        raise gr.Error(str(exc)) from exc


def format_infotext_html(text: str) -> str:
    return f"<div class='easel-infotext'>{html.escape(text)}</div>" if text else ""


def progress_html(event: jobs.Running) -> str:
    fraction = event.progress.fraction if event.progress is not None else 0.0
    return (f"<div class='easel-bar'><div style='width:{fraction * 100:.1f}%'></div></div>"
            f"<div>{html.escape(event.describe())}</div>")


def describe_error(exc: BaseException) -> str:
    """One line for the status area: Easel's errors and gradio's as they are, a bug with its class."""
    return str(exc.message) if isinstance(exc, gr.Error) else describe(exc)


def open_folder(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    system = platform.system()
    if system == "Windows":
        os.startfile(path)  # opening a local folder for the local user
    else:
        subprocess.Popen(["open" if system == "Darwin" else "xdg-open", str(path)])



def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def error_html(message: str) -> str:
    return f"<div class='easel-error'>⚠ {html.escape(message)}</div>"




def clamp_to_ranges(values: dict[str, Any], ranges: dict[str, tuple[float, float]]) -> tuple[dict[str, Any], list[str]]:
    """Values outside their control's range set to the nearest end, with one note per change
    (a pasted infotext can hold sizes or steps the sliders do not reach)."""
    values, notes = dict(values), []
    for name, (low, high) in ranges.items():
        value = values.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value <= high:
            values[name] = type(value)(min(max(value, low), high))
            notes.append(f"{name.replace('_', ' ')} {value} is outside {low:g}-{high:g}: set to {values[name]}")
    return values, notes


def pasted_names(page: dict[str, Any]) -> list[str]:
    """The page's controls a pasted infotext sets: the request fields and the ControlNet units' settings."""
    return [name for name in page if not name.startswith("_")] + controlnet_panel.pasted_names(page)


def paste_infotext(page: dict[str, Any], current: dict[str, Any], text: str) -> dict[str, Any]:
    """A pasted infotext's fields over a page's current values (by field name), numbers clamped to
    their sliders' ranges with a warning that names each; its `ControlNet N` entries set the units."""
    values = {**current, **{k: v for k, v in fields_from_infotext(text).items() if k in current}}
    ranges = {name: (page[name].minimum, page[name].maximum) for name in values
              if isinstance(page.get(name), gr.Slider) and not name.startswith("_")}
    values, notes = clamp_to_ranges(values, ranges)
    if notes:
        gr.Warning("Pasted parameters changed to fit the controls: " + "; ".join(notes))
    units = controlnet_panel.pasted_values(text, controlnet_panel.unit_count(page))
    values.update({k: v for k, v in units.items() if k in current})
    return values
