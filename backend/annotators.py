"""Annotators: the models behind model-based ControlNet preprocessors. Which files each needs, where they
live (`models/annotators/<name>/`), their first-use download (pinned sha256, through `downloads`), and
the loaded models, shared by the API, the preview and generation."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from backend import control_preprocessors, devices, downloads
from backend.downloads import StandardModel
from backend.errors import ModelFileError
from backend.settings import Settings

logger = logging.getLogger(__name__)

_DEPTH_ANYTHING_V2_SMALL = "https://huggingface.co/depth-anything/Depth-Anything-V2-Small-hf/resolve/" \
                           "5426e4f0f36572d16453bbda7a8389317b1bef99/"  # a pinned revision: the hashes hold


@dataclass(frozen=True)
class Annotator:
    """A preprocessor model: its folder's name under models/annotators, its files, and how to load them."""

    name: str
    files: tuple[StandardModel, ...]
    load: Callable[[Path, torch.device], torch.nn.Module]


def _load_depth_anything(folder: Path, device: torch.device) -> torch.nn.Module:
    from safetensors import SafetensorError
    from transformers import DepthAnythingForDepthEstimation

    try:
        model, info = DepthAnythingForDepthEstimation.from_pretrained(folder, local_files_only=True,
                                                                      output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as error:
        raise ModelFileError(f"the Depth Anything model in {folder} could not be loaded ({error}); delete its "
                             "files to download them again") from None
    if info.get("missing_keys"):
        raise ModelFileError(f"{folder / 'model.safetensors'} does not fit its config.json as a Depth Anything "
                             f"model (missing {len(info['missing_keys'])} weights, e.g. "
                             f"{sorted(info['missing_keys'])[0]}); delete both files to download them again")
    return model.eval().to(device)


DEPTH_ANYTHING_V2 = Annotator("depth_anything_v2", (
    StandardModel("config.json", _DEPTH_ANYTHING_V2_SMALL + "config.json",
                  "c56698d3643dde1f83ea2212759e6b31a22b8f827246a36dd007ee8a22b3ff75", "annotators"),
    StandardModel("model.safetensors", _DEPTH_ANYTHING_V2_SMALL + "model.safetensors",  # 99,173,660 bytes
                  "3152477ce0d8d6978d76b995120de97cb5b928701fd0f817769f59e249a16b70", "annotators"),
), _load_depth_anything)

ANNOTATORS = {"depth_anything_v2": DEPTH_ANYTHING_V2}  # by preprocessor module name


def annotator_for(module: str) -> Annotator | None:
    """The annotator a module (by name or label) runs; None for a module that needs no model."""
    spec = control_preprocessors.get_module(module)
    return ANNOTATORS.get(spec.name) if spec.needs_weights else None


def folder_of(annotator: Annotator, settings: Settings) -> Path:
    return settings.model_dir("annotators") / annotator.name


def ensure_files(annotator: Annotator, settings: Settings) -> Path:
    """The annotator's folder with all its files, downloading those missing when downloads are allowed;
    files already there are used as they are."""
    folder = folder_of(annotator, settings)
    for file in annotator.files:
        try:
            downloads.ensure_file(file, folder, settings.allow_downloads)
        except downloads.DownloadError as error:
            raise downloads.DownloadError(f"the {annotator.name} preprocessor needs its model: {error}") from None
    return folder


class LoadedAnnotators:
    """Annotator models loaded once and shared: at most `size`, least recently used dropped first, keyed by
    the files' identity (path, size, modification time) and the device, so a replaced file loads again."""

    def __init__(self, size: int = 2):
        self.size = size
        self._models: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, annotator: Annotator, folder: Path, device: torch.device) -> torch.nn.Module:
        stats = [(folder / f.filename).stat() for f in annotator.files]
        place = (annotator.name, str(folder.resolve()), str(device))
        key = (*place, tuple((s.st_size, s.st_mtime_ns) for s in stats))
        with self._lock:
            if key not in self._models:
                for stale in [k for k in self._models if k[:3] == place]:  # files replaced since: free first
                    del self._models[stale]
                while len(self._models) >= self.size:
                    self._models.popitem(last=False)
                logger.info("Loading the %s preprocessor model from %s", annotator.name, folder)
                self._models[key] = annotator.load(folder, device)
                self.loads += 1
            self._models.move_to_end(key)
            return self._models[key]

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


# The process's loaded annotators: a cache keyed by the files' identity, like a memoised loader, so the API,
# the preview and generation share one load without an owner having to pass it down to each.
LOADED = LoadedAnnotators()


def weights_for(module: str, settings: Settings, device: torch.device | str | None = None,
                loaded: LoadedAnnotators | None = None) -> torch.nn.Module | None:
    """The loaded model a preprocessor module needs (downloaded first when missing and allowed), or None for
    a module that needs none. `device`: where it runs (default: the settings' device)."""
    annotator = annotator_for(module)
    if annotator is None:
        return None
    folder = ensure_files(annotator, settings)
    device = torch.device(device) if device is not None else devices.pick_device(settings.device)
    return (LOADED if loaded is None else loaded).get(annotator, folder, device)
