"""A failed save (read-only outputs folder, full disk) loses the files, never the generation: the
images come back with their infotext, one warning names the reason, and no partial file is left."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import outputs
from backend.generation import generate
from backend.request import GenerationRequest

FIELDS = dict(prompt="a red star", width=64, height=64, steps=2, seed=5, batch_size=2, save_txt=True)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def fail_png_write(monkeypatch, folder):
    real = Image.Image.save

    def half_then_full(self, fp, *args, **kwargs):
        if hasattr(fp, "write"):  # the outputs folder's file: a partial PNG, then a full disk
            fp.write(b"\x89PNG\r\n\x1a\n half")
            disk_full()
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", half_then_full)


def fail_under(monkeypatch, folder, name, suffix=""):
    """os.<name> raises ENOSPC for paths in `folder` whose destination ends with `suffix`."""
    real = getattr(os, name)

    def failing(*args, **kwargs):
        target = str(args[-1] if name in ("link", "replace") else args[0])
        if target.startswith(str(folder)) and target.endswith(suffix):
            disk_full()
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, failing)


def fail_date_folder(monkeypatch, folder):
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(folder)):
            disk_full()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def fail_link_and_replace(monkeypatch, folder):
    fail_under(monkeypatch, folder, "link")
    fail_under(monkeypatch, folder, "replace")


FAILURES = {
    "date folder": fail_date_folder,
    "png write": fail_png_write,
    "png link and replace": fail_link_and_replace,
    "txt rename": lambda monkeypatch, folder: fail_under(monkeypatch, folder, "replace", ".txt"),
}


def assert_returned_but_not_saved(result, folder: Path, reason: str):
    assert result.seeds == [5, 6]
    assert all(image.infotext.startswith("a red star\n") and "Seed: " in image.infotext for image in result.images)
    assert all(np.asarray(image.image).shape == (64, 64, 3) for image in result.images)
    assert result.paths == []
    warnings = [w for w in result.warnings if w.startswith("saving failed")]
    assert warnings == [f"saving failed: {reason}; the images are returned but not saved in {folder}"]
    assert files_in(folder) == []


@pytest.mark.parametrize("failure", FAILURES)
def test_a_full_disk_keeps_the_images_and_leaves_no_partial_file(sd1_manager, tmp_path, monkeypatch, failure):
    folder = tmp_path / "outputs"
    folder.mkdir()
    FAILURES[failure](monkeypatch, folder)
    result = generate(sd1_manager, GenerationRequest(**FIELDS, output_dir=folder))
    monkeypatch.undo()
    assert_returned_but_not_saved(result, folder, os.strerror(errno.ENOSPC))


def test_a_read_only_outputs_folder_keeps_the_images(sd1_manager, tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("the folder stays writable (running as root)")
        result = generate(sd1_manager, GenerationRequest(**FIELDS, output_dir=folder))
    finally:
        folder.chmod(0o700)
    assert_returned_but_not_saved(result, folder, os.strerror(errno.EACCES))


def test_saving_goes_on_after_one_failed_image(sd1_manager, tmp_path, monkeypatch):
    folder = tmp_path / "outputs"
    real, calls = outputs.save_image, []

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            disk_full()
        return real(*args, **kwargs)

    monkeypatch.setattr(outputs, "save_image", first_fails)
    result = generate(sd1_manager, GenerationRequest(**FIELDS, output_dir=folder))
    assert [image.path is None for image in result.images] == [True, False]
    assert [p.name for p in files_in(folder)] == ["00000-6.png", "00000-6.txt"]
    assert sum(w.startswith("saving failed") for w in result.warnings) == 1


def test_an_extras_result_that_cannot_be_saved_is_returned_with_a_note(tmp_path, monkeypatch):
    from backend.postprocess import ExtrasRequest, run_extras
    from backend.upscalers import UpscalerLibrary

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "save_image", full_disk)
    source = Image.new("RGB", (16, 12), (10, 200, 30))
    results = run_extras(UpscalerLibrary([]), [source], ExtrasRequest(upscaler="Lanczos", scale=2), tmp_path / "out")
    assert [r.image.size for r in results] == [(32, 24)] and results[0].path is None
    assert results[0].notes == [f"saving failed: No space left on device; the image is shown but not saved in "
                                f"{tmp_path / 'out' / 'extras-images'}"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))
