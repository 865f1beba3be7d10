"""The model manager: idempotent activation, LRU cache, real frees, refresh, failures that keep the
previous model usable, VAE choice, and the on-disk hash cache."""

import builtins
import gc
import os
import pickle
import re
import shutil

import psutil
import pytest
import torch

from backend.checkpoints import CheckpointLoadError, UnsafeCheckpointError
from backend.model_detection import CheckpointFormatError
from backend.model_index import HashCache, ModelNotFoundError
from backend.model_manager import ModelManager, NoCheckpointError, load_components
from tests.conftest import install


class CountingLoader:
    def __init__(self):
        self.calls = []

    def __call__(self, file, cache_dir, dtype, parts=None):
        self.calls.append(file.name)
        return load_components(file, cache_dir, dtype, parts)


def manager_with(settings, model_files, names, **changes):
    for name in names:
        install(settings, model_files[name])
    loader = CountingLoader()
    return ModelManager(settings.with_changes(**changes), loader=loader), loader


def test_activate_is_idempotent_and_keyed_by_name(settings, model_files):
    manager, loader = manager_with(settings, model_files, ["sd1", "sd2"])
    first = manager.activate("tiny-sd1")
    assert manager.activate("tiny-sd1") is first
    assert manager.activate("tiny-sd1.safetensors") is first  # file name
    assert manager.activate(f"tiny-sd1.safetensors [{first.model_hash}]") is first  # A1111 title
    assert manager.activate(first.model_hash) is first  # short hash
    assert manager.activate() is first  # None: keep the active one
    assert loader.calls == ["tiny-sd1"]


def test_lru_keeps_a_small_cache_and_evicts_the_oldest(settings, model_files):
    manager, loader = manager_with(settings, model_files, ["sd1", "sd2", "sdxl"], checkpoint_cache_size=2)
    manager.activate("tiny-sd1")
    manager.activate("tiny-sd2")
    manager.activate("tiny-sd1")  # cached: no load, becomes most recent
    assert loader.calls == ["tiny-sd1", "tiny-sd2"]
    manager.activate("tiny-sdxl")  # evicts tiny-sd2, the least recently used
    assert manager.loaded == ["tiny-sd1", "tiny-sdxl"]
    manager.activate("tiny-sd2")
    assert loader.calls == ["tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-sd2"]
    assert manager.active.family == "sd2"


def test_default_cache_size_is_one_as_in_a1111(settings, model_files):
    manager, loader = manager_with(settings, model_files, ["sd1", "sd2"])
    manager.activate("tiny-sd1")
    manager.activate("tiny-sd2")
    assert manager.loaded == ["tiny-sd2"]


def test_evicted_models_are_freed(settings, model_files):
    import weakref

    manager, _ = manager_with(settings, model_files, ["sd1", "sd2"])
    unet = weakref.ref(manager.activate("tiny-sd1").unet)
    manager.activate("tiny-sd2")
    gc.collect()
    assert unet() is None


def test_switching_back_and_forth_does_not_grow_memory(settings, model_files):
    manager, loader = manager_with(settings, model_files, ["sd1", "sd2"])
    process = psutil.Process()
    for name in ("tiny-sd1", "tiny-sd2") * 2:  # warm up allocator pools
        manager.activate(name)
    gc.collect()
    before = process.memory_info().rss
    for name in ("tiny-sd1", "tiny-sd2") * 5:
        manager.activate(name)
    gc.collect()
    growth = process.memory_info().rss - before
    model_bytes = sum(p.numel() * p.element_size() for p in manager.active.unet.parameters())
    model_bytes += sum(p.numel() * p.element_size() for e in manager.active.text_encoders for p in e.parameters())
    assert len(loader.calls) == 14
    # 10 leaked loads would be 10 model copies; allow a fraction of one for allocator noise.
    assert growth < max(3 * model_bytes, 24 * 2**20), f"RSS grew by {growth / 2**20:.1f} MiB over 10 switches"


def test_missing_checkpoint_lists_what_is_available(settings, model_files):
    manager, _ = manager_with(settings, model_files, ["sd1", "sd2"])
    with pytest.raises(ModelNotFoundError, match=r"'nope' not found in .*Stable-diffusion; available: "
                                                 r"tiny-sd1.safetensors, tiny-sd2.safetensors"):
        manager.activate("nope")


def test_empty_folder_says_where_to_put_models(settings):
    with pytest.raises(NoCheckpointError, match="no checkpoints found in .*Stable-diffusion"):
        ModelManager(settings).activate()


def test_refresh_finds_new_files_without_restart(settings, model_files):
    manager, _ = manager_with(settings, model_files, ["sd1"])
    with pytest.raises(ModelNotFoundError):
        manager.activate("tiny-sd2")
    install(settings, model_files["sd2"])
    manager.refresh()
    assert manager.activate("tiny-sd2").family == "sd2"


def test_subfolders_and_diffusers_folders_are_listed(settings, model_files):
    (settings.model_dir("checkpoints") / "anime").mkdir(parents=True)
    install(settings, model_files["sd1"], "anime/tiny-sd1.safetensors")
    install(settings, model_files["sd1-diffusers"])
    manager = ModelManager(settings)
    assert [f.name for f in manager.index.checkpoints] == ["anime/tiny-sd1", "tiny-sd1-diffusers"]
    assert manager.activate("tiny-sd1-diffusers").model_hash is None
    assert manager.activate("anime/tiny-sd1").family == "sd1"


