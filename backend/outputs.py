"""Saving images: `outputs/<kind>-images/YYYY-MM-DD/NNNNN-SEED.png`, numbered so nothing is ever
overwritten, with the infotext in a `parameters` PNG text chunk, written to a temporary file first.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

_NUMBERED = re.compile(r"^(\d+)-")
_TAG = re.compile(r"\[(\w+)\]")
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
MAX_NAME = 120
DEFAULT_PATTERN = "[seed]"


def expand_filename_pattern(pattern: str, values: dict[str, object]) -> str:
    """A1111's "Images filename pattern": `[seed]`, `[prompt]`, `[model_name]`... replaced by `values`
    (unknown tags stay as written), made safe for every file system and cut to a sane length."""
    def tag(match: re.Match) -> str:
        value = values.get(match.group(1).lower())
        return match.group(0) if value is None else str(value)

    name = _UNSAFE.sub("", _TAG.sub(tag, pattern or DEFAULT_PATTERN))
    name = " ".join(name.split())[:MAX_NAME].strip(" .")
    return name or str(values.get("seed", "image"))


def filename_values(prompt: str, seed: int, model_name: str, sampler: str, steps: int, cfg_scale: float,
                    width: int, height: int, now: dt.datetime) -> dict[str, object]:
    words = " ".join(prompt.split())
    return {
        "seed": seed, "prompt": words, "prompt_spaces": words, "prompt_words": " ".join(re.findall(r"[\w']+", prompt)),
        "prompt_no_styles": words, "model_name": model_name, "sampler": sampler, "steps": steps,
        "cfg": f"{cfg_scale:g}", "width": width, "height": height,
        "datetime": now.strftime("%Y%m%d%H%M%S"), "date": now.strftime("%Y-%m-%d"),
    }


def next_number(folder: Path) -> int:
    """One past the highest NNNNN- prefix in the folder (0 for an empty or missing one)."""
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := _NUMBERED.match(name))]
    return max(numbers, default=-1) + 1


def png_info(infotext: str | None, chunks: dict[str, str] | None = None) -> PngImagePlugin.PngInfo:
    """PNG text chunks: `parameters` (the infotext) and any others (Extras' `postprocessing`)."""
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    for key, value in (chunks or {}).items():
        info.add_text(key, value)
    return info


def save_image(
    image: Image.Image,
    folder: Path,
    seed: int,
    infotext: str | None,
    now: dt.datetime | None = None,
    name: str | None = None,
    save_txt: bool = False,
    chunks: dict[str, str] | None = None,
) -> Path:
    """Write `image` as the next numbered PNG (`NNNNN-<name or seed>.png`) in `folder/<date>/` and
    return its path; with `save_txt`, the infotext also goes to a `.txt` file of the same name.

    The PNG is written to a temporary file and then hard-linked to its final name, which fails
    instead of replacing a file that appeared meanwhile; a failed write leaves no partial file.
    """
    day = (now or dt.datetime.now()).strftime("%Y-%m-%d")
    target_dir = Path(folder) / day
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=".saving-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=png_info(infotext, chunks))
        number = next_number(target_dir)
        while True:
            path = target_dir / f"{number:05d}-{name or seed}.png"
            try:
                os.link(tmp, path)
                if save_txt and infotext:
                    _write_text(path.with_suffix(".txt"), infotext)
                return path
            except FileExistsError:
                number += 1
            except OSError:  # file systems without hard links
                if path.exists():
                    number += 1
                    continue
                os.replace(tmp, path)
                if save_txt and infotext:
                    _write_text(path.with_suffix(".txt"), infotext)
                return path
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".saving-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_infotext(image: Image.Image) -> str | None:
    """The infotext of an image: the PNG `parameters` chunk, or EXIF UserComment (JPEG/WebP)."""
    text = image.info.get("parameters")
    if text:
        return text
    exif = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD -> UserComment
    if isinstance(exif, bytes):
        if exif.startswith(b"UNICODE\0"):
            return exif[8:].decode("utf-16-be", errors="ignore")
        return exif.split(b"\0", 1)[-1].decode("utf-8", errors="ignore")
    return exif or None
