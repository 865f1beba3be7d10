"""Output files: A1111's folder and name pattern, numbering that never overwrites, atomic writes."""

import datetime as dt
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from backend import outputs

NOW = dt.datetime(2026, 11, 23, 10, 0)


def test_numbered_names_by_date_and_seed(tmp_path):
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    first = outputs.save_image(image, tmp_path / "txt2img-images", 1234, "a cat\nSteps: 1", NOW)
    second = outputs.save_image(image, tmp_path / "txt2img-images", 1235, None, NOW)
    assert first == tmp_path / "txt2img-images" / "2026-11-23" / "00000-1234.png"
    assert second.name == "00001-1235.png"
    assert Image.open(first).info["parameters"] == "a cat\nSteps: 1"
    assert "parameters" not in Image.open(second).info
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(image))


def test_numbering_continues_after_the_highest_existing_number(tmp_path):
    folder = tmp_path / "2026-11-23"
    folder.mkdir()
    (folder / "00041-7.png").write_bytes(b"old")
    (folder / "notes.txt").write_text("x")
    path = outputs.save_image(Image.new("RGB", (4, 4)), tmp_path, 9, None, NOW)
    assert path.name == "00042-9.png"
    assert (folder / "00041-7.png").read_bytes() == b"old"


def test_an_existing_name_is_never_overwritten(tmp_path, monkeypatch):
    folder = tmp_path / "2026-11-23"
    folder.mkdir()
    (folder / "00000-5.png").write_bytes(b"keep me")
    monkeypatch.setattr(outputs, "next_number", lambda _folder: 0)  # as if another writer raced us
    path = outputs.save_image(Image.new("RGB", (4, 4)), tmp_path, 5, None, NOW)
    assert path.name == "00001-5.png"
    assert (folder / "00000-5.png").read_bytes() == b"keep me"


def test_a_failed_write_leaves_no_file(tmp_path):
    class Broken:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        outputs.save_image(Broken(), tmp_path, 1, None, NOW)
    assert list((tmp_path / "2026-11-23").iterdir()) == []


def test_read_infotext_from_png_and_jpeg_exif(tmp_path):
    png = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(png, pnginfo=outputs.png_info("hello\nSteps: 3"))
    assert outputs.read_infotext(Image.open(png)) == "hello\nSteps: 3"
    jpeg = tmp_path / "a.jpg"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "prompt\nSteps: 5".encode("utf-16-be")
    Image.new("RGB", (4, 4)).save(jpeg, exif=exif)
    assert outputs.read_infotext(Image.open(jpeg)) == "prompt\nSteps: 5"


def test_filename_pattern_uses_a1111_tags_and_stays_safe():
    values = outputs.filename_values('a "red" star: on/blue?', 42, "easel-shapes", "DPM++ 2M", 20, 7.0, 64, 64, NOW)
    assert outputs.expand_filename_pattern("[seed]-[prompt_words]", values) == "42-a red star on blue"
    assert outputs.expand_filename_pattern("[model_name] [sampler] [cfg] [width]x[height] [unknown]", values) == \
        "easel-shapes DPM++ 2M 7 64x64 [unknown]"
    assert outputs.expand_filename_pattern("[prompt]", values) == "a red star onblue"
    assert outputs.expand_filename_pattern("", values) == "42"
    assert len(outputs.expand_filename_pattern("[prompt]" * 50, {"prompt": "x" * 500})) == outputs.MAX_NAME


def test_save_txt_writes_the_infotext_beside_the_image(tmp_path):
    path = outputs.save_image(Image.new("RGB", (4, 4)), tmp_path, 7, "a cat\nSteps: 3", NOW, name="7-a cat",
                              save_txt=True)
    assert path.name == "00000-7-a cat.png"
    assert path.with_suffix(".txt").read_text() == "a cat\nSteps: 3"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
                         ids=["022", "002", "077"])
def test_saved_files_get_the_usual_mode_for_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = outputs.save_image(Image.new("RGB", (4, 4)), tmp_path, 7, "a cat\nSteps: 3", NOW, save_txt=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert stat.S_IMODE(path.with_suffix(".txt").stat().st_mode) == mode


@pytest.mark.parametrize("value, byte", [
    (-1.0, 0), (1.0, 255), (-2.0, 0), (3.0, 255), (0.0, 127),  # 127.5 truncates to 127, as A1111's astype(uint8)
    (2 * 100.99 / 255 - 1, 100), (2 * 101.0 / 255 - 1, 101), (float("nan"), 0),
])
def test_pixels_are_converted_to_8_bits_as_a1111_does(value, byte):
    from backend.images import to_pil

    assert to_pil(torch.full((3, 1, 1), value)).getpixel((0, 0)) == (byte, byte, byte)


def test_an_image_read_as_a1111_reads_it_comes_back_within_one_level():
    """A1111 truncates, so a tensor read from bytes can come back one level lower, never higher."""
    from backend.images import to_pil, to_tensor

    image = Image.fromarray(np.arange(256 * 3, dtype=np.uint8)[: 16 * 16 * 3].reshape(16, 16, 3), "RGB")
    back = np.asarray(to_pil(to_tensor(image))).astype(int) - np.asarray(image).astype(int)
    assert back.min() >= -1 and back.max() == 0
