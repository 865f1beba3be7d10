"""Shared fixtures: tiny SD 1.x / 2.x / SDXL models with random weights, written once per session in
the formats users download, and a model folder layout like A1111's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from backend import random_models
from backend.model_manager import ModelManager
from backend.settings import Settings

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory) -> Path:
    from backend.clip_tokenizer import ensure_vocabulary_files

    folder = tmp_path_factory.mktemp("cache")
    ensure_vocabulary_files(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    """{"sd1": components, "sd2": ..., "sdxl": ..., "sd1-inpaint": ...} with random weights."""
    return {
        "sd1": random_models.build("sd1", seed=1),
        "sd2": random_models.build("sd2", seed=2),
        "sdxl": random_models.build("sdxl", seed=3),
        "sd1-inpaint": random_models.build("sd1", seed=4, in_channels=9),
    }


@pytest.fixture(scope="session")
def model_files(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """The tiny models as files: original-layout .safetensors and .ckpt, and a diffusers folder."""
    root = tmp_path_factory.mktemp("model-files")
    files = {
        "sd1": random_models.save_original(tiny_models["sd1"], root / "tiny-sd1.safetensors"),
        "sd1-ckpt": random_models.save_original(tiny_models["sd1"], root / "tiny-sd1-ckpt.ckpt"),
        "sd1-fp16": random_models.save_original(tiny_models["sd1"], root / "tiny-sd1-fp16.safetensors", torch.float16),
        "sd2": random_models.save_original(tiny_models["sd2"], root / "tiny-sd2.safetensors"),
        "sdxl": random_models.save_original(tiny_models["sdxl"], root / "tiny-sdxl.safetensors"),
        "sd1-inpaint": random_models.save_original(tiny_models["sd1-inpaint"], root / "tiny-sd1-inpaint.safetensors"),
        "sd1-diffusers": random_models.save_diffusers(tiny_models["sd1"], root / "tiny-sd1-diffusers"),
    }
    return files


@pytest.fixture(scope="session")
def face_model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """models/GFPGAN and models/Codeformer folders holding GFPGANv1.4.pth and codeformer-v0.1.0.pth
    (random weights, released layout)."""
    root = tmp_path_factory.mktemp("face-models")
    random_models.save_face_restorers(root / "GFPGAN", root / "Codeformer")
    return root / "GFPGAN", root / "Codeformer"


@pytest.fixture
def settings(tmp_path, tokenizer_cache) -> Settings:
    """An empty data folder; the tokenizer vocabulary cache is shared across tests."""
    settings = Settings(data_dir=tmp_path)
    settings.cache_dir.mkdir(parents=True)
    shutil.copytree(tokenizer_cache, settings.cache_dir, dirs_exist_ok=True)
    return settings


def install(settings: Settings, source: Path, name: str | None = None) -> Path:
    """Put a model file (or diffusers folder) into the checkpoints folder."""
    folder = settings.model_dir("checkpoints")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or source.name)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy(source, target)
    return target


@pytest.fixture
def sd1_manager(settings, model_files) -> ModelManager:
    install(settings, model_files["sd1"])
    return ModelManager(settings)
