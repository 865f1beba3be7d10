"""The REST API on a real server with the shipped default model: A1111's routes driven by the PyPI client
`webuiapi` (unmodified), A1111's error bodies, per-request checkpoints, the job API, auth and ownership,
and 8 concurrent clients checked against sequential runs."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageDraw

from backend.settings import Settings

webuiapi = pytest.importorskip("webuiapi")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "Stable-diffusion" / "easel-shapes.safetensors"
USERS = {"alice": "wonderland", "bob": "builder", "root": "toor"}
SMALL = {"width": 64, "height": 64, "steps": 8, "sampler_name": "DPM++ 2M"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_controlnet(path: Path, cache: Path) -> None:
    """A ControlNet (random weights, lllyasviel's layout) that fits the default model's UNet."""
    from backend import checkpoints, random_controlnets

    unet = checkpoints.load_single_file(DEFAULT_MODEL, cache, torch.float32).unet
    path.parent.mkdir(parents=True)
    random_controlnets.save_lllyasviel(random_controlnets.for_unet(unet, seed=3), path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_cache):
    from ui.launch import ServerOptions, launch

    data = tmp_path_factory.mktemp("api-data")
    ckpt = data / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    shutil.copy(DEFAULT_MODEL, ckpt / DEFAULT_MODEL.name)
    shutil.copy(DEFAULT_MODEL, ckpt / "second-copy.safetensors")
    shutil.copytree(tokenizer_cache, data / "cache", dirs_exist_ok=True)
    shutil.copytree(ROOT / "models" / "Lora", data / "models" / "Lora")
    shutil.copytree(ROOT / "extensions", data / "extensions")
    write_controlnet(data / "models" / "ControlNet" / "shapes_canny_test.safetensors", data / "cache")
    settings = Settings(data_dir=data, default_checkpoint="easel-shapes", checkpoint_cache_size=2)
    port = free_port()
    auth = ",".join(f"{user}:{password}" for user, password in USERS.items())
    demo, url, _ = launch(settings, ServerOptions(port=port, api=True, api_auth=auth, api_admin="root"), block=False)
    yield url.rstrip("/"), port, demo
    demo.close()


@pytest.fixture
def client(server) -> webuiapi.WebUIApi:
    _, port, _ = server
    return webuiapi.WebUIApi(port=port, sampler="DPM++ 2M", steps=8, username="alice", password=USERS["alice"])


def post(server, path: str, json=None, user: str = "alice", **kwargs) -> requests.Response:
    url, _, _ = server
    return requests.post(f"{url}{path}", json=json, auth=(user, USERS[user]) if user else None, **kwargs)


def get(server, path: str, user: str = "alice", **kwargs) -> requests.Response:
    url, _, _ = server
    return requests.get(f"{url}{path}", auth=(user, USERS[user]) if user else None, **kwargs)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# -- the webuiapi client -------------------------------------------------------------------------------
def test_webuiapi_txt2img_returns_the_image_its_infotext_and_a1111s_info(client):
    result = client.txt2img(prompt="a large red star on a blue background, top left", width=64, height=64,
                            seed=11, batch_size=2)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [11, 12] and result.info["seed"] == 11
    assert result.info["infotexts"][0].startswith("a large red star on a blue background, top left\nSteps: 8, "
                                                  "Sampler: DPM++ 2M")
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]  # the PNG carries its infotext
    assert result.parameters["prompt"] == "a large red star on a blue background, top left"
    assert result.info["sd_model_name"] == "easel-shapes"


def test_webuiapi_img2img_with_a_mask_repaints_only_the_masked_area(client):
    source = Image.new("RGB", (64, 64), (40, 80, 220))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))
    result = client.img2img(images=[source], mask_image=mask, prompt="a large red circle on a blue background",
                            width=64, height=64, seed=3, denoising_strength=1.0, mask_blur=0, inpaint_full_res=False,
                            inpainting_fill=1)
    out, before = pixels(result.image), pixels(source)
    inside = np.zeros((64, 64), bool)
    inside[32:, 32:] = True
    assert np.array_equal(out[~inside], before[~inside])
    assert np.abs(out[inside] - before[inside]).mean() > 5
    assert "Mask blur: 0" in result.info["infotexts"][0] and "Denoising strength: 1" in result.info["infotexts"][0]


def test_webuiapi_lists_models_and_loras_and_switches_the_model_through_options(server):
    _, port, _ = server
    client = webuiapi.WebUIApi(port=port, sampler="DPM++ 2M", steps=8, username="root", password=USERS["root"])
    titles = client.util_get_model_names()
    assert any(t.startswith("easel-shapes.safetensors [") for t in titles)
    assert "second-copy.safetensors" in titles  # not hashed yet: titled without a hash, as A1111 does
    assert [lora["name"] for lora in client.get_loras()] == ["easel-outlined"]
    assert "DPM++ 2M" in client.util_get_sampler_names() and "karras" in client.util_get_scheduler_names()
    client.util_set_model("second-copy.safetensors", find_closest=False)
    try:
        assert client.util_get_current_model().startswith("second-copy.safetensors [")
        result = client.txt2img(prompt="a small green square", width=64, height=64, seed=1)
        assert "Model: second-copy" in result.info["infotexts"][0]
    finally:
        client.util_set_model("easel-shapes", find_closest=True)
    assert client.util_get_current_model().startswith("easel-shapes.safetensors [")


def test_webuiapi_png_info_and_extras(client):
    made = client.txt2img(prompt="a large blue square on a yellow background, center", width=64, height=64, seed=4)
    info = client.png_info(made.image)
    assert info.info == made.info["infotexts"][0]
    assert info.parameters["Seed"] == "4" and info.parameters["Size-1"] == "64"
    upscaled = client.extra_single_image(made.image, upscaler_1="Lanczos", upscaling_resize=2)
    assert upscaled.image.size == (128, 128) and "Postprocess upscale by: 2" in upscaled.info
    assert upscaled.image.info["parameters"] == made.info["infotexts"][0]  # the source's parameters are kept
    batch = client.extra_batch_images([made.image, made.image.resize((32, 32))], upscaler_1="Nearest",
                                      upscaling_resize=3)
    assert [image.size for image in batch.images] == [(192, 192), (96, 96)]


def test_webuiapi_progress_and_interrupt(client):
    results = {}

    def long_job():
        results["long"] = client.txt2img(prompt="a large green star", width=64, height=64, steps=150, n_iter=20,
                                         seed=8)

    thread = threading.Thread(target=long_job)
    thread.start()
    try:
        progress = {"progress": 0}
        while thread.is_alive() and progress["progress"] <= 0:
            progress = client.get_progress()
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
        assert progress["state"]["job"] == "txt2img" and progress["eta_relative"] > 0
    finally:
        client.interrupt()
        thread.join(120)
    assert not thread.is_alive()
    long = results["long"]
    assert long.info["interrupted"] is True and len(long.images) < 20


# -- A1111 defaults and fields -------------------------------------------------------------------------
def test_omitted_fields_take_a1111s_api_defaults(server):
    response = post(server, "/sdapi/v1/txt2img", {"prompt": "a red circle", "width": 64, "height": 64, "seed": 2})
    assert response.status_code == 200
    text = decoded(response.json()["images"][0]).info["parameters"]
    # Euler has no schedule of its own: A1111 samples the model's spacing and writes "Automatic"
    assert "Steps: 50, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 2" in text


def test_infotext_fills_the_fields_the_request_leaves_unset(server):
    first = post(server, "/sdapi/v1/txt2img", {"prompt": "a small purple cross", **SMALL, "seed": 77}).json()
    text = json.loads(first["info"])["infotexts"][0]
    again = post(server, "/sdapi/v1/txt2img", {"infotext": text}).json()
    assert json.loads(again["info"])["infotexts"][0] == text
    assert np.array_equal(pixels(decoded(again["images"][0])), pixels(decoded(first["images"][0])))
    other = post(server, "/sdapi/v1/txt2img", {"infotext": text, "seed": 78}).json()
    assert "Seed: 78," in json.loads(other["info"])["infotexts"][0]


def test_sampler_parameters_come_from_the_body_the_settings_and_the_infotext(server):
    body = {"prompt": "a small purple cross", **SMALL, "seed": 79, "sampler_name": "Euler a", "steps": 4}
    eta = post(server, "/sdapi/v1/txt2img", {**body, "eta": 0.5}).json()
    text = json.loads(eta["info"])["infotexts"][0]
    assert "Eta: 0.5" in text
    setting = post(server, "/sdapi/v1/txt2img", {**body, "override_settings": {"eta_ancestral": 0.5}}).json()
    pasted = post(server, "/sdapi/v1/txt2img", {"infotext": text}).json()
    plain = post(server, "/sdapi/v1/txt2img", body).json()
    assert np.array_equal(pixels(decoded(setting["images"][0])), pixels(decoded(eta["images"][0])))
    assert np.array_equal(pixels(decoded(pasted["images"][0])), pixels(decoded(eta["images"][0])))
    assert not np.array_equal(pixels(decoded(plain["images"][0])), pixels(decoded(eta["images"][0])))
    # the body's s_noise is for this request; the server's options are unchanged
    noisy = post(server, "/sdapi/v1/txt2img", {**body, "sampler_name": "DPM++ 2M SDE", "s_noise": 0.5}).json()
    assert "Sigma noise: 0.5" in json.loads(noisy["info"])["infotexts"][0]
    assert get(server, "/sdapi/v1/options").json()["s_noise"] == 1.0


def test_controlnet_routes_and_units_as_sd_webui_controlnet_clients_send_them(server, client):
    assert get(server, "/controlnet/version").json() == {"version": 2}
    models = get(server, "/controlnet/model_list").json()["model_list"]
    assert len(models) == 1 and models[0].startswith("shapes_canny_test [")
    modules = get(server, "/controlnet/module_list?alias_names=true").json()
    assert "canny" in modules["module_list"] and modules["module_detail"]["canny"]["sliders"]
    edges = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(edges).ellipse((8, 8, 40, 40), outline="black", width=3)
    detected = post(server, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [
        b64(edges)], "controlnet_processor_res": 64}).json()
    detected_map = decoded(detected["images"][0])
    assert detected_map.size == (64, 64) and 0 < pixels(detected_map).mean() < 64  # white edges on black
    unit = webuiapi.ControlNetUnit(image=edges, module="canny", model=models[0], weight=1.0)
    body = dict(prompt="a red circle", seed=11, width=64, height=64, steps=4, sampler_name="Euler")
    steered = client.txt2img(**body, controlnet_units=[unit])
    plain = post(server, "/sdapi/v1/txt2img", body).json()  # not the client: it keeps the units (a mutable default)
    assert "ControlNet 0: " in steered.info["infotexts"][0] and f"Model: {models[0]}" in steered.info["infotexts"][0]
    assert not np.array_equal(pixels(steered.image), pixels(decoded(plain["images"][0])))
    unknown = post(server, "/sdapi/v1/txt2img", {**body, "alwayson_scripts": {"controlnet": {"args": [
        {"model": "nope", "module": "canny", "input_image": b64(edges)}]}}})
    assert unknown.status_code == 404 and "shapes_canny_test [" in unknown.text
    bad = post(server, "/controlnet/detect", {"controlnet_module": "cany", "controlnet_input_images": ["x"]})
    assert bad.status_code == 422 and "canny" in bad.text


def test_a_per_request_checkpoint_applies_to_that_request_only(server):
    body = {"prompt": "a large red star", **SMALL, "seed": 5}
    switched = post(server, "/sdapi/v1/txt2img", {**body, "override_settings": {"sd_model_checkpoint": "second-copy"}})
    assert "Model: second-copy" in switched.json()["info"]
    after = post(server, "/sdapi/v1/txt2img", body)
    assert "Model: easel-shapes" in after.json()["info"]
    assert get(server, "/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("easel-shapes.safetensors")


@pytest.mark.parametrize("path, body, status, words", [
    ("/sdapi/v1/txt2img", {"sampler_name": "Euler b", "width": 64, "height": 64}, 422, "unknown sampler 'Euler b'"),
    ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, 404, "nope"),
    ("/sdapi/v1/txt2img", {"width": 65}, 422, "width must be a multiple of 8"),
    ("/sdapi/v1/txt2img", {"width": 99999}, 422, "between 64 and 4096"),
    ("/sdapi/v1/txt2img", {"steps": "many"}, 422, "valid integer"),
    ("/sdapi/v1/txt2img", {"alwayson_scripts": {"ControlNet": {"args": [{"model": "x", "weight": "heavy"}]}}}, 422,
     "ControlNet unit 0: weight must be a number"),
    ("/sdapi/v1/txt2img", {"alwayson_scripts": {"ADetailer": {"args": []}}}, 422, "script not found: ADetailer"),
    ("/sdapi/v1/img2img", {"init_images": ["%%% not base64"]}, 422, "not valid base64"),
    ("/sdapi/v1/img2img", {"init_images": [base64.b64encode(b"hello world").decode()]}, 422, "not an image"),
    ("/sdapi/v1/img2img", {"init_images": []}, 422, "init_images is empty"),
    ("/sdapi/v1/extra-single-image", {"image": "", "upscaler_1": "Lanczos"}, 422, "image is empty"),
    ("/sdapi/v1/png-info", {"image": 42}, 422, "valid string"),
])
def test_bad_input_is_a_4xx_with_a1111s_error_body(server, path, body, status, words):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    content = response.json()
    assert set(content) == {"error", "detail", "body", "errors"} and words in response.text


def test_unknown_upscaler_in_extras_is_a_clear_error(server):
    image = b64(Image.new("RGB", (16, 16), (1, 2, 3)))
    response = post(server, "/sdapi/v1/extra-single-image", {"image": image, "upscaler_1": "R-ESRGAN 9x"})
    assert response.status_code == 422 and "upscaler 'R-ESRGAN 9x' not found" in response.json()["detail"]
    broken = post(server, "/sdapi/v1/txt2img", data=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 422


def test_alwayson_scripts_reach_the_extensions(server):
    scripts = get(server, "/sdapi/v1/scripts").json()
    assert {"cfg rescale", "dynamic thresholding (cfg scale fix)"} <= set(scripts["txt2img"])
    body = {"prompt": "a large red star", **SMALL, "seed": 3, "cfg_scale": 12}
    rescaled = post(server, "/sdapi/v1/txt2img", {**body, "alwayson_scripts": {"CFG rescale": {"args": [0.7]}}})
    assert "CFG Rescale phi: 0.7" in json.loads(rescaled.json()["info"])["infotexts"][0]
    plain = post(server, "/sdapi/v1/txt2img", body).json()
    assert "CFG Rescale" not in plain["info"]
    unknown = post(server, "/sdapi/v1/txt2img", {**body, "alwayson_scripts": {"ADetailer": {"args": [False]}}})
    assert unknown.status_code == 422 and "ADetailer" in unknown.json()["detail"]
    assert "cfg rescale" in unknown.json()["detail"]  # and what there is


# -- concurrency -----------------------------------------------------------------------------------------
def test_eight_concurrent_clients_get_exactly_their_sequential_results(server):
    bodies = [{"prompt": f"a {size} {colour} circle on a white background", **SMALL, "seed": 100 + i}
              for i, (size, colour) in enumerate(zip(["large", "small"] * 4,
                                                     ["red", "blue", "green", "yellow", "purple", "orange",
                                                      "black", "cyan"]))]
    users = ["alice", "bob", "root", "alice", "bob", "root", "alice", "bob"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda args: post(server, "/sdapi/v1/txt2img", args[0], user=args[1]).json(),
                                 zip(bodies, users)))
    for body, response in zip(bodies, together):
        alone = post(server, "/sdapi/v1/txt2img", body).json()
        assert response["info"] != "" and body["prompt"] in response["info"]
        assert json.loads(response["info"])["infotexts"] == \
            json.loads(alone["info"])["infotexts"]
        assert np.array_equal(pixels(decoded(response["images"][0])), pixels(decoded(alone["images"][0])))


# -- jobs, auth and ownership ---------------------------------------------------------------------------
def test_jobs_submit_poll_result_and_only_the_owner_or_an_admin_cancels(server):
    long = post(server, "/easel/v1/jobs/txt2img", {"prompt": "x", **SMALL, "steps": 150, "n_iter": 10})
    assert long.status_code == 202
    waiting = post(server, "/easel/v1/jobs/txt2img", {"prompt": "a small red star", **SMALL, "seed": 9}).json()
    third = post(server, "/easel/v1/jobs/txt2img", {"prompt": "y", **SMALL}, user="bob").json()
    assert waiting["status"] == "queued" and waiting["position"] >= 1
    assert third["position"] == waiting["position"] + 1
    # bob cannot cancel alice's job, nor see it; alice can cancel hers; the admin can cancel anyone's
    url, _, _ = server
    denied = requests.delete(f"{url}/easel/v1/jobs/{long.json()['id']}", auth=("bob", USERS["bob"]))
    assert denied.status_code == 403 and set(denied.json()) == {"error", "detail", "body", "errors"}
    assert get(server, f"/easel/v1/jobs/{long.json()['id']}", user="bob").status_code == 404
    assert post(server, f"/sdapi/v1/interrupt?job_id={long.json()['id']}", user="bob").status_code == 403
    cancelled = requests.delete(f"{url}/easel/v1/jobs/{third['id']}", auth=("root", USERS["root"])).json()
    assert cancelled["status"] == "cancelled"
    assert get(server, f"/easel/v1/jobs/{third['id']}/result", user="bob").status_code == 409
    requests.delete(f"{url}/easel/v1/jobs/{long.json()['id']}", auth=("alice", USERS["alice"]))
    while (status := get(server, f"/easel/v1/jobs/{waiting['id']}").json())["status"] != "done":
        assert status["status"] in ("queued", "running")
    result = get(server, f"/easel/v1/jobs/{waiting['id']}/result").json()
    alone = post(server, "/sdapi/v1/txt2img", {"prompt": "a small red star", **SMALL, "seed": 9}).json()
    assert np.array_equal(pixels(decoded(result["images"][0])), pixels(decoded(alone["images"][0])))
    assert get(server, f"/easel/v1/jobs/{long.json()['id']}").json()["status"] == "done"  # interrupted, kept
    bobs = {job["id"] for job in get(server, "/easel/v1/jobs", user="bob").json()}
    everyone = {job["id"] for job in get(server, "/easel/v1/jobs", user="root").json()}
    assert third["id"] in bobs and waiting["id"] not in bobs and {third["id"], waiting["id"]} <= everyone


@pytest.mark.parametrize("auth", [None, ("alice", "wrong"), ("mallory", "wonderland")])
def test_wrong_or_missing_credentials_get_401(server, auth):
    url, _, _ = server
    assert get(server, "/sdapi/v1/sd-models").status_code == 200  # a success clears this address's slow-down
    for response in (requests.get(f"{url}/sdapi/v1/sd-models", auth=auth),
                     requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x"}, auth=auth),
                     requests.get(f"{url}/docs", auth=auth)):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Basic"


def test_openapi_lists_the_api_and_docs_are_served(server):
    spec = get(server, "/openapi.json").json()
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options", "/sdapi/v1/progress",
                 "/easel/v1/jobs/txt2img", "/easel/v1/jobs/{job_id}"):
        assert path in spec["paths"]
    assert not any(path.startswith("/gradio_api") for path in spec["paths"])
    assert "swagger" in get(server, "/docs").text.lower()


def test_nowebui_serves_the_api_alone(tmp_path, tokenizer_cache):
    from ui.launch import ServerOptions, launch

    ckpt = tmp_path / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    shutil.copy(DEFAULT_MODEL, ckpt / DEFAULT_MODEL.name)
    shutil.copytree(tokenizer_cache, tmp_path / "cache", dirs_exist_ok=True)
    handle, url, _ = launch(Settings(data_dir=tmp_path), ServerOptions(port=free_port(), nowebui=True, api=True),
                            block=False)
    try:
        made = requests.post(f"{url}sdapi/v1/txt2img", json={"prompt": "a red star", **SMALL, "seed": 1}).json()
        assert decoded(made["images"][0]).size == (64, 64)
        assert requests.get(f"{url}sdapi/v1/samplers").status_code == 200
        assert requests.get(url).status_code == 404  # no web UI
        assert "/sdapi/v1/txt2img" in requests.get(f"{url}openapi.json").json()["paths"]
    finally:
        handle.close()


def test_unload_checkpoint_is_for_admins_and_the_next_request_loads_the_model_again(server):
    runtime = server[2].easel_context.runtime
    assert post(server, "/sdapi/v1/unload-checkpoint", user="alice").status_code == 403
    assert post(server, "/sdapi/v1/unload-checkpoint", user="root").status_code == 200
    assert runtime.manager.loaded == [] and runtime.manager.active is None
    response = post(server, "/sdapi/v1/txt2img", {"prompt": "a red circle", **SMALL, "seed": 3})
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert runtime.manager.loaded == ["easel-shapes"]
