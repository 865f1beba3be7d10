"""`--workers 2`: the API server in front of two generation replicas on a local Ray instance (Ray Serve),
against a single-process Easel on the same folders: equal images, routing by checkpoint (loads counted),
interrupt / cancel / progress reaching the right replica, a replica SIGKILLed mid-job, a checkpoint no
replica can load, the cluster view, and the KubeRay manifest."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from backend.settings import Settings
from tests.test_api import free_port

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "Stable-diffusion" / "easel-shapes.safetensors"
USERS = {"alice": "wonderland", "bob": "builder", "carol": "singer", "root": "toor"}
SMALL = {"width": 64, "height": 64, "steps": 6, "sampler_name": "DPM++ 2M", "save_images": True}
SHAPES, TINY = "easel-shapes.safetensors", "tiny-sd1.safetensors"


def serve(data: Path, workers: int):
    """An API-only server (HTTP Basic users, root the admin) on `data`; returns (url, runtime, server)."""
    from ui.launch import ServerOptions, launch

    settings = Settings(data_dir=data, default_checkpoint="easel-shapes", checkpoint_cache_size=2, workers=workers)
    auth = ",".join(f"{user}:{password}" for user, password in USERS.items())
    server, url, _ = launch(settings, ServerOptions(port=free_port(), api=True, nowebui=True, api_auth=auth, api_admin="root"),
                            block=False)
    return url.rstrip("/"), server.server.config.app.state.easel_api.runtime, server


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_cache, model_files) -> Path:
    data = tmp_path_factory.mktemp("cluster-data")
    checkpoints = data / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    shutil.copy(DEFAULT_MODEL, checkpoints / SHAPES)
    shutil.copy(model_files["sd1"], checkpoints / TINY)
    (checkpoints / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2, 3]}" + b"\0" * 64)
    shutil.copytree(tokenizer_cache, data / "cache", dirs_exist_ok=True)
    return data


@pytest.fixture(scope="module")
def cluster(data):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray for a test instance
    url, runtime, server = serve(data, workers=2)
    yield url, runtime
    server.close()
    runtime.shutdown()


@pytest.fixture(scope="module")
def single(data):
    url, runtime, server = serve(data, workers=0)
    yield url
    server.close()
    runtime.shutdown()


def call(url: str, method: str, path: str, user: str = "alice", **kwargs) -> requests.Response:
    return requests.request(method, f"{url}{path}", auth=(user, USERS[user]), timeout=300, **kwargs)


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.int16)


def txt2img(url: str, body: dict, user: str = "alice") -> dict:
    response = call(url, "POST", "/sdapi/v1/txt2img", user, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def workers(url: str) -> list[dict]:
    response = call(url, "GET", "/easel/v1/cluster", "root")
    assert response.status_code == 200, response.text
    return response.json()["replicas"]


def wait_for(url: str, job_id: str, user: str, until) -> dict:
    """Poll a job's status until `until(status)` holds (each poll is a request: no fixed waits)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = call(url, "GET", f"/easel/v1/jobs/{job_id}", user).json()
        if until(status):
            return status
    raise AssertionError(f"job {job_id} never reached the state: last {status}")


def submit(url: str, body: dict, user: str = "alice") -> dict:
    response = call(url, "POST", "/easel/v1/jobs/txt2img", user, json=body)
    assert response.status_code == 202, response.text
    return response.json()


def running_on(url: str, job_id: str, user: str) -> dict:
    """Wait until the job has made a step on a replica; its status, with the replica's row added."""
    status = wait_for(url, job_id, user, lambda s: s["status"] != "queued" and (s["step"] or 0) >= 1
                      or s["status"] in ("done", "failed"))
    rows = {row["id"]: row for row in workers(url)}
    return {**status, "replica": rows.get(status["worker"])}