def test_bad_file_keeps_the_previous_model_active(settings, model_files, tmp_path):
    manager, loader = manager_with(settings, model_files, ["sd1"])
    good = manager.activate("tiny-sd1")
    folder = settings.model_dir("checkpoints")
    data = model_files["sd1"].read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    (folder / "garbage.ckpt").write_bytes(b"\x00" * 1000)
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, folder / "partial.ckpt")
    manager.refresh()
    with pytest.raises(CheckpointLoadError, match="truncated.safetensors"):
        manager.activate("truncated")
    assert manager.active is good
    with pytest.raises(CheckpointLoadError, match="garbage.ckpt"):
        manager.activate("garbage")
    assert manager.active.name == "tiny-sd1"
    with pytest.raises(CheckpointFormatError, match="partial.ckpt"):
        manager.activate("partial")
    assert manager.active.name == "tiny-sd1"


class _PrintPayload:
    """Plain unpickling would call print on a harmless line; weights-only unpickling must refuse it."""

    def __reduce__(self):
        return (builtins.print, ("easel-test: the pickle ran code",))


class _ShellPayload:
    """Plain unpickling would run a harmless `echo`; weights-only unpickling must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo easel-test: the pickle ran a shell",))


CODE_CKPTS = [
    # (file name, what writes it, what the message says was refused)
    ("print-payload.ckpt", lambda path: torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _PrintPayload()}, path),
     "GLOBAL print was not an allowed global"),
    ("shell-payload.ckpt", lambda path: path.write_bytes(pickle.dumps({"x": _ShellPayload()}, protocol=2)),
     "GLOBAL (posix|nt).system whose module (posix|nt) is blocked"),
]


@pytest.mark.parametrize("name, write, refused", CODE_CKPTS)
def test_ckpt_that_holds_code_is_refused_runs_nothing_and_keeps_the_model(settings, model_files, capfd,
                                                                          name, write, refused):
    manager, _ = manager_with(settings, model_files, ["sd1"])
    good = manager.select("tiny-sd1")
    write(settings.model_dir("checkpoints") / name)
    manager.refresh()
    message = rf"refused to load {re.escape(name)}: it holds code.*\([^)]*{refused}[^)]*\)\..*convert it to \.safetensors"
    with pytest.raises(CheckpointLoadError, match=message) as refusal:
        manager.select(name.removesuffix(".ckpt"))
    assert isinstance(refusal.value, UnsafeCheckpointError)
    assert "\x1b" not in str(refusal.value) and "weights_only" not in str(refusal.value)
    assert "easel-test" not in capfd.readouterr().out
    assert manager.active.name == "tiny-sd1" and manager.selected == good.file.filename


MALFORMED_CKPTS = [
    # (file name, pickle bytes, the error torch's unpickler raises on them)
    ("stack-underflow.ckpt", b"\x80\x02R.", "IndexError: pop from empty list"),
    ("missing-memo.ckpt", b"\x80\x02h\x05.", "KeyError: 5"),
    ("wrong-arguments.ckpt", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R.", "TypeError: _rebuild_tensor_v2"),
    ("unhashable-key.ckpt", b"\x80\x02}]K\x01s.", "TypeError: unhashable type"),
]


@pytest.mark.parametrize("name, data, error", MALFORMED_CKPTS)
def test_malformed_pickle_is_a_load_error_naming_the_file(settings, model_files, name, data, error):
    manager, _ = manager_with(settings, model_files, ["sd1"])
    manager.select("tiny-sd1")
    (settings.model_dir("checkpoints") / name).write_bytes(data)
    manager.refresh()
    with pytest.raises(CheckpointLoadError, match=rf"{re.escape(name)}: its pickle is malformed \({error}"):
        manager.select(name.removesuffix(".ckpt"))
    assert manager.active.name == "tiny-sd1"


def test_vae_choice_automatic_none_and_file(settings, model_files, tiny_models):
    from safetensors.torch import save_file

    from backend import ldm_layout

    manager, _ = manager_with(settings, model_files, ["sd1"])
    model = manager.activate("tiny-sd1")
    baked = model.vae
    other = {k: v + 0.01 for k, v in tiny_models["sd1"]["vae"].state_dict().items()}
    vae_dir = settings.model_dir("vae")
    vae_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ldm_layout.vae_to_ldm(other, prefix="").items()},
              vae_dir / "better.safetensors")
    manager.refresh()
    assert manager.vae_options() == ["Automatic", "None", "better.safetensors"]
    manager.set_vae("better.safetensors")
    assert model.vae is not baked and model.vae_name == "better.safetensors" and len(model.vae_hash) == 10
    assert torch.allclose(model.vae.encoder.conv_in.weight, baked.encoder.conv_in.weight + 0.01)
    manager.set_vae("None")
    assert model.vae is baked and model.vae_name is None
    # Automatic picks <checkpoint>.vae.safetensors beside the checkpoint when there is one
    shutil.copy(vae_dir / "better.safetensors", settings.model_dir("checkpoints") / "tiny-sd1.vae.safetensors")
    manager.refresh()
    manager.set_vae("Automatic")
    assert model.vae_name == "tiny-sd1.vae.safetensors"
    assert [f.name for f in manager.index.checkpoints] == ["tiny-sd1"]  # the sidecar is not a checkpoint
    with pytest.raises(ModelNotFoundError, match="VAE 'missing' not found.*available: better.safetensors"):
        manager.set_vae("missing")


def test_hash_cache_hashes_each_file_once(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"abc" * 1000)
    cache = HashCache(tmp_path / "cache" / "hashes.json")
    first = cache.short_hash(path)
    assert first == __import__("hashlib").sha256(b"abc" * 1000).hexdigest()[:10]
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    assert HashCache(tmp_path / "cache" / "hashes.json").short_hash(path) == first  # from disk, not rehashed
    assert path not in opened and str(path) not in map(str, opened)
    path.write_bytes(b"changed")
    assert HashCache(tmp_path / "cache" / "hashes.json").short_hash(path) != first
