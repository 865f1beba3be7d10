"""Upscalers: random-weight models in the official files' layouts (RealESRGAN_x4plus RRDBNet with
`params_ema`, realesr-general SRVGGNetCompact with `params`), loaded through spandrel like real files;
tiling, exact target sizes, resamplers, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from backend.random_models import compact_state, rrdbnet_state
from backend.upscalers import TileSettings, UpscalerError, UpscalerLibrary, load_model, tiled_apply


@pytest.fixture
def library(tmp_path) -> UpscalerLibrary:
    esrgan, realesrgan = tmp_path / "ESRGAN", tmp_path / "RealESRGAN"
    esrgan.mkdir()
    realesrgan.mkdir()
    torch.save({"params_ema": rrdbnet_state()}, realesrgan / "RealESRGAN_x4plus.pth")
    torch.save({"params": compact_state()}, realesrgan / "realesr-general-x4v3.pth")
    torch.save({"params_ema": rrdbnet_state(seed=5)}, esrgan / "4x_MyFavourite.pth")
    return UpscalerLibrary([esrgan, realesrgan])


def photo(width: int = 40, height: int = 28) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


def test_official_layouts_load_with_a1111_names(library):
    assert library.names == ["None", "Lanczos", "Nearest", "4x_MyFavourite", "R-ESRGAN 4x+", "R-ESRGAN General 4xV3"]
    for name in library.names[3:]:
        descriptor = library.model(library.find(name))
        assert descriptor.scale == 4
        out = descriptor(torch.rand(1, 3, 12, 10))
        assert out.shape == (1, 3, 48, 40) and torch.isfinite(out).all()
    assert library.find("RealESRGAN_x4plus").name == "R-ESRGAN 4x+"  # the file stem works too
    assert library.loads == 3
    library.model(library.find("R-ESRGAN General 4xV3"))  # still loaded: not read again
    assert library.loads == 3


@pytest.mark.parametrize("scale", [1.5, 2, 3.3, 4])
def test_exact_target_sizes(library, scale):
    image = photo()
    out = library.upscale(image, "R-ESRGAN 4x+", scale=scale)
    assert out.size == (round(40 * scale), round(28 * scale)) and out.mode == "RGB"
    assert library.upscale(image, "Lanczos", size=(97, 31)).size == (97, 31)


def test_two_passes_when_the_scale_needs_them(library):
    assert library.upscale(photo(12, 10), "R-ESRGAN General 4xV3", scale=8).size == (96, 80)


def test_resamplers_are_exact(library):
    image = photo(10, 6)
    assert np.array_equal(np.asarray(library.upscale(image, "Nearest", scale=3)),
                          np.asarray(image).repeat(3, 0).repeat(3, 1))
    assert np.array_equal(np.asarray(library.upscale(image, "Lanczos", size=(25, 15))),
                          np.asarray(image.resize((25, 15), Image.LANCZOS)))


def test_tiled_equals_untiled_within_a_small_tolerance(library):
    descriptor = library.model(library.find("R-ESRGAN 4x+"))
    image = torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = descriptor(image)
        tiled = tiled_apply(descriptor, image, 4, TileSettings(32, 8))
    assert tiled.shape == whole.shape
    # RRDBNet's receptive field is wider than the overlap, so seams differ slightly; far from exact 0.
    assert (tiled - whole).abs().mean() < 0.01 and (tiled - whole).abs().max() < 0.25


def test_identity_model_tiles_without_seams():
    """Blending weights sum to one everywhere: a pointwise "model" comes out exactly."""
    image = torch.rand(1, 3, 50, 77, generator=torch.Generator().manual_seed(4))

    def nearest_x2(x):
        return x.repeat_interleave(2, 2).repeat_interleave(2, 3)

    out = tiled_apply(nearest_x2, image, 2, TileSettings(16, 4))
    assert torch.allclose(out, nearest_x2(image), atol=1e-6)


def test_interrupt_stops_between_tiles(library):
    from backend.upscalers import Interrupted

    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Interrupted):
        library.upscale(photo(80, 80), "R-ESRGAN 4x+", scale=2, tile=TileSettings(32, 4), should_stop=stop)
    assert len(calls) == 3


def test_unknown_architecture_and_damaged_files_are_named(tmp_path, library):
    torch.save({"params": {"mystery.weight": torch.zeros(3, 3)}}, tmp_path / "odd.pth")
    with pytest.raises(UpscalerError, match="odd.pth: unknown model architecture"):
        load_model(tmp_path / "odd.pth")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UpscalerError, match="cannot read cut.pth"):
        load_model(tmp_path / "cut.pth")
    with pytest.raises(UpscalerError, match="upscaler 'SwinIR 4x' not found; available: Lanczos"):
        library.upscale(photo(), "SwinIR 4x", scale=2)


def test_generation_upscales_after_decoding_and_records_it(sd1_manager):
    from backend.generation import generate
    from backend.infotext import parse_infotext
    from backend.request import GenerationRequest

    folder = sd1_manager.settings.model_dir("realesrgan")
    folder.mkdir(parents=True)
    torch.save({"params_ema": rrdbnet_state()}, folder / "RealESRGAN_x4plus.pth")
    sd1_manager.refresh()
    request = GenerationRequest(prompt="a red star", steps=2, seed=3, width=64, height=64, save_images=False)
    plain = generate(sd1_manager, request).images[0]
    upscaled = generate(sd1_manager, request.with_changes(upscaler="R-ESRGAN 4x+", upscale_by=1.5)).images[0]
    assert plain.image.size == (64, 64) and upscaled.image.size == (96, 96)
    parsed = parse_infotext(upscaled.infotext)
    assert (parsed["Postprocess upscaler"], parsed["Postprocess upscale by"], parsed["Size"]) == \
        ("R-ESRGAN 4x+", "1.5", "64x64")
    lanczos = generate(sd1_manager, request.with_changes(upscaler="Lanczos", upscale_by=2)).images[0]
    assert np.array_equal(np.asarray(lanczos.image), np.asarray(plain.image.resize((128, 128), Image.LANCZOS)))
    with pytest.raises(UpscalerError, match="upscaler 'Nope' not found"):
        generate(sd1_manager, request.with_changes(upscaler="Nope"))


def test_extras_scale_resize_crop_second_upscaler_and_png_chunks(library, tmp_path):
    from backend.outputs import png_info
    from backend.postprocess import ExtrasRequest, postprocess, run_extras

    source = photo(40, 28)
    source.save(tmp_path / "src.png", pnginfo=png_info("a red star\nSteps: 20, Sampler: Euler, Seed: 5"))
    loaded = Image.open(tmp_path / "src.png")
    results = run_extras(library, [loaded], ExtrasRequest(upscaler="R-ESRGAN 4x+", scale=2.5), tmp_path / "out")
    saved = Image.open(results[0].path)
    assert saved.size == (100, 70) and results[0].path.parent.parent == tmp_path / "out" / "extras-images"
    assert saved.info["parameters"] == "a red star\nSteps: 20, Sampler: Euler, Seed: 5"  # the source's, kept
    assert saved.info["postprocessing"] == "Postprocess upscale by: 2.5, Postprocess upscaler: R-ESRGAN 4x+"
    # Resize to 50x50 with crop: cover (72x50 from 40x28), then the centre 50x50.
    cropped = postprocess(library, source, ExtrasRequest(upscaler="Lanczos", resize_to=(50, 50)))
    cover = source.resize((72, 50), Image.LANCZOS)
    assert np.array_equal(np.asarray(cropped.image), np.asarray(cover.crop((11, 0, 61, 50))))
    assert cropped.postprocessing == ("Postprocess upscale to: 50x50, Postprocess crop to fit: True, "
                                      "Postprocess upscaler: Lanczos")
    stretched = postprocess(library, source, ExtrasRequest(upscaler="Lanczos", resize_to=(50, 50), crop=False))
    assert stretched.image.size == (50, 50)
    # Upscaler 2 at visibility 0.5 is the average of both results.
    both = postprocess(library, source, ExtrasRequest(upscaler="Lanczos", upscaler_2="Nearest",
                                                      upscaler_2_visibility=0.5))
    expected = Image.blend(source.resize((80, 56), Image.LANCZOS), source.resize((80, 56), Image.NEAREST), 0.5)
    assert np.array_equal(np.asarray(both.image), np.asarray(expected))
    assert "Postprocess upscaler 2: Nearest, Postprocess upscaler 2 visibility: 0.5" in both.postprocessing


def test_extras_command_line(settings, capsys, tmp_path):
    import app

    folder = settings.model_dir("realesrgan")
    folder.mkdir(parents=True)
    torch.save({"params": compact_state()}, folder / "realesr-general-x4v3.pth")
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    photo(20, 16).save(first)
    photo(12, 12).save(second)
    code = app.main(["--data-dir", str(settings.data_dir), "extras", "--image", str(first), "--image", str(second),
                     "--upscaler", "R-ESRGAN General 4xV3", "--scale", "3", "--out", str(tmp_path / "up")])
    paths = capsys.readouterr().out.split()
    assert code == 0 and [Image.open(p).size for p in paths] == [(60, 48), (36, 36)]
    (tmp_path / "not-an-image.png").write_text("hello")
    code = app.main(["--data-dir", str(settings.data_dir), "extras", "--image", str(tmp_path / "not-an-image.png")])
    assert code == 1 and "error: cannot read --image" in capsys.readouterr().err
    code = app.main(["--data-dir", str(settings.data_dir), "extras", "--image", str(first), "--upscaler", "4x-Nope"])
    assert code == 1 and "error: upscaler '4x-Nope' not found" in capsys.readouterr().err


def test_a_missing_standard_upscaler_names_its_file_and_folder(tmp_path):
    offline = UpscalerLibrary([tmp_path / "ESRGAN", tmp_path / "RealESRGAN"])
    assert "R-ESRGAN 4x+" not in offline.names  # listed only where it can be fetched
    with pytest.raises(UpscalerError, match="RealESRGAN_x4plus.pth is not in .*RealESRGAN and downloads are off: "
                                            "download https://github.com/xinntao/Real-ESRGAN"):
        offline.find("R-ESRGAN 4x+")
    online = UpscalerLibrary([tmp_path / "RealESRGAN"], download_folder=tmp_path / "RealESRGAN")
    assert online.names[-2:] == ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"]


def test_upscaler_models_load_once_unless_released_after_use(library):
    image = Image.new("RGB", (16, 16), (90, 30, 200))
    for _ in range(3):
        library.upscale(image, "R-ESRGAN 4x+", scale=4)
    assert library.loads == 1
    library.release_after_use = True
    for _ in range(2):
        library.upscale(image, "R-ESRGAN 4x+", scale=4)
        assert not library._models  # freed after the image
    assert library.loads == 2  # the cached model was used once more, then loaded again