# -- the same images, routed by checkpoint ------------------------------------------------------------------
def test_every_image_equals_the_single_process_one(cluster, single):
    url, _ = cluster
    bodies = [{"prompt": "a red circle", **SMALL, "seed": 5, "batch_size": 2},
              {"prompt": "a blue square", **SMALL, "seed": 7, "override_settings": {"sd_model_checkpoint": TINY}},
              {"prompt": "a green star", **SMALL, "seed": 9, "n_iter": 2, "enable_hr": True, "hr_scale": 1.5,
               "hr_second_pass_steps": 2, "denoising_strength": 0.5}]
    for body in bodies:
        there, here = txt2img(url, body), txt2img(single, body)
        assert len(there["images"]) == len(here["images"]) >= 1
        assert json.loads(there["info"])["infotexts"] == json.loads(here["info"])["infotexts"]
        for a, b in zip(there["images"], here["images"]):
            assert np.array_equal(pixels(a), pixels(b))
    # the images were written by the replica into the configured outputs folder
    saved = sorted((cluster[1].settings.output_root / "txt2img-images").rglob("*.png"))
    assert saved and all(path.stat().st_size > 0 for path in saved)


def test_eight_clients_alternating_checkpoints_load_each_once_per_replica(cluster, single):
    url, _ = cluster
    users = ["alice", "bob", "carol", "root"] * 2
    bodies = [{"prompt": f"a shape number {i}", **SMALL, "seed": 40 + i,
               "override_settings": {"sd_model_checkpoint": (SHAPES, TINY)[i % 2]}} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda pair: txt2img(url, *pair), zip(bodies, users)))
    for body, response in zip(bodies, together):
        info = json.loads(response["info"])
        assert info["prompt"] == body["prompt"] and info["seed"] == body["seed"]
        assert np.array_equal(pixels(response["images"][0]), pixels(txt2img(single, body)["images"][0]))
    rows = workers(url)
    assert len(rows) == 2 and {row["device"] for row in rows} == {"cpu"}
    runtime = cluster[1]  # the front end loaded nothing; the UI reads the native size from the file
    assert runtime.manager.active is None and runtime.manager.file_native_size(SHAPES) == 64
    for row in rows:  # two checkpoints, a cache of two: no replica ever loaded one twice
        assert 1 <= row["loads"] <= 2 and len(row["loaded"]) == row["loads"], rows
        assert row["pid"] != os.getpid() and row["running"] is None
    # A1111's unload-checkpoint reaches every replica (each within a heartbeat)
    assert call(url, "POST", "/sdapi/v1/unload-checkpoint", "root").status_code == 200
    deadline = time.monotonic() + 30
    while any(row["loaded"] for row in workers(url)):
        assert time.monotonic() < deadline, workers(url)
    # each user sees only their own jobs
    seen = {job["id"] for job in call(url, "GET", "/easel/v1/jobs", "bob").json()}
    everyone = {job["id"] for job in call(url, "GET", "/easel/v1/jobs", "root").json()}
    bobs = {json.loads(r["info"])["job_id"] for r, user in zip(together, users) if user == "bob"}
    assert bobs <= seen < everyone and call(url, "GET", "/easel/v1/cluster", "bob").status_code == 403


# -- control reaches the right replica ----------------------------------------------------------------------
def test_progress_interrupt_and_cancel_reach_the_replica_running_the_job(cluster):
    url, _ = cluster
    long = {"prompt": "x", **SMALL, "steps": 400, "save_images": False}
    mine, theirs = submit(url, {**long, "seed": 1}), submit(url, {**long, "seed": 2, "n_iter": 2}, user="bob")
    a, b = running_on(url, mine["id"], "alice"), running_on(url, theirs["id"], "bob")
    assert a["worker"] and b["worker"] and a["worker"] != b["worker"]  # one job per replica, both running
    assert a["replica"]["running"] == mine["id"] and b["replica"]["running"] == theirs["id"]
    progress = call(url, "GET", "/sdapi/v1/progress", "alice").json()
    assert progress["current_task"] == mine["id"] and 1 <= progress["state"]["sampling_step"] < 400
    assert progress["state"]["sampling_steps"] == 400
    # alice's interrupt stops her job only
    assert call(url, "POST", "/sdapi/v1/interrupt", "alice").status_code == 200
    done = wait_for(url, mine["id"], "alice", lambda s: s["status"] == "done")
    assert done["step"] < 400 and call(url, "GET", f"/easel/v1/jobs/{theirs['id']}", "bob").json()["status"] == "running"
    # bob's skip abandons his first batch only: his job goes on with the second
    assert call(url, "POST", "/sdapi/v1/skip", "bob").status_code == 200
    deadline = time.monotonic() + 60
    while (state := call(url, "GET", "/sdapi/v1/progress", "bob").json())["state"]["job_no"] < 1:
        assert state["current_task"] == theirs["id"] and time.monotonic() < deadline
    assert call(url, "GET", f"/easel/v1/jobs/{theirs['id']}", "bob").json()["status"] == "running"
    # the admin cancels bob's running job: it stops on its replica too
    assert call(url, "DELETE", f"/easel/v1/jobs/{theirs['id']}", "root").status_code == 200
    stopped = wait_for(url, theirs["id"], "bob", lambda s: s["status"] == "done")
    assert stopped["step"] < 400
    assert all(row["running"] is None for row in workers(url))


