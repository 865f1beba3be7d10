"""FLUX.1 through the A1111 API and the CLI, as Forge's clients use them: `sd-models` lists the files,
`override_settings` switches to one for a request and back, `distilled_cfg_scale` reaches the model and the
infotext, `forge_additional_modules` and `sd-modules` pick and list the VAE and text encoders."""

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

import app
from backend.random_flow_models import build_flux, save_all_in_one, save_separate
from backend.random_t5_tokenizer import write_t5_tokenizer
from backend.settings import Settings
from tests.test_api import DEFAULT_MODEL, free_port

FLUX = {"width": 64, "height": 64, "steps": 3, "sampler_name": "Euler", "cfg_scale": 1, "seed": 5}


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_cache) -> Path:
    root = tmp_path_factory.mktemp("flux-api")
    settings = Settings(data_dir=root)
    shutil.copytree(tokenizer_cache, settings.cache_dir, dirs_exist_ok=True)
    write_t5_tokenizer(settings.cache_dir)
    save_separate(build_flux(seed=1), settings.models_dir, "flux-dev", dtype=torch.float32, encoder_dtype=torch.float32)
    save_all_in_one(build_flux(guidance=False, seed=2), settings.model_dir("checkpoints") / "flux-schnell-aio.safetensors")
    shutil.copy(DEFAULT_MODEL, settings.model_dir("checkpoints") / DEFAULT_MODEL.name)
    return root


@pytest.fixture(scope="module")
def server(data):
    from ui.launch import ServerOptions, launch

    settings = Settings(data_dir=data, default_checkpoint="easel-shapes", checkpoint_cache_size=2)
    demo, url, _ = launch(settings, ServerOptions(port=free_port(), api=True), block=False)
    yield url.rstrip("/")
    demo.close()


def infotext_of(response) -> str:
    body = response.json()
    assert response.status_code == 200, body
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.info["parameters"] == json.loads(body["info"])["infotexts"][0]  # as the response reports it
    return image.info["parameters"]


def test_models_and_modules_are_listed(server):
    titles = [m["model_name"] for m in requests.get(f"{server}/sdapi/v1/sd-models").json()]
    assert {"flux-dev", "flux-schnell-aio", "easel-shapes"} <= set(titles)
    modules = {Path(m["filename"]).name for m in requests.get(f"{server}/sdapi/v1/sd-modules").json()}
    assert modules == {"ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"}


def test_override_settings_switch_to_flux_for_one_request_and_back(server):
    flux = requests.post(f"{server}/sdapi/v1/txt2img", json={
        "prompt": "a red cat", "distilled_cfg_scale": 5, **FLUX,
        "override_settings": {"sd_model_checkpoint": "flux-dev"}})
    text = infotext_of(flux)
    assert "Model: flux-dev" in text and "Distilled CFG Scale: 5," in text and "Schedule type: Simple" in text
    assert "Model: easel-shapes" in infotext_of(requests.post(f"{server}/sdapi/v1/txt2img", json={
        "prompt": "a red cat", "width": 64, "height": 64, "steps": 2}))
    parsed = requests.post(f"{server}/sdapi/v1/png-info", json={"image": flux.json()["images"][0]}).json()
    assert parsed["info"] == text and parsed["parameters"]["Distilled CFG Scale"] == "5"


def test_schnell_all_in_one_through_the_api(server):
    text = infotext_of(requests.post(f"{server}/sdapi/v1/txt2img", json={
        "prompt": "a blue house", **FLUX, "override_settings": {"sd_model_checkpoint": "flux-schnell-aio"}}))
    assert "Model: flux-schnell-aio" in text and "Distilled CFG Scale" not in text


def test_forge_additional_modules_pick_the_vae_and_text_encoders(server, data):
    folder = Settings(data_dir=data).models_dir
    picks = [str(folder / "text_encoder" / "clip_l.safetensors"), str(folder / "text_encoder" / "t5xxl_fp16.safetensors"),
             str(folder / "VAE" / "ae.safetensors")]
    assert requests.post(f"{server}/sdapi/v1/options", json={"forge_additional_modules": picks}).status_code == 200
    options = requests.get(f"{server}/sdapi/v1/options").json()
    assert sorted(options["forge_additional_modules"]) == sorted(picks) and options["sd_vae"] == "ae.safetensors"
    bad = requests.post(f"{server}/sdapi/v1/options", json={"forge_additional_modules": ["nope.safetensors"]})
    assert bad.status_code == 422 and "neither models/text_encoder nor models/VAE" in bad.text
    requests.post(f"{server}/sdapi/v1/options", json={"forge_additional_modules": []})
    assert requests.get(f"{server}/sdapi/v1/options").json()["sd_vae"] == "Automatic"


def test_cli_generates_with_chosen_parts(data, tmp_path, capsys):
    code = app.main(["--data-dir", str(data), "--outdir", str(tmp_path), "--text-encoder", "clip_l.safetensors",
                     "--text-encoder", "t5xxl_fp16.safetensors", "generate", "--prompt", "a cat", "--checkpoint",
                     "flux-dev", "--vae", "ae.safetensors", "--distilled-cfg-scale", "4.5", "--sampler", "Euler",
                     "--cfg-scale", "1", "--width", "64", "--height", "64", "--steps", "2", "--seed", "3"])
    assert code == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    text = Image.open(path).info["parameters"]
    assert "Distilled CFG Scale: 4.5" in text and "VAE: ae.safetensors" in text
