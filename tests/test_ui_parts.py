"""The web UI's parts that need no browser: options file, styles, auth and the public-server rule,
per-session jobs, the token counter and masks from the image editor."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from PIL import Image

import app
from backend.job_queue import DeviceQueue, JobCancelled
from backend.options import Options, load_options, save_options
from backend.progress import Progress
from backend.styles import Style, StyleDatabase, merge_prompt
from backend.upscalers import TileSettings
from ui import jobs
from ui.context import clamp_to_ranges, fields_from_infotext, mask_from_editor, token_counter
from ui.launch import LaunchError, ServerOptions, check_public, credentials, parse_auth


# -- options ---------------------------------------------------------------------------------------
def test_options_round_trip_and_bad_entries_fall_back_field_by_field(tmp_path):
    path = tmp_path / "config.json"
    save_options(Options(default_steps=12, default_sampler="Euler a", live_preview_every=0), path)
    assert load_options(path) == Options(default_steps=12, default_sampler="Euler a", live_preview_every=0)
    path.write_text(json.dumps({"default_steps": "many", "default_sampler": "Nope", "checkpoint_cache": 3,
                                "default_cfg_scale": 5}))
    loaded = load_options(path)
    assert (loaded.default_steps, loaded.default_sampler) == (20, "DPM++ 2M")  # defaults kept
    assert (loaded.checkpoint_cache, loaded.default_cfg_scale) == (3, 5)
    path.write_text("{half a file")
    assert load_options(path) == Options()


def test_invalid_options_are_refused_and_the_old_file_stays(tmp_path):
    path = tmp_path / "config.json"
    save_options(Options(default_steps=30), path)
    with pytest.raises(ValueError, match="default steps"):
        save_options(Options(default_steps=0), path)
    assert json.loads(path.read_text())["default_steps"] == 30
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind
    for bad, message in ((dict(ESRGAN_tile=-1), "tile size"), (dict(code_former_weight=2.0), "CodeFormer weight"),
                         (dict(face_restoration_model="GPEN"), "CodeFormer or GFPGAN")):
        with pytest.raises(ValueError, match=message):
            save_options(Options(**bad), path)
    assert Options(ESRGAN_tile=96, ESRGAN_tile_overlap=4).upscaler_tile() == TileSettings(96, 4)


# -- styles -------------------------------------------------------------------------------------------
def test_styles_apply_like_a1111_and_save_in_its_csv_format(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text('name,prompt,negative_prompt\n'
                    '"Cinematic","cinematic still of {prompt}, film grain","cartoon, lowres"\n'
                    'Sharp,"sharp focus, detailed",\n', encoding="utf-8")
    styles = StyleDatabase(path)
    assert styles.names == ["Cinematic", "Sharp"]
    assert styles.apply(["Cinematic", "Sharp"], "a red star", "blurry") == (
        "cinematic still of a red star, film grain, sharp focus, detailed", "blurry, cartoon, lowres")
    assert merge_prompt("best quality", "") == "best quality"
    styles.save(Style("Mine", "a {prompt}, oil painting", "photo"))
    reread = StyleDatabase(path)
    assert reread.styles["Mine"] == Style("Mine", "a {prompt}, oil painting", "photo")
    assert reread.styles["Cinematic"].negative_prompt == "cartoon, lowres"
    assert path.read_text().splitlines()[0] == "name,prompt,negative_prompt"


# -- launch rules ---------------------------------------------------------------------------------------
def test_auth_parsing_accepts_several_users_and_colons_in_passwords(tmp_path):
    assert parse_auth("alice:pw1, bob:p:w2") == [("alice", "pw1"), ("bob", "p:w2")]
    (tmp_path / "auth.txt").write_text("carol:xyz\ndave:abc\n")
    options = ServerOptions(auth="alice:pw1", auth_path=tmp_path / "auth.txt")
    assert credentials(options) == [("alice", "pw1"), ("carol", "xyz"), ("dave", "abc")]
    with pytest.raises(LaunchError, match="user:password"):
        parse_auth("alice")


@pytest.mark.parametrize("flags", [{"share": True}, {"listen": True}])
def test_a_public_server_needs_auth_unless_insecure(flags):
    with pytest.raises(LaunchError, match="--gradio-auth"):
        check_public(ServerOptions(**flags), [])
    check_public(ServerOptions(**flags), [("a", "b")])
    check_public(ServerOptions(**flags, insecure=True), [])
    check_public(ServerOptions(), [])  # local only: fine


@pytest.mark.parametrize("flags", [{"listen": True}, {"share": True}])
def test_a_public_api_needs_api_auth_unless_insecure(flags):
    with pytest.raises(LaunchError, match="--api-auth user:password"):
        check_public(ServerOptions(**flags, api=True), [("ui", "pw")], [])
    check_public(ServerOptions(**flags, api=True), [("ui", "pw")], [("api", "pw")])
    check_public(ServerOptions(**flags, api=True, nowebui=True), [], [("api", "pw")])  # no UI: no UI login
    check_public(ServerOptions(**flags, api=True, insecure=True), [], [])
    check_public(ServerOptions(api=True), [], [])  # local only: fine


def test_app_refuses_a_public_api_without_auth(capsys, tmp_path):
    assert app.main(["--data-dir", str(tmp_path), "--listen", "--gradio-auth", "u:p", "--api"]) == 2
    assert "--api-auth user:password" in capsys.readouterr().err
    assert app.main(["--data-dir", str(tmp_path), "--api", "--api-auth", "u:p", "--api-admin", "v"]) == 2
    assert "--api-admin names v, who are not in --api-auth" in capsys.readouterr().err


def test_app_refuses_to_share_without_auth_and_says_how(capsys, tmp_path):
    assert app.main(["--data-dir", str(tmp_path), "--share"]) == 2
    err = capsys.readouterr().err
    assert "--gradio-auth user:password" in err and "--insecure" in err


# -- jobs ----------------------------------------------------------------------------------------------
def test_interrupt_reaches_only_the_sessions_own_job():
    registry = jobs.JobRegistry()
    mine, theirs = registry.prepare("me"), registry.prepare("them")
    assert registry.interrupt("me")
    assert mine.control.interrupted and not theirs.control.interrupted
    assert not registry.interrupt("nobody")


def test_run_streams_progress_then_the_result_or_the_error():
    job = jobs.SessionJob()
    release = threading.Event()

    def work(control):
        control.report(Progress(step=5, steps=10, batch=0, batches=2))
        release.wait(5)
        return "done"

    device = DeviceQueue()
    events = jobs.run(work, job, device, poll=0.01)
    first = next(events)
    while first.progress is None:
        first = next(events)
    assert first.progress.fraction == 0.25 and "Step 5/10 · batch 1/2 · 25%" in first.describe()
    release.set()
    *_, last = list(events)
    assert isinstance(last, jobs.Finished) and last.result == "done" and last.error is None

    def broken(control):
        raise ValueError("bad sampler")

    *_, last = list(jobs.run(broken, jobs.SessionJob(), device, poll=0.01))
    assert isinstance(last.error, ValueError) and last.result is None


def test_device_queue_runs_jobs_in_arrival_order_and_reports_positions():
    device = DeviceQueue()
    gate, running, order = threading.Event(), threading.Event(), []

    def work(name):
        def run(control):
            if name == "first":
                running.set()
                gate.wait(5)
            order.append(name)
            return name
        return run

    first = device.submit(work("first"), owner="a")
    assert running.wait(5) and device.current is first and device.position(first) == 0
    queued = [device.submit(work(f"job{i}"), owner="b") for i in range(3)]
    cancelled = device.submit(work("never"), owner="c")
    waiting = jobs.Running(None, 0.0, device.position(queued[1]))
    assert [device.position(j) for j in queued] == [1, 2, 3] and device.queue_length == 4
    assert waiting.describe() == "Waiting in the queue: 2 jobs ahead"
    device.cancel(cancelled)
    gate.set()
    assert [j.wait(5) for j in queued] == ["job0", "job1", "job2"]
    assert order == ["first", "job0", "job1", "job2"] and first.status == "done"
    assert cancelled.status == "cancelled" and device.queue_length == 0
    with pytest.raises(JobCancelled):
        cancelled.wait(1)


def test_a_queue_with_two_slots_runs_two_jobs_at_once_and_starts_the_rest_in_order():
    """--workers 2: the queue hands out two jobs at a time; positions count the waiting ones ahead."""
    device = DeviceQueue(slots=2)
    gate, started, order = threading.Event(), threading.Semaphore(0), []

    def work(name):
        def run(control):
            order.append(name)
            started.release()
            gate.wait(5)
            return name
        return run

    first, second = device.submit(work("first"), owner="a"), device.submit(work("second"), owner="b")
    assert started.acquire(timeout=5) and started.acquire(timeout=5)
    assert {job.status for job in (first, second)} == {"running"} and set(device.running) == {first, second}
    waiting = [device.submit(work(f"job{i}"), owner="c") for i in range(3)]
    assert [device.position(j) for j in waiting] == [1, 2, 3] and device.queue_length == 3
    gate.set()
    assert [j.wait(5) for j in waiting] == ["job0", "job1", "job2"] and first.wait(5) == "first"
    assert second.wait(5) == "second" and sorted(order[:2]) == ["first", "second"] and sorted(order[2:]) == ["job0", "job1", "job2"]
    assert device.running == [] and first.control.job_id == first.id


# -- small helpers ---------------------------------------------------------------------------------------
def test_token_counter_grows_in_chunks_of_75(tokenizer_cache):
    from backend.clip_tokenizer import load_clip_tokenizer

    tokenizer = load_clip_tokenizer(str(tokenizer_cache))
    assert token_counter(tokenizer, "") == "0/75"
    assert token_counter(tokenizer, "a red star") == "3/75"
    assert token_counter(tokenizer, "red " * 80) == "80/150"
    assert token_counter(tokenizer, "a red star <lora:detail:0.8>") == "3/75"  # tags do not count


def test_extra_network_cards_filter_preview_and_toggle(tmp_path):
    from safetensors.torch import save_file

    from backend.model_index import scan
    from ui import extra_networks as en

    lora_root = tmp_path / "Lora"
    (lora_root / "styles" / "ink").mkdir(parents=True)
    for name in ("styles/ink/Sumi-e", "styles/watercolour", "detail_tweaker"):
        save_file({"x.lora_down.weight": torch.zeros(1, 2)}, lora_root / f"{name}.safetensors",
                  metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": "16",
                            "ss_tag_frequency": '{"set": {"ink": 3, " brush": 5}}'})
    Image.new("RGB", (8, 8), "red").save(lora_root / "detail_tweaker.preview.png")
    cards = en.cards("lora", scan(lora_root, (".safetensors",)))
    assert [(c.name, c.folder) for c in cards] == [("detail_tweaker", ""), ("Sumi-e", "styles/ink"),
                                                  ("watercolour", "styles")]
    assert en.folders(cards) == ["All", "styles", "styles/ink"]
    assert [c.name for c in en.filter_cards(cards, folder="styles")] == ["Sumi-e", "watercolour"]
    assert [c.name for c in en.filter_cards(cards, "ink sumi")] == ["Sumi-e"]
    # The preview is served as a copy in the cache (model folders are never served), made once per version
    served = en.card_image(cards[0], tmp_path / "cache")
    assert served.parent == tmp_path / "cache" / "card-previews"
    assert served.read_bytes() == (lora_root / "detail_tweaker.preview.png").read_bytes()
    assert en.card_image(cards[0], tmp_path / "cache") == served
    placeholder = en.card_image(cards[2], tmp_path / "cache")
    assert placeholder.parent == tmp_path / "cache" / "card-placeholders" and Image.open(placeholder).size == (256, 256)
    # A click adds the tag; a second click (at any strength) takes it out again.
    assert en.toggle_tag("a cat", cards[1].tag) == "a cat <lora:Sumi-e:1>"
    assert en.toggle_tag("a cat <lora:Sumi-e:0.4>, night", cards[1].tag) == "a cat, night"
    assert en.toggle_tag("", "easynegative") == "easynegative"
    assert en.toggle_tag("blurry, EasyNegative", "easynegative") == "blurry"
    details = en.lora_details(cards[1].file, {"ss_base_model_version": "sd_v1", "ss_network_dim": "16",
                                              "ss_tag_frequency": {"set": {"ink": 3, " brush": 5}}})
    assert details["base model"] == "sd_v1" and details["training tags"] == ["brush", "ink"]


def test_mask_from_editor_is_the_union_of_painted_strokes():
    background = Image.new("RGBA", (32, 16), (0, 0, 255, 255))
    layer = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (4, 4, 8, 8))
    second = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    second.paste((255, 255, 255, 128), (20, 0, 24, 2))
    mask = mask_from_editor({"background": background, "layers": [layer, second], "composite": None})
    assert mask.size == (32, 16) and mask.getbbox() == (4, 0, 24, 8)
    assert mask.getpixel((5, 5)) == 255 and mask.getpixel((21, 1)) == 255 and mask.getpixel((12, 12)) == 0
    empty = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    assert mask_from_editor({"background": background, "layers": [empty]}) is None


def test_infotext_fills_every_request_field():
    fields = fields_from_infotext("a cat\nNegative prompt: dog\nSteps: 33, Sampler: Euler a, CFG scale: 5.5, "
                                  "Seed: 42, Size: 64x128, Clip skip: 2, Denoising strength: 0.4")
    assert fields == {"prompt": "a cat", "negative_prompt": "dog", "steps": 33, "sampler": "Euler a",
                      "schedule_type": "Automatic", "cfg_scale": 5.5, "seed": 42, "width": 64, "height": 128,
                      "clip_skip": 2, "denoising_strength": 0.4, "subseed_strength": 0.0, "enable_hr": False,
                      "restore_faces": False, "randn_source": "NV"}  # no RNG key: an NVIDIA GPU's noise


def test_styles_unwind_from_a_styled_prompt(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text('name,prompt,negative_prompt\nFilm,"film still of {prompt}, grain",blurry\nSharp,sharp,\n')
    styles = StyleDatabase(path)
    prompt, negative = styles.apply(["Film", "Sharp"], "a red star", "ugly")
    assert (prompt, negative) == ("film still of a red star, grain, sharp", "ugly, blurry")
    assert styles.extract(["Film", "Sharp"], prompt, negative) == ("a red star", "ugly")
    assert styles.extract(["Film"], "a plain prompt", "") is None


@pytest.mark.parametrize("values, expected, notes", [
    ({"width": 4096, "height": 512}, {"width": 2048, "height": 512}, ["width 4096 is outside 64-2048: set to 2048"]),
    ({"steps": 0, "cfg_scale": 45.5}, {"steps": 1, "cfg_scale": 30.0},
     ["steps 0 is outside 1-150: set to 1", "cfg scale 45.5 is outside 1-30: set to 30.0"]),
    ({"steps": 20, "seed": 2**40, "restore_faces": True}, {"steps": 20, "seed": 2**40, "restore_faces": True}, []),
])
def test_pasted_values_are_clamped_to_the_controls_with_a_note(values, expected, notes):
    ranges = {"width": (64, 2048), "height": (64, 2048), "steps": (1, 150), "cfg_scale": (1, 30),
              "restore_faces": (0, 1)}
    assert clamp_to_ranges(values, ranges) == (expected, notes)


# -- ControlNet units --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built_ui(tmp_path_factory):
    """The whole UI built on an empty data folder (no model is loaded): its pages' controls by name."""
    from backend.runtime import Runtime
    from backend.settings import Settings
    from ui.context import UIContext
    from ui.webui import EaselUI

    ui = EaselUI(UIContext(Runtime.create(Settings(data_dir=tmp_path_factory.mktemp("ui-data")))))
    ui.build()
    return ui