# -- faults -------------------------------------------------------------------------------------------------
def test_a_replica_killed_mid_job_retries_or_fails_clearly_and_the_server_goes_on(cluster, single):
    url, _ = cluster
    # killed in its first batch: nothing was saved, so it runs again on the other replica
    body = {"prompt": "a purple moon", **SMALL, "steps": 40, "seed": 11, "save_images": False}
    first = submit(url, body)
    victim = running_on(url, first["id"], "alice")
    bystander = submit(url, {"prompt": "a cyan cube", **SMALL, "seed": 12}, user="bob")
    os.kill(victim["replica"]["pid"], signal.SIGKILL)
    retried = wait_for(url, first["id"], "alice", lambda s: s["status"] in ("done", "failed"))
    assert retried["status"] == "done" and retried["worker"] != victim["worker"]
    assert any("stopped during this job" in warning for warning in retried["warnings"])
    result = call(url, "GET", f"/easel/v1/jobs/{first['id']}/result").json()
    assert np.array_equal(pixels(result["images"][0]), pixels(txt2img(single, body)["images"][0]))
    assert wait_for(url, bystander["id"], "bob", lambda s: s["status"] in ("done", "failed"))["status"] == "done"
    # killed after its first batch was saved: it fails with a clear error rather than saving it twice
    second = submit(url, {"prompt": "a grey cloud", **SMALL, "steps": 20, "n_iter": 3, "seed": 13})
    wait_for(url, second["id"], "alice", lambda s: (s["step"] or 0) >= 1 and s["progress"] > 0.34
             or s["status"] in ("done", "failed"))
    os.kill(running_on(url, second["id"], "alice")["replica"]["pid"], signal.SIGKILL)
    failed = wait_for(url, second["id"], "alice", lambda s: s["status"] in ("done", "failed"))
    assert failed["status"] == "failed" and "died" in failed["error"] and "saved" in failed["error"]
    answer = call(url, "GET", f"/easel/v1/jobs/{second['id']}/result")
    assert answer.status_code == 503 and "send the request again" in answer.json()["detail"]
    # the server goes on: the next requests succeed, and Serve brings back two replicas
    after = txt2img(url, {"prompt": "a white dot", **SMALL, "seed": 14})
    assert np.array_equal(pixels(after["images"][0]),
                          pixels(txt2img(single, {"prompt": "a white dot", **SMALL, "seed": 14})["images"][0]))
    deadline = time.monotonic() + 120
    while len(workers(url)) < 2 and time.monotonic() < deadline:
        txt2img(url, {"prompt": "a dot", **SMALL, "steps": 1})
    assert len(workers(url)) == 2


