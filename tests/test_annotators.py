"""Model-based ControlNet preprocessors: depth_anything_v2 through transformers' Depth Anything (a tiny random
model written as `config.json` + `model.safetensors` in models/annotators), its input against transformers'
own image processor, first-use downloads checked against the pinned sha256, the API's module list and
detect route, and tile_colorfix's colour fix."""

from __future__ import annotations

import base64
import hashlib
import io
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, DPTImageProcessor

from backend import annotators, control_preprocessors, depth_anything, downloads, tile_colorfix
from backend.downloads import StandardModel
from backend.errors import InputError, ModelFileError
from backend.settings import Settings

MODULE = "depth_anything_v2"


def tiny_depth_anything(seed: int = 0) -> DepthAnythingForDepthEstimation:
    """Depth Anything with a 4-layer, 16-wide DINOv2 backbone (57k parameters); a larger initial spread and
    a positive last bias keep its random prediction from being flat after the final ReLU."""
    torch.manual_seed(seed)
    backbone = dict(model_type="dinov2", hidden_size=16, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
                    image_size=518, patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
                    initializer_range=0.2)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[4, 8, 8, 16],
                                 fusion_hidden_size=8, head_hidden_size=4, initializer_range=0.2)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():
        model.head.conv3.bias.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """The tiny model as Hugging Face writes it: config.json and model.safetensors."""
    folder = tmp_path_factory.mktemp("depth-anything-tiny")
    tiny_depth_anything().save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    return folder


def installed(tmp_path, model_folder, names=("config.json", "model.safetensors"), **settings) -> Settings:
    settings = Settings(data_dir=tmp_path, **settings)
    folder = settings.model_dir("annotators") / "depth_anything_v2"
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes((model_folder / name).read_bytes())
    return settings


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return cv2.GaussianBlur((rng.rand(height, width, 3) * 255).astype(np.uint8), (0, 0), 3)


def processor(**changes) -> DPTImageProcessor:
    """transformers' processor with Depth-Anything-V2-Small-hf's preprocessor_config.json values."""
    values = dict(do_resize=True, size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                  resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                  image_mean=list(depth_anything.IMAGENET_MEAN), image_std=list(depth_anything.IMAGENET_STD))
    return DPTImageProcessor(**{**values, **changes})


# -- the registry ------------------------------------------------------------------------------------------
def test_modules_are_listed_with_sd_webui_controlnets_names_and_sliders():
    names = control_preprocessors.module_list()
    assert {"depth_anything_v2", "tile_colorfix", "tile_colorfix+sharp"} <= set(names)
    assert names.index("tile_colorfix+sharp") < names.index("tile_colorfix") < names.index("depth_anything_v2")
    detail = control_preprocessors.module_detail(alias_names=True)
    assert detail["depth_anything_v2"] == {"model_free": False, "sliders": []}
    variation = {"name": "Variation", "value": 8.0, "min": 3.0, "max": 32.0, "step": 1.0}
    assert detail["tile_colorfix"]["sliders"] == [variation]
    assert detail["tile_colorfix+sharp"]["sliders"] == [
        variation, {"name": "Sharpness", "value": 1.0, "min": 0.0, "max": 2.0, "step": 0.01}]
    assert control_preprocessors.resolve_values("depth_anything_v2") == (512, 0.0, 0.0)
    # every module that needs a model has one, and only those
    for name in names:
        spec = control_preprocessors.get_module(name)
        assert (annotators.annotator_for(name) is not None) == spec.needs_weights, name
    assert annotators.annotator_for("depth_anything_v2") is annotators.DEPTH_ANYTHING_V2


def test_the_pinned_files_are_depth_anything_v2_small_at_a_fixed_revision():
    files = {f.filename: f for f in annotators.DEPTH_ANYTHING_V2.files}
    base = "https://huggingface.co/depth-anything/Depth-Anything-V2-Small-hf/resolve/" \
           "5426e4f0f36572d16453bbda7a8389317b1bef99/"
    assert files["model.safetensors"].url == base + "model.safetensors"
    assert files["model.safetensors"].sha256 == "3152477ce0d8d6978d76b995120de97cb5b928701fd0f817769f59e249a16b70"
    assert files["config.json"].url == base + "config.json"
    assert files["config.json"].sha256 == "c56698d3643dde1f83ea2212759e6b31a22b8f827246a36dd007ee8a22b3ff75"