def page_values(ui, mode: str, **controlnet) -> dict:
    """The page's starting values by component, with ControlNet unit controls set by `unit<N>_<field>`."""
    from ui import controlnet_panel

    page = ui.pages[mode]
    values = {component: getattr(component, "value", None) for component in page.values()}
    for name, value in controlnet.items():
        index, field = name.removeprefix("unit").split("_", 1)
        values[page[controlnet_panel.key(int(index), field)]] = value
    return values


def request_from(ui, mode: str, values: dict):
    from ui.page_events import build_request

    return build_request(ui, mode, values, {"checkpoint": None, "vae": None, "clip_skip": 1})


def test_an_enabled_controlnet_unit_reaches_the_request_with_its_values(built_ui):
    from backend.control_units import ControlUnit

    image, mask = Image.new("RGB", (16, 16), "white"), Image.new("L", (16, 16), 255)
    values = page_values(
        built_ui, "txt2img", unit0_enabled=False, unit0_model="off [00000000]", unit0_image=image,
        unit1_enabled=True, unit1_image=image, unit1_mask=mask, unit1_module="canny", unit1_model="tiny [abcd1234]",
        unit1_weight=0.65, unit1_guidance_start=0.1, unit1_guidance_end=0.8,
        unit1_control_mode="ControlNet is more important", unit1_resize_mode="Resize and Fill",
        unit1_pixel_perfect=True, unit1_processor_res=256, unit1_threshold_a=40, unit1_threshold_b=180,
        unit1_hr_option="Low res only",
        unit2_enabled=True, unit2_image=image, unit2_model="None")  # no model: skipped like a disabled unit
    request = request_from(built_ui, "txt2img", values)
    assert request.control_units == (ControlUnit(
        model="tiny [abcd1234]", module="canny", weight=0.65, guidance_start=0.1, guidance_end=0.8,
        control_mode="ControlNet is more important", resize_mode="Resize and Fill", processor_res=256,
        threshold_a=40.0, threshold_b=180.0, pixel_perfect=True, hr_option="Low res only"),)
    assert request.control_units[0].image is image and request.control_units[0].mask is mask
    request.validate()
    # A module without thresholds sends -1 (its defaults) for them, whatever the hidden sliders hold.
    values = page_values(built_ui, "txt2img", unit0_enabled=True, unit0_image=image, unit0_model="tiny",
                         unit0_module="shuffle", unit0_threshold_a=40, unit0_processor_res=256)
    unit = request_from(built_ui, "txt2img", values).control_units[0]
    assert (unit.module, unit.processor_res, unit.threshold_a, unit.threshold_b) == ("shuffle", -1, -1.0, -1.0)
    assert request_from(built_ui, "txt2img", page_values(built_ui, "txt2img")).control_units == ()


