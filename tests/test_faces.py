"""Face restoration on a real photo (scikit-image's astronaut): detection, FFHQ alignment, paste-back,
GFPGAN and CodeFormer files with random weights in their released layout, the generation chain,
Extras, and first-use downloads from a local server."""

from __future__ import annotations

import hashlib
import http.server
import threading

import numpy as np
import pytest
from PIL import Image

from backend import downloads, faces
from backend.faces import FaceRestorationError, FaceRestorers, HaarDetector
from backend.generation import generate
from backend.infotext import parse_infotext, request_fields
from backend.postprocess import ExtrasRequest, run_extras
from backend.progress import JobControl
from backend.request import GenerationRequest

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def restorers(face_model_dirs) -> FaceRestorers:
    return FaceRestorers(*face_model_dirs)


@pytest.fixture(scope="module")
def gfpgan_full(restorers, astronaut):
    return restorers.restore(astronaut, "GFPGAN")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_haar_detector_finds_the_face_and_both_eyes(astronaut):
    found = HaarDetector().detect(np.asarray(astronaut))
    assert len(found) == 1
    x, y, w, h = found[0].box
    assert abs(x - 177) < 15 and abs(y - 66) < 15 and 80 < w < 115
    left, right = found[0].landmarks
    assert x < left[0] < x + w / 2 < right[0] < x + w  # one eye in each half of the box
    assert y + h * 0.2 < left[1] < y + h * 0.55 and abs(left[1] - right[1]) < h * 0.1


def test_alignment_puts_the_eyes_where_ffhq_puts_them(astronaut):
    rgb = np.asarray(astronaut)
    face = HaarDetector().detect(rgb)[0]
    crop = faces.crop_face(rgb, faces.alignment(face.landmarks))
    assert crop.shape == (512, 512, 3)
    again = HaarDetector().detect(crop)  # the aligned crop still holds one face, its eyes on the template
    assert len(again) == 1
    assert np.abs(again[0].landmarks - faces.FFHQ_LANDMARKS[:2]).max() < 20


def test_paste_back_of_an_unchanged_face_keeps_the_photo(restorers, astronaut, monkeypatch):
    monkeypatch.setattr(FaceRestorers, "_run", lambda self, descriptor, crop, weight: crop.astype(np.float32))
    result = restorers.restore(astronaut, "GFPGAN")
    difference = np.abs(pixels(result.image) - pixels(astronaut))
    assert result.faces == 1 and result.detector == "OpenCV Haar cascades"
    assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 12  # only resampling blur


def test_gfpgan_changes_the_face_region_only_and_repeats_exactly(restorers, astronaut, gfpgan_full):
    difference = np.abs(pixels(gfpgan_full.image) - pixels(astronaut)).sum(axis=2)
    ys, xs = np.nonzero(difference)
    box_x, box_y, box_w, box_h = HaarDetector().detect(np.asarray(astronaut))[0].box
    assert xs.min() < box_x + box_w / 2 < xs.max() and ys.min() < box_y + box_h / 2 < ys.max()
    assert 0.05 < (difference > 0).mean() < 0.3  # the face's surroundings, not the whole photo
    assert (difference[330:] == 0).all()  # the suit and the helmet below are untouched, exactly
    again = restorers.restore(astronaut, "GFPGAN")
    assert np.array_equal(pixels(again.image), pixels(gfpgan_full.image))  # fixed decoder noise


def test_visibility_blends_with_the_original(restorers, astronaut, gfpgan_full):
    half = restorers.restore(astronaut, "GFPGAN", visibility=0.5)
    expected = (pixels(astronaut) + pixels(gfpgan_full.image)) / 2
    assert np.abs(pixels(half.image) - expected).max() <= 1
    none = restorers.restore(astronaut, "GFPGAN", visibility=0)
    assert np.array_equal(pixels(none.image), pixels(astronaut))


def test_codeformer_loads_and_its_weight_changes_the_face(restorers, astronaut):
    strongest = restorers.restore(astronaut, "CodeFormer", codeformer_weight=0.0)
    weakest = restorers.restore(astronaut, "CodeFormer", codeformer_weight=1.0)
    assert strongest.faces == weakest.faces == 1
    assert np.abs(pixels(strongest.image) - pixels(weakest.image)).max() > 10
    assert np.array_equal(pixels(strongest.image)[330:], pixels(astronaut)[330:])


def test_generation_chain_records_face_restoration_and_saves_the_image_before(settings, model_files,
                                                                              face_model_dirs):
    from backend.model_manager import ModelManager
    from tests.conftest import install

    install(settings, model_files["sd1"])
    for source, kind in zip(face_model_dirs, ("gfpgan", "codeformer")):
        settings.model_dir(kind).parent.mkdir(parents=True, exist_ok=True)
        settings.model_dir(kind).symlink_to(source, target_is_directory=True)
    manager = ModelManager(settings)
    request = GenerationRequest(prompt="a red star", width=64, height=64, steps=2, seed=9, restore_faces=True,
                                face_restorer="GFPGAN", save_before_face_restoration=True)
    result = generate(manager, request)
    params = parse_infotext(result.images[0].infotext)
    assert params["Face restoration"] == "GFPGAN"
    assert result.notes == ["Face restoration (GFPGAN): 0 faces found by OpenCV Haar cascades"]
    saved = sorted(p.name for p in result.images[0].path.parent.iterdir())
    assert saved == ["00000-9-before-face-restoration.png", "00001-9.png"]
    fields = request_fields(params)
    assert fields["restore_faces"] is True and fields["face_restorer"] == "GFPGAN"
    assert request_fields(parse_infotext("x\nSteps: 2, Seed: 1, Size: 64x64"))["restore_faces"] is False


