"""Saving images: `outputs/<kind>-images/YYYY-MM-DD/NNNNN-SEED.png`, numbered so nothing is ever
overwritten, with the infotext in a `parameters` PNG text chunk, written to a temporary file first;
`ImageSaver` keeps a job going when its folder cannot be written.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from PIL import Image, PngImagePlugin

logger = logging.getLogger(__name__)

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

    Both files are written to temporaries first; the PNG is then hard-linked to its final name, which
    fails instead of replacing a file that appeared meanwhile. Files get the mode `open()` gives
    (0666 less the umask). A failed save raises OSError and leaves no file behind: no temporary, no
    partial PNG, no `.txt` without its PNG.
    """
    day = (now or dt.datetime.now()).strftime("%Y-%m-%d")
    target_dir = Path(folder) / day
    target_dir.mkdir(parents=True, exist_ok=True)
    temporaries: list[Path] = []
    try:
        png = _write_temporary(target_dir, ".png", temporaries,
                               lambda handle: image.save(handle, format="PNG", pnginfo=png_info(infotext, chunks)))
        text = None
        if save_txt and infotext:
            text = _write_temporary(target_dir, ".txt", temporaries, lambda handle: handle.write(infotext.encode("utf-8")))
        path = _claim_name(png, target_dir, f"{name or seed}.png")
        if text is not None:
            try:
                os.replace(text, path.with_suffix(".txt"))
            except OSError:
                path.unlink(missing_ok=True)  # a PNG without the .txt asked for counts as not saved
                raise
        return path
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def _write_temporary(folder: Path, suffix: str, temporaries: list[Path], write: Callable) -> Path:
    """A new `.saving-<random><suffix>` file in `folder`, filled by `write(handle)`. os.open with 0666
    applies the umask by itself, as open() does (mkstemp would make it 0600)."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = folder / f".saving-{secrets.token_hex(8)}{suffix}"
        try:
            fd = os.open(path, flags, 0o666)
        except FileExistsError:
            continue
        temporaries.append(path)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        return path
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder))


def _claim_name(temporary: Path, folder: Path, tail: str) -> Path:
    """Give `temporary` the next free `NNNNN-<tail>` name in `folder`, never replacing a file."""
    number = next_number(folder)
    while True:
        path = folder / f"{number:05d}-{tail}"
        try:
            os.link(temporary, path)
            return path
        except FileExistsError:
            number += 1
        except OSError:  # no hard links here (FAT, some shares); a real failure fails os.replace too
            if path.exists():
                number += 1
                continue
            os.replace(temporary, path)
            return path


class ImageSaver:
    """Saves one job's images in `folder`. A failed save (read-only folder, full disk) loses the file,
    never the image: it is logged, named once per job in `warnings`, and the next images still try."""

    def __init__(self, folder: Path, warnings: list[str]):
        self.folder, self.warnings = Path(folder), warnings
        self.failed = False

    def save(self, image: Image.Image, seed: int, infotext: str | None, now: dt.datetime | None = None,
             name: str | None = None, save_txt: bool = False) -> Path | None:
        """The saved PNG's path, or None when saving failed."""
        try:
            return save_image(image, self.folder, seed, infotext, now, name=name, save_txt=save_txt)
        except OSError as error:
            logger.warning("could not save image (seed %s) in %s: %s", seed, self.folder, error)
            if not self.failed:
                self.failed = True
                self.warnings.append(f"saving failed: {error.strerror or error}; "
                                     f"the images are returned but not saved in {self.folder}")
            return None


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
