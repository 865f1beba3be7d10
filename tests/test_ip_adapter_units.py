"""IP-Adapters as ControlNet units in whole generations: a tiny IP-Adapter in models/ControlNet and a tiny
CLIP vision encoder in models/clip_vision, through the engine and through the API as sd-webui-controlnet
clients send them."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend import random_controlnets, random_ip_adapters, random_models
from backend.control_units import ControlUnit
from backend.generation import generate
from backend.request import GenerationRequest

BASE = dict(prompt="a star", negative_prompt="blur", width=64, height=64, steps=3, seed=3, save_images=False,
            sampler="Euler")


def picture(colour=(200, 40, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=colour)
    return image


@pytest.fixture
def manager(sd1_manager):
    settings = sd1_manager.settings
    unet = random_models.build("sd1", tiny=True)["unet"]
    random_ip_adapters.save_ip_adapter(random_ip_adapters.ip_adapter_state(unet, "plain", seed=2),
                                       settings.model_dir("controlnet") / "ip-adapter_tiny.safetensors")
    random_ip_adapters.save_clip_vision(random_ip_adapters.build_clip_vision(seed=1),
                                        _mkdir(settings.model_dir("clip_vision")) / "tiny_vision.safetensors")
    random_controlnets.save_lllyasviel(random_controlnets.build("sd1", seed=1),
                                       settings.model_dir("controlnet") / "tiny_canny.safetensors")
    random_controlnets.save_lllyasviel(random_controlnets.build("sdxl", seed=3),
                                       settings.model_dir("controlnet") / "tiny_xl.safetensors")
    sd1_manager.controlnets.library.refresh()
    sd1_manager.controlnets.encoders.library.refresh()
    return sd1_manager


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def pixels(manager, *units, **fields) -> np.ndarray:
    result = generate(manager, GenerationRequest(**{**BASE, **fields}, control_units=tuple(units)))
    return np.asarray(result.images[0].image).astype(int)


def ip_unit(**fields) -> ControlUnit:
    return ControlUnit(**{"model": "ip-adapter_tiny", "module": "ip-adapter-auto", "image": picture(), **fields})


def test_an_ip_adapter_unit_steers_and_leaves_the_unet_as_it_was(manager):
    plain = pixels(manager)
    steered = pixels(manager, ip_unit())
    assert np.abs(steered - plain).mean() > 0.5
    assert np.array_equal(pixels(manager, ip_unit(weight=0.0)), plain)
    assert np.abs(pixels(manager, ip_unit(image=picture((40, 40, 220), seed=5))) - steered).mean() > 0.2
    assert np.array_equal(pixels(manager), plain)  # nothing stayed installed in the UNet
    # the older module names clients send are read; a module naming another encoder is refused by name
    assert np.array_equal(pixels(manager, ip_unit(module="none")), steered)
    with pytest.raises(Exception, match="ControlNet unit 0: ip-adapter_tiny .*needs a .* image encoder, but "
                                        "preprocessor ip-adapter_clip_sd15 picks ViT-H"):
        pixels(manager, ip_unit(module="ip-adapter_clip_sd15"))


def test_an_ip_adapter_and_a_controlnet_act_together(manager):
    edges = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(edges).rectangle((10, 12, 40, 44), outline="black", width=3)
    canny = ControlUnit("tiny_canny", "canny", edges)
    both = pixels(manager, canny, ip_unit())
    assert np.abs(both - pixels(manager, canny)).mean() > 0.5
    assert np.abs(both - pixels(manager, ip_unit())).mean() > 0.5


def test_a_unit_with_a_wrong_base_is_left_out_with_a_warning_beside_others_and_an_error_alone(manager):
    good = ControlUnit("tiny_canny", "canny", picture(), position=0)
    wrong = ControlUnit("tiny_xl", "canny", picture(), position=2)
    result = generate(manager, GenerationRequest(**BASE, control_units=(good, wrong)))
    assert np.array_equal(np.asarray(result.images[0].image).astype(int), pixels(manager, good))
    assert any(w.startswith("ControlNet unit 2: ") and "SDXL" in w and "left out" in w for w in result.warnings)
    with pytest.raises(Exception, match="ControlNet unit 2: .*SDXL"):
        pixels(manager, wrong)


def test_the_api_takes_an_ip_adapter_unit_as_clients_send_it(manager, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api import ApiContext, mount
    from backend.extensions import NO_EXTENSIONS
    from backend.options import Options
    from backend.runtime import Runtime
    from backend.styles import StyleDatabase

    runtime = Runtime(manager.settings, Options(save_images=False), tmp_path / "config.json", manager, NO_EXTENSIONS,
                      StyleDatabase(tmp_path / "styles.csv"))
    app = FastAPI()
    mount(app, ApiContext(runtime))
    client = TestClient(app)
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")
    unit = {"enabled": True, "module": "ip-adapter-auto", "model": "ip-adapter_tiny", "weight": 1.0,
            "image": base64.b64encode(buffer.getvalue()).decode(), "resize_mode": "Crop and Resize",
            "processor_res": 512, "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "Balanced",
            "pixel_perfect": False}
    body = {key: value for key, value in BASE.items() if key not in ("save_images", "sampler")}
    body.update(sampler_name="Euler", alwayson_scripts={"controlnet": {"args": [unit]}})
    try:
        assert "ip-adapter-auto" in client.get("/controlnet/module_list").json()["module_list"]
        types = client.get("/controlnet/control_types").json()["control_types"]
        assert types["IP-Adapter"]["default_option"] == "ip-adapter-auto"
        assert [m.split(" [")[0] for m in types["IP-Adapter"]["model_list"]] == ["None", "ip-adapter_tiny"]
        assert types["Canny"]["default_model"].startswith("tiny_canny [") and types["Canny"]["default_option"] == "canny"
        assert types["All"]["default_model"] == "None" and len(types["All"]["model_list"]) == 4
        assert types["Lineart"]["module_list"] == ["none", "lineart_standard (from white bg & black line)",
                                                   "invert (from white bg & black line)"]
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB"))
        assert np.array_equal(image.astype(int), pixels(manager, ip_unit()))
        info = answer.json()["info"]
        assert "Module: ip-adapter-auto" in info and "Model: ip-adapter_tiny [" in info
    finally:
        runtime.shutdown()
