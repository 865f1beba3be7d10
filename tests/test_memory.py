"""Memory as a path, on the shipped default model: an out-of-memory error in the UNet is retried once with
attention in slices (same image, a warning), a second one keeps the finished images; the VAE decodes image by
image and falls back to tiles; every sampler steps a batch as it steps each image alone; speed options keep
the image."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from backend import generation, memory_fallback, vae_codec
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from backend.samplers import SAMPLER_NAMES
from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@pytest.fixture(scope="module")
def manager(tmp_path_factory, tokenizer_cache) -> ModelManager:
    data = tmp_path_factory.mktemp("memory")
    folder = data / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "models" / "Stable-diffusion" / "easel-shapes.safetensors", folder)
    shutil.copytree(tokenizer_cache, data / "cache", dirs_exist_ok=True)
    return ModelManager(Settings(data_dir=data))


def run(manager, **fields):
    request = GenerationRequest(**{"prompt": "a large red star on a blue background, center", "width": 64,
                                   "height": 64, "steps": 6, "seed": 5, "save_images": False, **fields})
    return generation.generate(manager, request)


def pixels(image) -> np.ndarray:
    return np.asarray(image.image, dtype=np.int16)


def failing(module, method: str, monkeypatch, times: int | None = 1):
    """Make `module.method` raise CUDA's out-of-memory error on its first `times` calls (None: always)."""
    real, calls = getattr(module, method), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if times is None or calls["n"] <= times:
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, method, wrapped)
    return calls


def test_out_of_memory_in_the_unet_is_retried_with_sliced_attention(manager, monkeypatch):
    reference = run(manager)
    unet = manager.active.unet
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    failing(unet, "forward", monkeypatch)
    retried = run(manager)
    assert np.abs(pixels(retried.images[0]) - pixels(reference.images[0])).max() <= 1
    assert any("out of memory during sampling: retried with attention in slices" in w for w in retried.warnings)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors  # slicing was for that job


def test_a_second_out_of_memory_keeps_the_finished_images_or_names_the_remedies(manager, monkeypatch):
    unet = manager.active.unet
    real_forward, real_decode = unet.forward, vae_codec.decode
    state = {"decoded": False}

    def forward(*args, **kwargs):  # runs out of memory once the first image is done
        if state["decoded"]:
            raise OOM("CUDA out of memory")
        return real_forward(*args, **kwargs)

    def decode(*args, **kwargs):
        images = real_decode(*args, **kwargs)
        state["decoded"] = True
        return images

    monkeypatch.setattr(unet, "forward", forward)
    monkeypatch.setattr(vae_codec, "decode", decode)
    result = run(manager, batch_count=3)
    assert len(result.images) == 1
    assert any("images finished before are kept" in w and "--medvram" in w for w in result.warnings)
    with pytest.raises(memory_fallback.OutOfMemoryError, match="lower the size or the batch size"):
        run(manager)  # nothing finished: the error, naming the remedies


def test_the_vae_decodes_image_by_image_and_falls_back_to_tiles(manager, monkeypatch):
    run(manager)
    model = manager.active
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).to(model.dtype)
    alone = [np.asarray(vae_codec.decode(model, latents[i:i + 1])[0], dtype=np.int16) for i in range(2)]
    sizes = []
    real_decode = model.vae.decode
    monkeypatch.setattr(model.vae, "decode", lambda z: sizes.append(len(z)) or real_decode(z))
    together = [np.asarray(image, dtype=np.int16) for image in vae_codec.decode(model, latents)]
    assert sizes == [2] and all(np.abs(a - b).max() <= 1 for a, b in zip(alone, together))  # small: together
    monkeypatch.setattr(vae_codec, "GROUP_PIXELS", 16 * 16)  # as for images of 512x512 and more: one by one
    sizes.clear()
    one_by_one = [np.asarray(image, dtype=np.int16) for image in vae_codec.decode(model, latents)]
    assert sizes == [1, 1] and all(np.array_equal(a, b) for a, b in zip(alone, one_by_one))
    monkeypatch.setattr(model.vae, "decode", real_decode)
    failing(model.vae, "decode", monkeypatch)
    warnings: list[str] = []
    tiled = np.asarray(vae_codec.decode(model, latents[:1], warnings)[0], dtype=np.int16)
    assert warnings and "done in tiles instead" in warnings[0]
    assert np.abs(tiled - alone[0]).mean() < 2  # this latent fits one tile: the same decode


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_gives_each_image_of_a_batch_as_alone(manager, sampler):
    batch = run(manager, sampler=sampler, batch_size=2, steps=4, seed=40)
    alone = run(manager, sampler=sampler, steps=4, seed=41)
    difference = np.abs(pixels(batch.images[1]) - pixels(alone.images[0]))
    if sampler == "DPM adaptive":  # its step sizes follow the error of the whole batch (as in A1111): close only
        assert difference.mean() < 2
    else:
        assert difference.max() <= 1


def test_channels_last_keeps_the_image_and_compile_is_applied_in_place(manager):
    reference = run(manager)
    model = manager.active
    manager.set_speed(compiled=False, channels_last=True)
    conv = model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert np.abs(pixels(run(manager).images[0]) - pixels(reference.images[0])).max() <= 1
    manager.set_speed(compiled=True, channels_last=False)
    assert model.unet._compiled_call_impl is not None and model.unet.conv_in.weight.is_contiguous()
    manager.set_speed(compiled=False, channels_last=False)  # back to eager, without running the compiler here
    assert model.unet._compiled_call_impl is None


def test_large_images_are_decoded_in_tiles_automatically_and_match(manager, monkeypatch):
    from backend import vae_tiling

    reference = run(manager, width=128, height=96)
    calls = []
    real = vae_tiling.decode_tiled
    monkeypatch.setattr(vae_tiling, "decode_tiled", lambda vae, z, **kw: calls.append(z.shape) or real(
        vae, z, tile=16, overlap=12))  # small tiles, so a 128x96 image needs several
    monkeypatch.setattr(vae_codec, "AUTO_TILE_PIXELS", 64 * 64)  # "large" from 64x64 on, for the test
    tiled = run(manager, width=128, height=96)
    assert calls and np.abs(pixels(tiled.images[0]) - pixels(reference.images[0])).max() <= 2
    manager.set_vae_tiling("Never")
    calls.clear()
    run(manager, width=128, height=96)
    assert not calls
    manager.set_vae_tiling("Automatic")