# -- the network's input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size, expected", [
    ((512, 512), (518, 518)),
    ((768, 512), (784, 518)),  # 777 -> 55.5 patches, rounded half to even: 56
    ((1536, 1024), (784, 518)),  # larger: the short side comes down to 518
    ((600, 520), (602, 518)),
    ((384, 256), (784, 518)),  # both sides short: the short side goes up to 518 (transformers': 518x350)
    ((200, 1000), (518, 2590)),
])
def test_network_size_is_depth_anythings_lower_bound_resize(size, expected):
    assert depth_anything.network_size(*size) == expected


def test_network_input_equals_transformers_image_processor():
    image = photo(768, 512)
    expected = processor()(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
    actual = depth_anything.network_input(image)
    assert actual.shape == expected.shape == (1, 3, 518, 784)
    assert torch.allclose(actual, expected, atol=1e-5)
    # where the sizing rules part, the resampling and normalisation still match at our size
    small = photo(300, 200, seed=1)
    width, height = depth_anything.network_size(300, 200)
    expected = processor(size={"height": height, "width": width}, keep_aspect_ratio=False)(
        images=Image.fromarray(small), return_tensors="pt")["pixel_values"]
    assert torch.allclose(depth_anything.network_input(small), expected, atol=1e-5)


# -- the map ---------------------------------------------------------------------------------------------
def test_inverse_depth_becomes_white_near_and_black_far():
    inverse = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # larger: nearer
    assert depth_anything.inverse_depth_map(inverse, (2, 2)).tolist() == [[0, 85], [170, 255]]
    assert depth_anything.inverse_depth_map(torch.full((3, 3), 0.7), (4, 5)).tolist() == [[0] * 5] * 4


def test_the_map_equals_transformers_forward_pass_normalised_as_sd_webui_controlnet_does(model_folder):
    model = annotators._load_depth_anything(model_folder, torch.device("cpu"))
    image = photo(200, 330, seed=2)
    detected = control_preprocessors.detect_map(MODULE, Image.fromarray(image), weights=model)
    # sd-webui-controlnet: short side to 512 (cubic), edge-padded to multiples of 64, depth over the padded
    # image, resized back bilinearly, min-max to 0-255, cropped, three channels
    resized = cv2.resize(image, (512, 845), interpolation=cv2.INTER_CUBIC)
    padded = np.pad(resized, [(0, 896 - 845), (0, 0), (0, 0)], mode="edge")
    pixels = processor()(images=Image.fromarray(padded), return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (910, 518)
    with torch.no_grad():
        depth = model(pixel_values=pixels).predicted_depth
    depth = F.interpolate(depth[None], (896, 512), mode="bilinear", align_corners=False)[0, 0]
    expected = ((depth - depth.min()) / (depth.max() - depth.min()) * 255.0).numpy().astype(np.uint8)[:845]
    assert detected.shape == (845, 512, 3) and detected.dtype == np.uint8
    assert np.array_equal(detected[:, :, 0], detected[:, :, 2])
    assert np.abs(detected[:, :, 0].astype(int) - expected).max() <= 1  # float rounding at level boundaries
    assert (detected[:, :, 0] != expected).mean() < 0.01
    assert detected.max() > 200 and detected.min() < 50  # a real spread, not a flat map


def test_the_module_refuses_to_run_without_its_model():
    with pytest.raises(InputError, match="needs its preprocessor model"):
        control_preprocessors.detect_map(MODULE, Image.fromarray(photo(64, 64)))


# -- weights: found, loaded once, downloaded, refused ------------------------------------------------------
def test_weights_load_once_per_file_and_none_for_modules_without_a_model(tmp_path, model_folder):
    settings = installed(tmp_path, model_folder)
    loaded = annotators.LoadedAnnotators()
    assert annotators.weights_for("canny", settings, loaded=loaded) is None
    first = annotators.weights_for(MODULE, settings, "cpu", loaded)
    assert isinstance(first, DepthAnythingForDepthEstimation) and not first.training
    assert annotators.weights_for(MODULE, settings, "cpu", loaded) is first and loaded.loads == 1
    weights = settings.model_dir("annotators") / "depth_anything_v2" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # replaced
    second = annotators.weights_for(MODULE, settings, "cpu", loaded)
    assert second is not first and loaded.loads == 2 and list(loaded._models.values()) == [second]
    image = Image.fromarray(photo(64, 96))
    hint = control_preprocessors.prepare_control_image(image, MODULE, (64, 96), weights=first)
    assert hint.shape == (3, 96, 64) and torch.equal(hint[0], hint[2]) and float(hint.max() - hint.min()) > 0.3


def test_with_downloads_off_a_missing_file_is_named_with_its_folder_and_url(tmp_path, model_folder):
    settings = installed(tmp_path, model_folder, names=("config.json",), allow_downloads=False)
    folder = settings.model_dir("annotators") / "depth_anything_v2"
    with pytest.raises(downloads.DownloadError) as caught:
        annotators.weights_for(MODULE, settings, "cpu", annotators.LoadedAnnotators())
    message = str(caught.value)
    assert "model.safetensors is not in" in message and str(folder) in message and "downloads are off" in message
    assert "Depth-Anything-V2-Small-hf/resolve/5426e4f0f36572d16453bbda7a8389317b1bef99/model.safetensors" in message
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


def test_a_damaged_file_is_a_model_file_error_naming_the_folder(tmp_path, model_folder):
    settings = installed(tmp_path, model_folder, names=("config.json",))
    folder = settings.model_dir("annotators") / "depth_anything_v2"
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError, match="delete its files to download them again") as caught:
        annotators.weights_for(MODULE, settings, "cpu", annotators.LoadedAnnotators())
    assert str(folder) in str(caught.value)


def local_annotator(model_folder, tmp_path, corrupt: bool = False) -> annotators.Annotator:
    """DEPTH_ANYTHING_V2 served from file:// URLs, with the sha256s of the tiny model's files (or, with
    `corrupt`, a weights file whose bytes differ from the pinned hash)."""
    files = []
    for name in ("config.json", "model.safetensors"):
        data = (model_folder / name).read_bytes()
        served = tmp_path / "served" / name
        served.parent.mkdir(exist_ok=True)
        served.write_bytes(data[:-1] + b"!" if corrupt and name == "model.safetensors" else data)
        files.append(StandardModel(name, served.as_uri(), hashlib.sha256(data).hexdigest(), "annotators"))
    return annotators.Annotator("depth_anything_v2", tuple(files), annotators._load_depth_anything)


def test_first_use_downloads_both_files_checked_against_their_sha256(tmp_path, model_folder, monkeypatch):
    monkeypatch.setitem(annotators.ANNOTATORS, MODULE, local_annotator(model_folder, tmp_path))
    settings = Settings(data_dir=tmp_path / "data", allow_downloads=True)
    model = annotators.weights_for(MODULE, settings, "cpu", annotators.LoadedAnnotators())
    folder = settings.model_dir("annotators") / "depth_anything_v2"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()
    assert isinstance(model, DepthAnythingForDepthEstimation)


def test_a_download_with_the_wrong_sha256_saves_nothing_and_never_replaces_a_good_file(tmp_path, model_folder,
                                                                                       monkeypatch):
    monkeypatch.setitem(annotators.ANNOTATORS, MODULE, local_annotator(model_folder, tmp_path, corrupt=True))
    settings = Settings(data_dir=tmp_path / "data", allow_downloads=True)
    with pytest.raises(downloads.DownloadError, match="expected .*nothing was saved"):
        annotators.weights_for(MODULE, settings, "cpu", annotators.LoadedAnnotators())
    folder = settings.model_dir("annotators") / "depth_anything_v2"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # no weights, no .part left
    # a good file already in place is never overwritten by a download that fails its check
    good = folder / "model.safetensors"
    good.write_bytes((model_folder / "model.safetensors").read_bytes())
    bad_url = (tmp_path / "served" / "model.safetensors").as_uri()
    expected = hashlib.sha256(good.read_bytes()).hexdigest()
    with pytest.raises(downloads.DownloadError):
        downloads.fetch(bad_url, good, expected, progress=False)
    assert hashlib.sha256(good.read_bytes()).hexdigest() == expected
    assert not (folder / "model.safetensors.part").exists()


# -- the API ---------------------------------------------------------------------------------------------
def test_the_api_lists_the_module_and_detects_with_its_model(tmp_path, model_folder):
    from api import ApiContext, mount
    from backend.extensions import NO_EXTENSIONS
    from backend.model_manager import ModelManager
    from backend.options import Options
    from backend.runtime import Runtime
    from backend.styles import StyleDatabase

    settings = installed(tmp_path, model_folder)
    runtime = Runtime(settings, Options(save_images=False), tmp_path / "config.json", ModelManager(settings),
                      NO_EXTENSIONS, StyleDatabase(tmp_path / "styles.csv"))
    app = FastAPI()
    mount(app, ApiContext(runtime))
    client = TestClient(app)
    try:
        listed = client.get("/controlnet/module_list?alias_names=true").json()
        assert "depth_anything_v2" in listed["module_list"]
        assert listed["module_detail"]["depth_anything_v2"] == {"model_free": False, "sliders": []}
        buffer = io.BytesIO()
        Image.fromarray(photo(96, 64)).save(buffer, format="PNG")
        body = {"controlnet_module": MODULE, "controlnet_input_images": [base64.b64encode(buffer.getvalue()).decode()],
                "controlnet_processor_res": 128}
        answer = client.post("/controlnet/detect", json=body)
        assert answer.status_code == 200, answer.text
        shown = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        assert shown.mode == "RGB" and shown.size == (768, 512)  # no resolution slider: it runs at 512
        # no file and downloads off: a 503 that says what to put where
        (settings.model_dir("annotators") / "depth_anything_v2" / "model.safetensors").unlink()
        missing = client.post("/controlnet/detect", json=body)
        assert missing.status_code == 503 and "model.safetensors is not in" in missing.text
    finally:
        runtime.shutdown()


# -- tile_colorfix ---------------------------------------------------------------------------------------
def test_box_blur_is_a_replicate_padded_window_mean():
    latent = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 3, 5)
    # radius 1 along a row 0 1 2 3 4 (edges repeated): (0+0+1)/3, 1, 2, 3, (3+4+4)/3
    expected = torch.tensor([1 / 3, 1, 2, 3, 11 / 3])
    assert torch.allclose(tile_colorfix.box_blur(latent, 1)[0, 0, 1], expected)


