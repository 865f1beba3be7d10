"""Extensions: loading from <data-dir>/extensions/<name>/extension.py after the built-ins in
extensions-builtin/, the events and their fields, failures that are named and skipped, disabling, panel
arguments (UI and API form), installs, and the built-in CFG scripts (dynamic thresholding, CFG rescale)
measured on the default model."""

from __future__ import annotations

import logging
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from backend.extensions import BUILTIN_EXTENSIONS_DIR, ExtensionRegistry, InstallError, install
from backend.generation import generate
from backend.infotext import parse_infotext
from backend.model_manager import ModelManager
from backend.options import Options
from backend.request import GenerationRequest
from backend.runtime import Runtime
from backend.settings import Settings
from backend.styles import StyleDatabase

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ["cfg-rescale", "dynamic-thresholding", "prompts-from-file", "xyz-plot"]
SMALL = dict(prompt="a red star", negative_prompt="blurry", width=64, height=64, steps=3, seed=7,
             sampler="Euler", save_images=False)

RECORDER = '''
from backend.extensions import Control

EVENTS = []


def register(easel):
    easel.add_panel("Recorder", [Control("strength", "Strength", "slider", 1.0, 0.0, 4.0, 0.5),
                                 Control("note", "Note", "text", "")])
    for event in ("before_generation", "guidance", "step", "after_image"):
        easel.on(event, lambda payload, event=event: record(event, payload))


def record(event, payload):
    fields = {"event": event, "args": dict(payload.args)}
    if event == "before_generation":
        fields["prompt"] = payload.request.prompt
        payload.request = payload.request.with_changes(prompt=payload.request.prompt + ", recorded")
    elif event == "guidance":
        fields.update(step=payload.step, shapes=(tuple(payload.cond.shape), tuple(payload.uncond.shape),
                      tuple(payload.prediction.shape)), cfg=payload.cfg_scale, kind=payload.prediction_type)
    elif event == "step":
        fields.update(step=payload.step, steps=payload.steps, latents=tuple(payload.latents.shape))
    else:
        fields.update(size=payload.image.size, seed=payload.seed, index=payload.index)
        payload.parameters["Recorded"] = payload.args["strength"]
    EVENTS.append(fields)
'''


def write(folder: Path, name: str, source: str) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "extension.py").write_text(textwrap.dedent(source))


@pytest.fixture
def extensions_dir(tmp_path) -> Path:
    folder = tmp_path / "extensions"
    write(folder, "recorder", RECORDER)
    write(folder, "broken-import", "import no_such_module_here\n")
    write(folder, "raises", '''
        def register(easel):
            easel.on("after_image", explode)

        def explode(event):
            raise RuntimeError("kaboom")
        ''')
    write(folder, "switched-off", "def register(easel):\n    raise AssertionError('must not load')\n")
    (folder / "switched-off.disabled").write_text("")
    return folder


def only(folder: Path, disabled=frozenset()) -> ExtensionRegistry:
    """The extensions in `folder` alone, without the built-ins."""
    return ExtensionRegistry(folder, disabled, builtin_folder=None)


def test_extensions_load_in_name_order_and_failures_are_named(extensions_dir):
    registry = only(extensions_dir)
    assert [e.name for e in registry.extensions] == ["broken-import", "raises", "recorder", "switched-off"]
    broken = registry.extensions[0]
    assert "ModuleNotFoundError" in broken.error and "no_such_module_here" in broken.error
    assert [e.name for e in registry.active] == ["raises", "recorder"]
    assert registry.extensions[3].enabled is False and registry.extensions[3].error is None
    assert [e.name for e in only(extensions_dir, {"recorder"}).active] == ["raises"]


# -- built-ins and the user's folder -------------------------------------------------------------------
def names(extensions) -> list[str]:
    return [e.name for e in extensions]


