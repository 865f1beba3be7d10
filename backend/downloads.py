"""First-use downloads of the standard face restoration, upscaler and annotator weights, as A1111 does.

Only the files below and the annotators' (`annotators`), only from their official URLs, and only when
the settings allow it (`--no-download` turns it off; tests never download). The file streams into
`<name>.part` beside its destination while its sha256 is computed, then replaces nothing until the
checksum matches: a half-written or wrong file never takes the name of a good one. Offline, the error
says which file to put where.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from backend.errors import UnavailableError

logger = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class StandardModel:
    filename: str
    url: str
    sha256: str
    folder: str  # a `Settings.model_dir` kind


STANDARD_MODELS = {
    model.filename: model
    for model in (
        StandardModel("GFPGANv1.4.pth", "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth",
                      "e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad", "gfpgan"),
        StandardModel("GFPGANv1.3.pth", "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.3.pth",
                      "c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70", "gfpgan"),
        StandardModel("codeformer-v0.1.0.pth",
                      "https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth",
                      "1009e537e0c2a07d4cabce6355f53cb66767cd4b4297ec7a4a64ca4b8a5684b7", "codeformer"),
        StandardModel("detection_Resnet50_Final.pth",
                      "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
                      "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d", "gfpgan"),
        StandardModel("RealESRGAN_x4plus.pth",
                      "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
                      "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1", "realesrgan"),
        StandardModel("RealESRGAN_x4plus_anime_6B.pth",
                      "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
                      "f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da", "realesrgan"),
    )
}


class DownloadError(UnavailableError):
    """A standard model could not be fetched; the message says which file to put where."""


def fetch(url: str, destination: Path, sha256: str, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download `url` to `destination`, checked against `sha256`; returns `destination`."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    digest = hashlib.sha256()
    logger.info("Downloading %s to %s", url, destination)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            bar = _progress_bar(destination.name, total) if progress else None
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
    except (urllib.error.URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"could not download {url} ({error})") from None
    if digest.hexdigest() != sha256.lower():
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{url} downloaded with sha256 {digest.hexdigest()}, expected {sha256}: the download "
                            "was damaged or the file changed; nothing was saved")
    os.replace(partial, destination)
    return destination


def _progress_bar(name: str, total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total or None, unit="B", unit_scale=True, desc=name, file=sys.stderr)


def ensure(filename: str, folder: Path, allowed: bool) -> Path:
    """The path of a standard model in `folder`, downloaded first when missing and `allowed`."""
    return ensure_file(STANDARD_MODELS[filename], folder, allowed)


def ensure_file(model: StandardModel, folder: Path, allowed: bool) -> Path:
    """`model`'s file in `folder`, downloaded first when missing and `allowed` (for files whose names
    are not unique across models, such as an annotator's `model.safetensors`)."""
    filename = model.filename
    path = Path(folder) / filename
    if path.exists():
        return path
    place = f"download {model.url} and put it in {folder} as {filename}"
    if not allowed:
        raise DownloadError(f"{filename} is not in {folder} and downloads are off: {place}")
    try:
        return fetch(model.url, path, model.sha256)
    except DownloadError as error:
        raise DownloadError(f"{error}. Offline? {place}") from None