def colorfix_case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    noise, x0 = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    alpha = 0.6
    sample = alpha ** 0.5 * x0 + (1 - alpha) ** 0.5 * noise
    return noise, sample, alpha, x0


def implied_x0(noise, sample, alpha):
    return (sample - (1 - alpha) ** 0.5 * noise) / alpha ** 0.5


def test_colorfix_takes_the_low_frequencies_from_the_control_latent():
    noise, sample, alpha, x0 = colorfix_case()
    shift = torch.tensor([0.5, -1.0, 0.25, 2.0]).view(1, 4, 1, 1)  # a colour cast: all low frequency
    fixed = tile_colorfix.color_fixed_noise(noise, sample, alpha, x0 + shift, variation=3, weight=1.0)
    assert torch.allclose(implied_x0(fixed, sample, alpha), x0 + shift, atol=1e-5)
    # a control latent equal to the prediction changes nothing; weight 0 (or less) keeps the UNet's noise
    same = tile_colorfix.color_fixed_noise(noise, sample, alpha, x0, variation=3, weight=1.0)
    assert torch.allclose(same, noise, atol=1e-5)
    assert torch.equal(tile_colorfix.color_fixed_noise(noise, sample, alpha, x0 + shift, 3, weight=-1.0), noise)
    half = tile_colorfix.color_fixed_noise(noise, sample, alpha, x0 + shift, 3, weight=0.5)
    assert torch.allclose(half, (fixed + noise) / 2, atol=1e-6)


def test_colorfix_sharp_blurs_only_the_negative_prompts_rows_by_sharpness_percent():
    noise, sample, alpha, x0 = colorfix_case(1)
    plain = tile_colorfix.color_fixed_noise(noise, sample, alpha, x0, 4, 1.0)
    conditional = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)  # row 0: the negative prompt
    sharp = tile_colorfix.color_fixed_noise(noise, sample, alpha, x0, 4, 1.0, sharpness=2.0, conditional=conditional)
    assert torch.allclose(sharp[1], plain[1])
    fixed_x0 = implied_x0(plain, sample, alpha)[:1]
    expected = 0.02 * tile_colorfix.box_blur(fixed_x0, 4) + 0.98 * fixed_x0
    assert torch.allclose(implied_x0(sharp, sample, alpha)[:1], expected, atol=1e-5)