def test_a_registry_for_an_empty_data_folder_loads_the_four_builtins(tmp_path):
    registry = ExtensionRegistry(tmp_path / "extensions")  # as the app builds it for --data-dir tmp_path
    assert names(registry.active) == BUILTINS
    assert all(e.builtin and e.path == BUILTIN_EXTENSIONS_DIR / e.name for e in registry.extensions)
    assert {s.title for s in registry.scripts()} == {"X/Y/Z plot", "Prompts from file or textbox"}


def test_user_extensions_load_after_the_builtins_and_one_named_like_a_builtin_is_skipped(tmp_path, caplog):
    folder = tmp_path / "extensions"
    write(folder, "xyz-plot", "def register(easel):\n    raise AssertionError('must not load')\n")
    write(folder, "aaa-mine", "def register(easel):\n    pass\n")
    with caplog.at_level(logging.WARNING, logger="backend.extensions"):
        registry = ExtensionRegistry(folder)
    assert names(registry.active) == BUILTINS + ["aaa-mine"]
    assert next(e for e in registry.extensions if e.name == "xyz-plot").path == BUILTIN_EXTENSIONS_DIR / "xyz-plot"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and str(folder / "xyz-plot") in skipped[0]
    assert str(BUILTIN_EXTENSIONS_DIR / "xyz-plot") in skipped[0]


def test_a_builtin_is_disabled_by_name_or_by_a_marker_in_the_user_folder(tmp_path):
    folder = tmp_path / "extensions"
    assert names(ExtensionRegistry(folder, {"cfg-rescale"}).active) == BUILTINS[1:]
    folder.mkdir()
    (folder / "xyz-plot.disabled").write_text("")
    registry = ExtensionRegistry(folder)
    assert names(registry.active) == BUILTINS[:3] and registry.script("X/Y/Z plot") is None


def test_events_arrive_in_order_with_their_fields_and_changes_apply(sd1_manager, extensions_dir):
    registry = only(extensions_dir)
    events = __import__("easel_extensions.recorder", fromlist=["EVENTS"]).EVENTS
    events.clear()
    result = generate(sd1_manager, GenerationRequest(**SMALL, batch_size=2,
                                                     script_args={"Recorder": {"args": [2.5, "hi"]}}),
                      extensions=registry)
    assert [e["event"] for e in events] == (["before_generation"] + ["guidance", "step"] * 3 + ["after_image"] * 2)
    assert events[0]["prompt"] == "a red star" and events[0]["args"] == {"strength": 2.5, "note": "hi"}
    guidance, step = events[1], events[2]
    assert guidance["shapes"] == ((2, 4, 32, 32),) * 3 and guidance["cfg"] == 7.0 and guidance["step"] == 0
    assert guidance["kind"] == "epsilon"
    assert step == {"event": "step", "args": {"strength": 2.5, "note": "hi"}, "step": 1, "steps": 3,
                    "latents": (2, 4, 32, 32)}
    assert [(e["size"], e["seed"], e["index"]) for e in events[-2:]] == [((64, 64), 7, 0), ((64, 64), 8, 1)]
    params = parse_infotext(result.images[0].infotext)
    assert params["Prompt"] == "a red star, recorded" and params["Recorded"] == "2.5"
    # the extension that raises is named, and the images are still made
    assert len(result.images) == 2
    assert any("extension raises failed in after_image (RuntimeError: kaboom); skipped" in w for w in result.warnings)


def test_panel_defaults_apply_without_arguments(sd1_manager, extensions_dir):
    registry = only(extensions_dir)
    result = generate(sd1_manager, GenerationRequest(**SMALL), extensions=registry)
    assert parse_infotext(result.images[0].infotext)["Recorded"] == "1"


def test_a_step_callback_can_stop_sampling_and_change_latents(sd1_manager, tmp_path):
    write(tmp_path / "ext", "stopper", '''
        CALLS = []

        def register(easel):
            easel.on("step", stop_at_two)

        def stop_at_two(event):
            CALLS.append(event.step)
            event.latents = event.latents * 0
            event.stop = event.step == 2
        ''')
    registry = only(tmp_path / "ext")
    result = generate(sd1_manager, GenerationRequest(**{**SMALL, "steps": 5}), extensions=registry)
    calls = __import__("easel_extensions.stopper", fromlist=["CALLS"]).CALLS
    assert calls == [1, 2]
    pixels = np.asarray(result.images[0].image, dtype=np.int16)
    zero = generate(ModelManager(sd1_manager.settings), GenerationRequest(**{**SMALL, "steps": 5}))
    assert np.abs(pixels - np.asarray(zero.images[0].image, dtype=np.int16)).max() > 0