def test_a_controlnet_unit_without_an_image_is_refused_in_txt2img_only(built_ui):
    import gradio as gr

    with pytest.raises(gr.Error, match="ControlNet unit 0 has no image"):
        request_from(built_ui, "txt2img", page_values(built_ui, "txt2img", unit0_enabled=True, unit0_model="tiny"))
    values = page_values(built_ui, "img2img", unit0_enabled=True, unit0_model="tiny")
    values[built_ui.pages["img2img"]["_image"]] = Image.new("RGB", (16, 16))
    unit = request_from(built_ui, "img2img", values).control_units[0]
    assert unit.image is None and unit.hr_option == "Both"  # the init image; img2img has no hires pass


def test_pasting_an_infotext_sets_the_controlnet_units(built_ui):
    from backend.control_units import ControlUnit, infotext_parameters
    from ui import controlnet_panel
    from ui.context import paste_infotext, pasted_names

    entry = infotext_parameters((ControlUnit("tiny", "canny", weight=0.5, guidance_end=0.75, threshold_a=50,
                                             control_mode="My prompt is more important", hr_option="High res only"),),
                                {"tiny": "tiny [abcd1234]"})["ControlNet 0"]
    text = f'a star\nSteps: 3, Seed: 1, Size: 64x64, ControlNet 0: "{entry}"'
    page = built_ui.pages["txt2img"]
    names = pasted_names(page)
    current = {name: page[name].value for name in names}
    current[controlnet_panel.key(1, "enabled")] = True  # a unit the infotext does not name is turned off
    values = paste_infotext(page, current, text)
    unit = {name: values[controlnet_panel.key(0, name)] for name in controlnet_panel.PASTED}
    sliders = {name: unit.pop(name) for name in controlnet_panel.SLIDERS}
    assert unit == {"enabled": True, "module": "canny", "model": "tiny [abcd1234]", "weight": 0.5,
                    "guidance_start": 0.0, "guidance_end": 0.75, "control_mode": "My prompt is more important",
                    "resize_mode": "Crop and Resize", "pixel_perfect": False, "hr_option": "High res only",
                    "union_control_type": "Unknown"}
    assert [(s["label"], s["value"], s["minimum"], s["maximum"], s["visible"]) for s in sliders.values()] == [
        ("Resolution", 512, 64, 2048, True), ("Low Threshold", 50, 1, 255, True), ("High Threshold", 200, 1, 255, True)]
    assert values[controlnet_panel.key(1, "enabled")] is False and values["steps"] == 3
    assert controlnet_panel.key(0, "image") not in values
