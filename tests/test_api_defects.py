"""Defects found by attacking the API and by careless clients, each reproduced: per-request VAE
overrides that stuck, server-wide options any user could change, folders outside Easel's, 500s where a
4xx is due, JPEG parameters, control routes stuck behind waiting generations, slow-down of failed logins."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from api import ApiContext, mount
from api.access import ApiAccess, FailedLogins
from backend import ldm_layout
from backend.extensions import NO_EXTENSIONS
from backend.options import Options
from backend.runtime import Runtime
from backend.styles import StyleDatabase

SMALL = {"prompt": "a red star", "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler", "seed": 3}
USERS = [("ann", "pw"), ("root", "toor")]


def make_runtime(manager, tmp_path, options: Options | None = None) -> Runtime:
    manager.select()
    return Runtime(manager.settings, options or Options(save_images=False), tmp_path / "config.json", manager,
                   NO_EXTENSIONS, StyleDatabase(tmp_path / "styles.csv"))


@pytest.fixture
def runtime(sd1_manager, tmp_path):
    runtime = make_runtime(sd1_manager, tmp_path)
    yield runtime
    runtime.shutdown()


@pytest.fixture
def client(runtime):
    app = FastAPI()
    mount(app, ApiContext(runtime, ApiAccess.from_pairs(USERS, ["root"])))
    return TestClient(app)


ANN, ROOT = ("ann", "pw"), ("root", "toor")


def infotext_of(response) -> str:
    return json.loads(response.json()["info"])["infotexts"][0]


# -- 1. per-request VAE ------------------------------------------------------------------------------
def test_a_request_vae_applies_to_that_request_only_and_a_bad_one_changes_nothing(runtime, client, tiny_models):
    vae_dir = runtime.settings.model_dir("vae")
    vae_dir.mkdir(parents=True)
    other = {k: v + 0.01 for k, v in tiny_models["sd1"]["vae"].state_dict().items()}
    save_file({k: v.contiguous() for k, v in ldm_layout.vae_to_ldm(other, prefix="").items()}, vae_dir / "other.safetensors")
    (vae_dir / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    runtime.manager.refresh()

    with_vae = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_vae": "other.safetensors"}},
                           auth=ANN)
    assert with_vae.status_code == 200 and "VAE: other.safetensors" in infotext_of(with_vae)
    after = client.post("/sdapi/v1/txt2img", json=SMALL, auth=ANN)
    assert "VAE:" not in infotext_of(after), "the request's VAE stuck for the next request"
    assert client.get("/sdapi/v1/options", auth=ANN).json()["sd_vae"] == "Automatic"

    unknown = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_vae": "nope"}}, auth=ANN)
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    broken = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_vae": "broken.safetensors"}},
                         auth=ANN)
    assert broken.status_code == 422 and "broken.safetensors" in broken.json()["detail"]
    again = client.post("/sdapi/v1/txt2img", json=SMALL, auth=ANN)
    assert again.status_code == 200 and infotext_of(again) == infotext_of(after)
    # The admin keeps a VAE server-wide; a failing one leaves the previous choice
    kept = {**SMALL, "override_settings": {"sd_vae": "other.safetensors"}, "override_settings_restore_afterwards": False}
    assert client.post("/sdapi/v1/txt2img", json=kept, auth=ROOT).status_code == 200
    assert client.get("/sdapi/v1/options", auth=ANN).json()["sd_vae"] == "other.safetensors"
    assert client.post("/sdapi/v1/options", json={"sd_vae": "broken.safetensors"}, auth=ROOT).status_code == 422
    assert client.get("/sdapi/v1/options", auth=ANN).json()["sd_vae"] == "other.safetensors"
    assert runtime.manager.active.vae_name == "other.safetensors"


# -- 3. server-wide options ----------------------------------------------------------------------------
def test_only_admins_change_server_options_and_folders_are_checked(runtime, client):
    refused = client.post("/sdapi/v1/options", json={"samples_save": True}, auth=ANN)
    assert refused.status_code == 403 and "admin" in refused.json()["detail"]
    assert runtime.options.save_images is False
    for folder in ("/", "/etc", str(runtime.settings.models_dir / "Stable-diffusion"), "models", "cache/x"):
        answer = client.post("/sdapi/v1/options", json={"outdir_img2img": folder}, auth=ROOT)
        assert answer.status_code == 422, folder
        assert "outdir_img2img" in answer.json()["detail"]
    assert runtime.options.outdir_img2img == ""
    assert not runtime.options_path.exists()
    ok = client.post("/sdapi/v1/options", json={"outdir_img2img": "my-images", "samples_save": True,
                                                "live_preview_every": 3}, auth=ROOT)
    assert ok.status_code == 200
    assert runtime.options.outdir_img2img == "my-images" and runtime.options.save_images is True
    assert runtime.output_dir("img2img") == runtime.settings.data_dir / "my-images"
    assert '"live_preview_every": 3' in runtime.options_path.read_text()
    # a wrongly typed value changes nothing
    assert client.post("/sdapi/v1/options", json={"live_preview_every": "3", "save_txt": True},
                       auth=ROOT).status_code == 422
    assert runtime.options.save_txt is False
    # a per-request folder is an admin's choice too
    body = {**SMALL, "override_settings": {"outdir_txt2img": "elsewhere"}}
    assert client.post("/sdapi/v1/txt2img", json=body, auth=ANN).status_code == 403


def test_per_request_options_apply_to_that_request(runtime, client):
    body = {**SMALL, "save_images": True, "override_settings": {"samples_filename_pattern": "[seed]-[steps]"}}
    made = client.post("/sdapi/v1/txt2img", json=body, auth=ANN)
    assert made.status_code == 200
    saved = sorted(runtime.output_dir("txt2img").rglob("*.png"))
    assert [p.name for p in saved] == ["00000-3-2.png"]
    assert runtime.options.filename_pattern == "[seed]"


def test_unsafe_folder_options_in_config_json_fall_back_to_the_default(settings, sd1_manager):
    (settings.data_dir / "config.json").write_text('{"outdir_img2img": "/", "outdir_txt2img": "fine"}')
    stale = settings.data_dir / ".config-abc123.json"
    stale.write_text("{")
    runtime = Runtime.create(settings, manager=sd1_manager)
    assert runtime.options.outdir_img2img == "" and runtime.options.outdir_txt2img == "fine"
    assert runtime.output_dir("img2img") == settings.output_root / "img2img-images"
    assert not stale.exists()
    runtime.shutdown()


# -- 7. 500s where a 4xx is due ------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, words", [
    ({"hr_second_pass_steps": 2**70}, 422, "hr_second_pass_steps"),
    ({"seed": 2**70}, 422, "seed"),
    ({"override_settings": {"CLIP_stop_at_last_layers": "two"}}, 422, "CLIP_stop_at_last_layers"),
    ({"override_settings": {"sd_vae": 3}}, 422, "sd_vae"),
    ({"override_settings": {"live_preview_every": "often"}}, 422, "live_preview_every"),
    ({"override_settings": {"sd_model_checkpoint": "no-such-model"}}, 404, "no-such-model"),
    ({"prompt": "x <lora:easel-outlined:1e308>"}, 422, "strength"),
    ({"prompt": "x <lora:easel-outlined:nan>"}, 422, "strength"),
    ({"prompt": "x" * 100_000}, 422, "prompt"),
])
def test_bad_values_are_a_4xx_not_a_500(client, body, status, words):
    answer = client.post("/sdapi/v1/txt2img", json={**SMALL, **body}, auth=ANN)
    assert answer.status_code == status, answer.text[:300]
    assert words.lower() in answer.text.lower()


def test_an_infotext_with_non_finite_numbers_is_not_a_500(client):
    answer = client.post("/sdapi/v1/txt2img", json={**SMALL, "infotext": "a cat\nSteps: inf, Seed: nan, CFG scale: 1e400"},
                         auth=ANN)
    assert answer.status_code == 200
    assert "Steps: 2" in infotext_of(answer) and "Seed: 3" in infotext_of(answer)


def test_a_refused_pickle_checkpoint_is_the_same_4xx_as_other_bad_checkpoints(runtime, client):
    class Evil:
        def __reduce__(self):
            return (print, ("this pickle runs code",))

    import pickle

    folder = runtime.settings.model_dir("checkpoints")
    (folder / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    (folder / "junk.safetensors").write_bytes(b"\x00" * 64)
    runtime.manager.refresh()
    for name in ("evil.ckpt", "junk.safetensors"):
        answer = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}, auth=ROOT)
        assert answer.status_code == 422, answer.text
        assert name in answer.json()["detail"]
    assert runtime.manager.active.file.name == "tiny-sd1"


# -- 8. JPEG parameters ----------------------------------------------------------------------------------
def test_png_info_reads_a_jpegs_exif_user_comment(client):
    text = "a cat\nNegative prompt: dog\nSteps: 12, Sampler: Euler a, CFG scale: 6, Seed: 42, Size: 64x64"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="JPEG", exif=exif)
    answer = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()}, auth=ANN)
    assert answer.status_code == 200
    assert answer.json()["info"] == text
    assert answer.json()["parameters"]["Seed"] == "42" and answer.json()["parameters"]["Negative prompt"] == "dog"


# -- 6. control routes under load ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_progress_and_interrupt_answer_while_many_generations_wait(runtime):
    from ui.launch import ApiServer

    app = FastAPI()
    mount(app, ApiContext(runtime))
    port = free_port()
    server = ApiServer(app, "127.0.0.1", port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    gate = threading.Event()
    blocker = runtime.device.submit(lambda control: gate.wait(60), "someone", "hold")
    waiting = 48  # more than the server's 40 worker threads
    pool = ThreadPoolExecutor(waiting)
    try:
        futures = [pool.submit(requests.post, f"{url}/sdapi/v1/txt2img", json=SMALL, timeout=120)
                   for _ in range(waiting)]
        while runtime.device.queue_length < waiting and not any(f.done() for f in futures):
            gate.wait(0.05)
        # With every generation holding a server thread, these used to wait for the device.
        progress = requests.get(f"{url}/sdapi/v1/progress", timeout=20)
        assert progress.status_code == 200 and progress.json()["queue_length"] == waiting
        assert requests.post(f"{url}/sdapi/v1/interrupt", timeout=20).status_code == 200
        assert blocker.control.interrupted
    finally:
        gate.set()
        results = [f.result() for f in futures]
        pool.shutdown()
        server.close()
    assert all(r.status_code == 200 for r in results)


# -- 12. failed logins ----------------------------------------------------------------------------------
def test_failed_logins_wait_longer_each_time_and_a_success_clears_them():
    now = [0.0]
    failures = FailedLogins(base=0.5, ceiling=4.0, forget_after=60, clock=lambda: now[0])
    assert [failures.failed("1.2.3.4") for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert failures.failed("5.6.7.8") == 0.5  # per address
    failures.succeeded("1.2.3.4")
    assert failures.failed("1.2.3.4") == 0.5
    now[0] = 1000.0  # long after: forgotten
    assert failures.failed("5.6.7.8") == 0.5


def test_the_api_slows_down_wrong_passwords(runtime):
    waited = []

    async def record(seconds):
        waited.append(seconds)

    access = ApiAccess.from_pairs(USERS, ["root"])
    access.sleep = record
    app = FastAPI()
    mount(app, ApiContext(runtime, access))
    client = TestClient(app)
    for _ in range(3):
        assert client.get("/sdapi/v1/progress", auth=("ann", "guess")).status_code == 401
    assert client.get("/sdapi/v1/progress").status_code == 401  # no credentials: nothing to slow down
    assert waited == [0.5, 1.0, 2.0]
    assert client.get("/sdapi/v1/progress", auth=ANN).status_code == 200


def test_model_files_are_not_served_and_a_foreign_host_is_refused(settings, model_files):
    from tests.conftest import install
    from ui.launch import ServerOptions, launch

    install(settings, model_files["sd1"])
    lora = settings.model_dir("lora")
    lora.mkdir(parents=True)
    (lora / "secret.safetensors").write_bytes(b"weights")
    demo, url, _ = launch(settings, ServerOptions(port=free_port(), api=True), block=False)
    try:
        base = url.rstrip("/")
        cached = next(p for p in settings.cache_dir.rglob("*") if p.is_file())  # the tokenizer's vocabulary
        for path in (lora / "secret.safetensors", settings.model_dir("checkpoints") / "tiny-sd1.safetensors",
                     cached, "/etc/passwd"):
            answer = requests.get(f"{base}/gradio_api/file={path}", timeout=30)
            assert answer.status_code in (403, 404), path
        assert requests.get(f"{base}/sdapi/v1/progress", timeout=30).status_code == 200
        foreign = requests.get(f"{base}/sdapi/v1/progress", headers={"Host": "attacker.example:7860"}, timeout=30)
        assert foreign.status_code == 403 and "localhost" in foreign.text
        assert requests.get(base, headers={"Host": "rebind.example"}, timeout=30).status_code == 403
        assert requests.get(base, headers={"Host": "localhost"}, timeout=30).status_code == 200
    finally:
        demo.close()


def test_the_ui_login_slows_down_failed_sign_ins():
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ui.launch import SlowFailedLogins

    async def login(request):
        form = await request.form()
        ok = form.get("password") == "right"
        return JSONResponse({"success": ok}, status_code=200 if ok else 400)

    waited = []

    async def record(seconds):
        waited.append(seconds)

    app = Starlette(routes=[Route("/login", login, methods=["POST"]), Route("/other", login, methods=["POST"])],
                    middleware=[Middleware(SlowFailedLogins, failures=FailedLogins(base=0.5), sleep=record)])
    client = TestClient(app)
    for _ in range(3):
        assert client.post("/login", data={"password": "guess"}).status_code == 400
    assert client.post("/other", data={"password": "guess"}).status_code == 400  # only the login route
    assert waited == [0.5, 1.0, 2.0]
    assert client.post("/login", data={"password": "right"}).status_code == 200
    assert client.post("/login", data={"password": "guess"}).status_code == 400
    assert waited[-1] == 0.5  # a success cleared the count


def test_the_job_status_reports_images_and_warnings_once_finished(runtime, client):
    body = {**SMALL, "override_settings": {"not_an_option": 1}}
    job = client.post("/easel/v1/jobs/txt2img", json=body, auth=ANN).json()
    runtime.device.get(job["id"]).wait(120)
    status = client.get(f"/easel/v1/jobs/{job['id']}", auth=ANN).json()
    assert status["status"] == "done" and status["images"] == 1
    assert status["warnings"] == ["override setting 'not_an_option' is not an option Easel knows; ignored"]
    assert client.get(f"/easel/v1/jobs/{job['id']}", auth=ROOT).status_code == 200  # an admin sees it
    assert client.get(f"/easel/v1/jobs/{job['id']}", auth=("root", "wrong")).status_code == 401


def test_the_checkpoint_cache_flag_wins_over_the_saved_option(settings, sd1_manager):
    (settings.data_dir / "config.json").write_text('{"checkpoint_cache": 3}')
    assert Runtime.create(settings).manager.settings.checkpoint_cache_size == 3
    flagged = Runtime.create(settings.with_changes(checkpoint_cache_size=2))
    assert flagged.options.checkpoint_cache == 2 and flagged.manager.settings.checkpoint_cache_size == 2
    flagged.apply({"save_txt": True}, save=False)  # another option changing keeps it
    assert flagged.manager.settings.checkpoint_cache_size == 2


# -- 5. a failed save ---------------------------------------------------------------------------------------
def test_a_failed_save_still_returns_the_images_with_a_warning(runtime, client, monkeypatch):
    import errno

    from backend import outputs

    real = outputs.save_image

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "save_image", full_disk)
    answer = client.post("/sdapi/v1/txt2img", json={**SMALL, "save_images": True, "batch_size": 2}, auth=ANN)
    assert answer.status_code == 200 and len(answer.json()["images"]) == 2
    info = json.loads(answer.json()["info"])
    assert [w for w in info["warnings"] if w.startswith("saving failed: No space left on device")] == [info["warnings"][0]]
    assert not list(runtime.settings.output_root.rglob("*.png"))
    monkeypatch.setattr(outputs, "save_image", real)
    saved = client.post("/sdapi/v1/txt2img", json={**SMALL, "save_images": True}, auth=ANN)
    assert json.loads(saved.json()["info"])["warnings"] == [] and len(list(runtime.settings.output_root.rglob("*.png"))) == 1


def test_an_a1111_infotext_without_rng_runs_on_nvidias_noise(client):
    """A1111's default source is its GPU's; pasted here (no NVIDIA GPU), NV reproduces that noise."""
    answer = client.post("/sdapi/v1/txt2img", json={**SMALL, "infotext": "a cat\nSteps: 2, Sampler: Euler, Seed: 3"},
                         auth=ANN)
    assert answer.status_code == 200 and "RNG: NV" in infotext_of(answer)
    cpu = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"randn_source": "CPU"}}, auth=ANN)
    assert "RNG: CPU" in infotext_of(cpu)
    bad = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"randn_source": "TPU"}}, auth=ANN)
    assert bad.status_code == 422 and "random number source" in bad.json()["detail"]