# -- the built-in scripts on the default model ---------------------------------------------------------
@pytest.fixture(scope="module")
def default_manager(tmp_path_factory, tokenizer_cache) -> Runtime:
    import shutil

    data = tmp_path_factory.mktemp("ext-data")
    shutil.copytree(tokenizer_cache, data / "cache", dirs_exist_ok=True)
    settings = Settings(data_dir=data, ckpt_dir=ROOT / "models" / "Stable-diffusion", default_checkpoint="easel-shapes")
    # This folder's extensions/ (the example, off) after the built-ins, as `python app.py` loads them
    return Runtime(settings, Options(), data / "config.json", ModelManager(settings),
                   ExtensionRegistry(ROOT / "extensions"), StyleDatabase(data / "styles.csv"))


def saturated(result) -> float:
    values = np.concatenate([np.asarray(i.image).reshape(-1) for i in result.images])
    return float(((values <= 3) | (values >= 252)).mean())


HIGH_CFG = dict(prompt="a large red star on a blue background, center", width=64, height=64, steps=20,
                cfg_scale=20.0, seed=11, batch_size=4, save_images=False)


def test_shipped_extensions_load_and_the_example_is_off(default_manager):
    registry = default_manager.extensions
    assert {"cfg-rescale", "dynamic-thresholding"} <= {e.name for e in registry.active}
    example = next(e for e in registry.extensions if e.name == "example")
    assert example.enabled is False


def test_dynamic_thresholding_reduces_saturation_at_cfg_20_and_is_a_no_op_when_off(default_manager):
    plain = default_manager.generate(GenerationRequest(**HIGH_CFG))
    off = default_manager.generate(GenerationRequest(**HIGH_CFG, script_args={
        "dynamic-thresholding": {"enabled": False, "mimic_scale": 7}}))
    on = default_manager.generate(GenerationRequest(**HIGH_CFG, script_args={
        "Dynamic thresholding (CFG scale fix)": {"args": [True, 7.0, 0.995]}}))
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(plain.images, off.images))
    print(f"saturated pixels at CFG 20: {saturated(plain):.3f} plain, {saturated(on):.3f} with dynamic thresholding")
    assert saturated(on) < 0.7 * saturated(plain), (saturated(on), saturated(plain))
    params = parse_infotext(on.images[0].infotext)
    assert params["Dynamic thresholding mimic scale"] == "7" and params["Dynamic thresholding percentile"] == "0.995"
    assert "Dynamic thresholding mimic scale" not in parse_infotext(plain.images[0].infotext)


def test_cfg_rescale_is_recorded_and_changes_the_image(default_manager):
    plain = default_manager.generate(GenerationRequest(**{**HIGH_CFG, "batch_size": 1}))
    zero = default_manager.generate(GenerationRequest(**{**HIGH_CFG, "batch_size": 1},
                                                       script_args={"CFG rescale": {"phi": 0.0}}))
    rescaled = default_manager.generate(GenerationRequest(**{**HIGH_CFG, "batch_size": 1},
                                                           script_args={"cfg-rescale": {"args": [0.7]}}))
    assert np.array_equal(np.asarray(plain.images[0].image), np.asarray(zero.images[0].image))
    assert np.abs(np.asarray(plain.images[0].image, dtype=np.int16)
                  - np.asarray(rescaled.images[0].image, dtype=np.int16)).max() > 10
    assert parse_infotext(rescaled.images[0].infotext)["CFG Rescale phi"] == "0.7"