def test_a_checkpoint_no_replica_can_load_fails_alone(cluster, data):
    url, _ = cluster
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(call, url, "POST", "/sdapi/v1/txt2img",
                          json={"prompt": "x", **SMALL, "override_settings": {"sd_model_checkpoint": "broken"}})
        good = pool.submit(txt2img, url, {"prompt": "a red circle", **SMALL, "seed": 3})
        bad, good = bad.result(), good.result()
    assert bad.status_code == 422 and "broken.safetensors" in bad.json()["detail"]
    assert len(good["images"]) == 1
    # a file the front end lists but a replica cannot find: the error says where models must be
    extra = data / "models" / "Stable-diffusion" / "gone.safetensors"
    shutil.copy(DEFAULT_MODEL, extra)
    assert call(url, "POST", "/sdapi/v1/refresh-checkpoints", "root").status_code == 200
    extra.unlink()
    missing = call(url, "POST", "/sdapi/v1/txt2img",
                   json={"prompt": "x", **SMALL, "override_settings": {"sd_model_checkpoint": "gone"}})
    assert missing.status_code == 404 and "same path on every node" in missing.json()["detail"]
    # a file added and rescanned while the replicas run is found by them
    shutil.copy(DEFAULT_MODEL, data / "models" / "Stable-diffusion" / "added.safetensors")
    assert call(url, "POST", "/sdapi/v1/refresh-checkpoints", "root").status_code == 200
    added = txt2img(url, {"prompt": "x", **SMALL, "override_settings": {"sd_model_checkpoint": "added"}})
    assert "Model: added" in json.loads(added["info"])["infotexts"][0]


# -- without --workers --------------------------------------------------------------------------------------
def test_without_workers_nothing_imports_ray(tmp_path):
    script = ("import sys; from backend.runtime import Runtime; from backend.settings import Settings; "
              f"runtime = Runtime.create(Settings(data_dir={str(tmp_path)!r})); "
              "print(runtime.cluster, runtime.device.slots, runtime.workers()[0]['id'], 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "1", "local", "False"]


def test_an_address_where_no_cluster_runs_fails_at_once_naming_the_fix(tmp_path):
    from backend.errors import UnavailableError
    from backend.runtime import Runtime

    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(UnavailableError, match=rf"cannot reach the Ray cluster at {address} .*ray start --head"):
        Runtime.create(Settings(data_dir=tmp_path, workers=2, ray_address=address))


def test_without_ray_installed_the_flags_name_what_to_install(tmp_path, monkeypatch):
    from backend.errors import UnavailableError
    from backend.runtime import Runtime

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.delitem(sys.modules, "backend.cluster.driver", raising=False)
    with pytest.raises(UnavailableError, match=r"not installed: pip install -r requirements-cluster.txt"):
        Runtime.create(Settings(data_dir=tmp_path, workers=2))


def test_the_status_line_names_each_replica_and_what_it_runs():
    from ui.context import workers_html

    text = workers_html([{"id": "ab12", "device": "cuda:0 (NVIDIA H200)", "loaded": ["sd15.safetensors [a1b2]"],
                          "running": "0123456789abcdef"}, {"id": "cd34", "device": "cpu", "loaded": []}], 3)
    assert text.startswith("<div>2 workers")
    assert "ab12</b> (cuda:0 (NVIDIA H200); sd15.safetensors): running job 01234567" in text
    assert "cd34</b> (cpu; nothing loaded): idle" in text and "3 waiting" in text
    assert "none running yet" in workers_html([], 0)


# -- KubeRay ------------------------------------------------------------------------------------------------
def test_the_kuberay_manifest_is_a_valid_rayservice():
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert document["apiVersion"] == "ray.io/v1" and document["kind"] == "RayService"
    spec = document["spec"]
    assert isinstance(spec["serveConfigV2"], str)
    config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    app = config.applications[0]
    deployments = {d.name: d for d in app.deployments}
    worker = deployments["EaselWorker"]
    assert worker.num_replicas >= 2 and worker.max_ongoing_requests == 1
    assert worker.ray_actor_options.num_gpus == 1
    assert app.import_path == "serve_app:app" and app.args["workers"] == worker.num_replicas
    assert "--api" in app.args["flags"] and "--listen" in app.args["flags"]
    import serve_app  # the import path resolves, and its args build the application

    built = serve_app.app({**app.args, "flags": app.args["flags"].replace("/data", "/tmp") + " --insecure"})
    assert type(built).__name__ == "Application"
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    images = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]]
    for group in cluster["workerGroupSpecs"]:
        images.append(group["template"]["spec"]["containers"][0]["image"])
        assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", 2**31 - 1)
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert all(image.startswith("ghcr.io/") and ray.__version__ in image for image in images)