def test_extras_runs_gfpgan_with_a1111_keys(restorers, astronaut, gfpgan_full, tmp_path):
    from backend.upscalers import UpscalerLibrary

    request = ExtrasRequest(upscaler="None", gfpgan_visibility=1.0, output_dir=tmp_path)
    [result] = run_extras(UpscalerLibrary([]), [astronaut], request, tmp_path, faces=restorers)
    assert result.postprocessing == "GFPGAN visibility: 1"
    assert result.notes == ["GFPGAN: 1 face found by OpenCV Haar cascades"]
    with Image.open(result.path) as saved:
        assert saved.info["postprocessing"] == "GFPGAN visibility: 1"
        assert np.array_equal(pixels(saved), pixels(gfpgan_full.image))


def test_missing_weights_say_which_file_goes_where_before_any_denoising(sd1_manager, tmp_path):
    empty = FaceRestorers(tmp_path / "GFPGAN", tmp_path / "Codeformer")
    with pytest.raises(FaceRestorationError, match="GFPGANv1.4.pth.*downloads are off.*github.com/TencentARC"):
        empty.weights("GFPGAN")
    events = []
    with pytest.raises(FaceRestorationError, match="codeformer-v0.1.0.pth"):
        generate(sd1_manager, GenerationRequest(prompt="x", width=64, height=64, steps=2, restore_faces=True),
                 JobControl(on_progress=events.append))
    assert events == []


def test_damaged_weights_and_unknown_names_are_clear_errors(tmp_path, astronaut):
    folder = tmp_path / "GFPGAN"
    folder.mkdir()
    (folder / "GFPGANv1.4.pth").write_bytes(b"not a model at all")
    broken = FaceRestorers(folder, tmp_path / "Codeformer")
    with pytest.raises(FaceRestorationError, match="GFPGANv1.4.pth.*download it again"):
        broken.restore(astronaut, "GFPGAN")
    with pytest.raises(FaceRestorationError, match="unknown face restorer 'GPEN'; available: CodeFormer, GFPGAN"):
        broken.restore(astronaut, "GPEN")


@pytest.fixture
def local_server(tmp_path):
    """A local HTTP server over tmp_path/www (the real download code, no network)."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_checks_the_sha256_and_never_leaves_a_partial_file(local_server, tmp_path):
    root, url = local_server
    payload = bytes(range(256)) * 5000
    (root / "weights.pth").write_bytes(payload)
    target = tmp_path / "models" / "weights.pth"
    good = hashlib.sha256(payload).hexdigest()
    with pytest.raises(downloads.DownloadError, match="expected 0000.*nothing was saved"):
        downloads.fetch(f"{url}/weights.pth", target, "0" * 64, progress=False)
    assert list(target.parent.iterdir()) == []
    with pytest.raises(downloads.DownloadError, match="could not download"):
        downloads.fetch(f"{url}/missing.pth", target, good, progress=False)
    assert downloads.fetch(f"{url}/weights.pth", target, good, progress=False) == target
    assert target.read_bytes() == payload and list(target.parent.iterdir()) == [target]


def test_an_image_without_a_face_is_unchanged_and_the_result_says_so(restorers):
    sky = Image.linear_gradient("L").convert("RGB").resize((300, 200))
    result = restorers.restore(sky, "CodeFormer")
    assert result.faces == 0 and np.array_equal(pixels(result.image), pixels(sky))


def test_extras_command_line_restores_faces(face_model_dirs, astronaut, tmp_path, capsys):
    import app

    data = tmp_path / "data"
    for source, folder in zip(face_model_dirs, ("GFPGAN", "Codeformer")):
        (data / "models").mkdir(parents=True, exist_ok=True)
        (data / "models" / folder).symlink_to(source, target_is_directory=True)
    astronaut.save(tmp_path / "in.png")
    code = app.main(["--data-dir", str(data), "--no-download", "extras", "--image", str(tmp_path / "in.png"),
                     "--upscaler", "None", "--face-restorer", "GFPGAN", "--face-visibility", "0.5",
                     "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0 and "GFPGAN: 1 face found by OpenCV Haar cascades" in captured.err
    with Image.open(captured.out.strip()) as saved:
        assert saved.info["postprocessing"] == "GFPGAN visibility: 0.5"
        assert saved.size == astronaut.size


def test_models_load_once_unless_released_after_use(face_model_dirs, astronaut, monkeypatch):
    monkeypatch.setattr(FaceRestorers, "_run", lambda self, descriptor, crop, weight: crop.astype(np.float32))
    kept = FaceRestorers(*face_model_dirs)
    for name in ("GFPGAN", "CodeFormer", "GFPGAN", "CodeFormer"):
        kept.restore(astronaut, name)
    assert kept.loads == 2
    released = FaceRestorers(*face_model_dirs, release_after_use=True)
    for name in ("GFPGAN", "GFPGAN"):
        released.restore(astronaut, name)
    assert released.loads == 2 and released._loaded == {}