# -- installs ------------------------------------------------------------------------------------------
def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture
def bare_repo(tmp_path) -> Path:
    """A bare repository holding one commit of an extension, as a git server has it."""
    write(tmp_path / "work", "my-extension", "def register(easel):\n    pass\n")
    source, bare = tmp_path / "work" / "my-extension", tmp_path / "server" / "my-extension.git"
    git(source, "init", "-q")
    git(source, "add", ".")
    git(source, "commit", "-qm", "first")
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    git(source, "push", "-q", str(bare), "HEAD:refs/heads/main")
    return bare


def test_install_clones_into_the_user_folder_and_refuses_an_existing_one(tmp_path, bare_repo):
    folder = tmp_path / "data" / "extensions"
    path = install(bare_repo.as_uri(), folder, public=False)
    assert path == folder / "my-extension" and (path / "extension.py").is_file()
    assert [p.name for p in folder.iterdir()] == ["my-extension"]  # the staging folder is gone
    assert names(ExtensionRegistry(folder).active) == BUILTINS + ["my-extension"]
    with pytest.raises(InstallError, match="my-extension already exists"):
        install(bare_repo.as_uri(), folder, public=False)
    with pytest.raises(InstallError, match="'xyz-plot' is the name of a built-in extension"):
        install("https://example.com/someone/xyz-plot.git", folder, public=False)


@pytest.mark.parametrize("public, allow_insecure, allowed", [
    (False, False, True),  # a local server
    (True, False, False),  # --listen or --share
    (True, True, True),  # ... with --enable-insecure-extension-access
])
def test_a_public_server_installs_only_with_enable_insecure_extension_access(tmp_path, bare_repo, public,
                                                                             allow_insecure, allowed):
    folder = tmp_path / "extensions"
    if allowed:
        assert install(bare_repo.as_uri(), folder, public, allow_insecure) == folder / "my-extension"
        return
    with pytest.raises(InstallError, match="start Easel with --enable-insecure-extension-access to allow it"):
        install(bare_repo.as_uri(), folder, public, allow_insecure)
    assert not folder.exists()


def test_a_failed_clone_leaves_no_folder(tmp_path):
    folder = tmp_path / "extensions"
    with pytest.raises(InstallError, match="git clone .* failed"):
        install((tmp_path / "nothing-here.git").as_uri(), folder, public=False)
    assert list(folder.iterdir()) == []


def test_a_timed_out_clone_is_killed_and_leaves_no_folder(tmp_path, monkeypatch):
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    folder = tmp_path / "extensions"
    with socket.create_server(("127.0.0.1", 0)) as server:  # connections are queued, never answered
        started = time.monotonic()
        with pytest.raises(InstallError, match="timed out after 1 s; nothing was installed"):
            install(f"http://127.0.0.1:{server.getsockname()[1]}/hangs.git", folder, public=False, timeout=1)
    assert time.monotonic() - started < 20
    assert list(folder.iterdir()) == []


def test_extension_routes_are_served_under_their_prefix_behind_the_api_auth(sd1_manager, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api import ApiContext, mount
    from api.access import ApiAccess
    from backend.options import Options
    from backend.runtime import Runtime
    from backend.styles import StyleDatabase

    write(tmp_path / "ext", "greeter", '''
        from fastapi import APIRouter

        def register(easel):
            router = APIRouter()

            @router.get("/hello")
            def hello(name: str = "world"):
                return {"hello": name, "from": easel.name}

            easel.add_routes(router)
        ''')
    runtime = Runtime(sd1_manager.settings, Options(), tmp_path / "config.json", sd1_manager, only(tmp_path / "ext"),
                      StyleDatabase(tmp_path / "styles.csv"))
    app = FastAPI()
    mount(app, ApiContext(runtime, ApiAccess.from_pairs([("ann", "pw")])))
    client = TestClient(app)
    assert client.get("/easel/v1/ext/greeter/hello", params={"name": "ann"}, auth=("ann", "pw")).json() == \
        {"hello": "ann", "from": "greeter"}
    assert client.get("/easel/v1/ext/greeter/hello").status_code == 401
    runtime.shutdown()
