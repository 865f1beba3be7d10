"""The ControlNet panel without a browser (ui.controlnet_panel): pixel perfect and the resolution slider, the
union control type, and sd-webui-controlnet's options `control_net_unit_count` and
`control_net_model_cache_size` (the Settings tab's "ControlNet" section)."""

from __future__ import annotations

import gc
import json
import weakref
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from backend.control_units import ControlUnit, infotext_parameters
from backend.errors import InputError
from backend.options import Options, load_options, save_options
from backend.runtime import Runtime
from backend.settings import Settings
from ui import controlnet_panel
from ui.context import paste_infotext, pasted_names
from ui.webui import EaselUI, UIContext

key = controlnet_panel.key


def build_ui(data_dir, **options) -> EaselUI:
    """The whole UI on an empty data folder whose config.json holds `options`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "config.json").write_text(json.dumps(options))
    ui = EaselUI(UIContext(Runtime.create(Settings(data_dir=data_dir))))
    ui.build()
    return ui


@pytest.fixture(scope="module")
def five_units(tmp_path_factory):
    return build_ui(tmp_path_factory.mktemp("cn-ui") / "data", control_net_unit_count=5)


def request_from(ui, mode: str, **units):
    """The request a page sends with its starting values and unit controls set by `unit<N>_<field>`."""
    from ui.page_events import build_request

    page = ui.pages[mode]
    values = {component: getattr(component, "value", None) for component in page.values()}
    for name, value in units.items():
        index, field = name.removeprefix("unit").split("_", 1)
        values[page[key(int(index), field)]] = value
    return build_request(ui, mode, values, {"checkpoint": None, "vae": None, "clip_skip": 1})


def paste(ui, text: str, mode: str = "txt2img") -> dict:
    page = ui.pages[mode]
    return paste_infotext(page, {name: page[name].value for name in pasted_names(page)}, text)


# -- pixel perfect and the resolution slider ----------------------------------------------------------
@pytest.mark.parametrize("module, pixel_perfect, resolution, thresholds", [
    ("canny", False, True, [True, True]),
    ("canny", True, False, [True, True]),  # pixel perfect computes the resolution
    ("shuffle", False, False, [False, False]),  # no resolution slider at all
    ("shuffle", True, False, [False, False]),
    ("blur_gaussian", True, False, [True, False]),
    ("tile_colorfix+sharp", False, False, [True, True]),
    ("none", False, True, [False, False]),
])
def test_resolution_slider_follows_the_module_and_pixel_perfect(module, pixel_perfect, resolution, thresholds):
    on_module = controlnet_panel.module_changed(module, pixel_perfect)
    assert [update["visible"] for update in on_module] == [resolution, *thresholds]
    assert controlnet_panel.pixel_perfect_changed(module, pixel_perfect) == {"__type__": "update",
                                                                             "visible": resolution}
    if module == "canny":  # hidden by pixel perfect, the slider keeps the module's range and value
        assert {k: on_module[0][k] for k in ("label", "minimum", "maximum", "value")} == {
            "label": "Resolution", "minimum": 64, "maximum": 2048, "value": 512}


@pytest.mark.parametrize("events, visible", [
    ([("module", "canny"), ("pixel_perfect", True)], False),
    ([("pixel_perfect", True), ("module", "canny")], False),  # a module picked later keeps it hidden
    ([("pixel_perfect", True), ("module", "canny"), ("pixel_perfect", False)], True),
    ([("module", "shuffle"), ("pixel_perfect", True), ("pixel_perfect", False)], False),
    ([("pixel_perfect", True), ("module", "shuffle"), ("module", "lineart_standard")], False),
    ([("pixel_perfect", True), ("module", "shuffle"), ("pixel_perfect", False), ("module", "threshold")], True),
])
def test_the_resolution_slider_is_right_whichever_control_changes_last(events, visible):
    """Each event as the page wires it: its function reads both controls and updates the slider."""
    state = {"module": "none", "pixel_perfect": False}
    slider = {"visible": True, "value": 512}
    for control, value in events:
        state[control] = value
        if control == "module":
            update = controlnet_panel.module_changed(state["module"], state["pixel_perfect"])[0]
        else:
            update = controlnet_panel.pixel_perfect_changed(state["module"], state["pixel_perfect"])
        slider.update({k: v for k, v in update.items() if k != "__type__"})
    assert slider["visible"] is visible


def test_a_pasted_pixel_perfect_unit_hides_its_resolution_slider(five_units):
    entry = infotext_parameters((ControlUnit("tiny", "canny", pixel_perfect=True, processor_res=256),))["ControlNet 0"]
    values = paste(five_units, f'a star\nSteps: 3, Seed: 1, Size: 64x64, ControlNet 0: "{entry}"')
    assert values[key(0, "pixel_perfect")] is True
    resolution = values[key(0, "processor_res")]
    assert (resolution["visible"], resolution["value"], resolution["label"]) == (False, 256, "Resolution")
    assert values[key(0, "threshold_a")]["visible"] is True


@pytest.mark.parametrize("processor_res, pixel_perfect, resize_mode, expected", [
    (256, False, "Crop and Resize", 256),
    # 16x12 to 96x64 (96x70 aligned down to multiples of 8): scales 96/16 = 6 and 64/12 = 5.33, times 12
    (256, True, "Crop and Resize", 72),  # the larger scale: 6 x 12
    (256, True, "Resize and Fill", 64),  # the smaller: 5.33 x 12
    (-1, True, "Crop and Resize", -1),  # a module without a resolution slider
])
def test_the_preview_runs_at_pixel_perfects_resolution(processor_res, pixel_perfect, resize_mode, expected):
    assert controlnet_panel.preview_resolution(processor_res, pixel_perfect, (16, 12), (96, 70), resize_mode) == expected


def test_a_pixel_perfect_unit_sends_its_hidden_resolution_as_is(five_units):
    image = Image.new("RGB", (16, 16), "white")
    unit = request_from(five_units, "txt2img", unit0_enabled=True, unit0_image=image, unit0_model="tiny",
                        unit0_module="canny", unit0_pixel_perfect=True, unit0_processor_res=256).control_units[0]
    assert (unit.pixel_perfect, unit.processor_res) == (True, 256)  # generation computes its own (pixel perfect)


# -- the union control type ---------------------------------------------------------------------------
def test_the_union_control_type_reaches_the_unit_and_is_pasted_back(five_units):
    image = Image.new("RGB", (16, 16), "white")
    page = five_units.pages["txt2img"]
    assert page[key(0, "union_control_type")].value == "Unknown"
    assert page[key(0, "union_control_type")].label == "Union control type"
    units = request_from(five_units, "txt2img", unit0_enabled=True, unit0_image=image, unit0_model="union",
                         unit2_enabled=True, unit2_image=image, unit2_model="union", unit2_module="canny",
                         unit2_union_control_type="Depth").control_units
    assert [(unit.position, unit.union_control_type) for unit in units] == [(0, "Unknown"), (2, "Depth")]
    entries = infotext_parameters(units)
    assert "Union Control Type" not in entries["ControlNet 0"]
    text = "a star\nSteps: 3, Seed: 1, Size: 64x64, " + ", ".join(f'{k}: "{v}"' for k, v in entries.items())
    values = paste(five_units, text)
    assert [values[key(index, "union_control_type")] for index in range(2)] == ["Unknown", "Depth"]
    assert values[key(1, "module")] == "canny" and values[key(2, "enabled")] is False


@pytest.mark.parametrize("written, pasted", [("Hard Edge", "Hard Edge"), ("depth", "Depth"), ("canny", "Hard Edge"),
                                             ("Unknown", "Unknown"), ("Sketchy", "Unknown")])
def test_a_pasted_union_control_type_is_one_of_the_dropdowns_choices(five_units, written, pasted):
    text = f'x\nSteps: 3, Seed: 1, Size: 64x64, ControlNet 0: "Module: none, Model: u, Union Control Type: {written}"'
    values = paste(five_units, text)
    assert values[key(0, "union_control_type")] == pasted


# -- options ----------------------------------------------------------------------------------------------
def test_the_unit_count_option_sets_the_units_each_page_builds(five_units, tmp_path):
    for mode in ("txt2img", "img2img"):
        page = five_units.pages[mode]
        assert controlnet_panel.unit_count(page) == 5
        assert key(4, "union_control_type") in page and key(5, "enabled") not in page
        assert page[key(4, "model")] in controlnet_panel.request_inputs(page)
    image = Image.new("RGB", (16, 16), "white")
    units = request_from(five_units, "txt2img", unit4_enabled=True, unit4_image=image, unit4_model="tiny").control_units
    assert [(unit.model, unit.position) for unit in units] == [("tiny", 4)]
    assert controlnet_panel.unit_count(build_ui(tmp_path / "one", control_net_unit_count=1).pages["img2img"]) == 1
    # Changed in Settings: saved, and the built page keeps its units until a restart.
    five_units.ctx.runtime.apply({"control_net_unit_count": 2}, save=False)
    assert controlnet_panel.unit_count(five_units.pages["txt2img"]) == 5
    assert len(controlnet_panel.pasted_names(five_units.pages["txt2img"])) == 5 * len(controlnet_panel.PASTED)
    five_units.ctx.runtime.apply({"control_net_unit_count": 5}, save=False)


def test_infotext_units_beyond_the_page_are_left_out(five_units):
    entries = ", ".join(f'ControlNet {i}: "Module: none, Model: m{i}"' for i in range(7))
    with pytest.warns(UserWarning, match="has 7 ControlNet units and the page shows 5"):
        values = paste(five_units, f"x\nSteps: 3, Seed: 1, Size: 64x64, {entries}")
    assert [values[key(index, "model")] for index in range(5)] == ["m0", "m1", "m2", "m3", "m4"]
    assert all(values[key(index, "enabled")] for index in range(5))
    assert not any(name.startswith("_controlnet:5:") for name in values)


def test_controlnet_options_round_trip_and_are_checked(tmp_path):
    path = tmp_path / "config.json"
    save_options(Options(control_net_unit_count=6, control_net_model_cache_size=4), path)
    stored = json.loads(path.read_text())
    assert (stored["control_net_unit_count"], stored["control_net_model_cache_size"]) == (6, 4)
    assert load_options(path) == Options(control_net_unit_count=6, control_net_model_cache_size=4)
    path.write_text(json.dumps({"control_net_unit_count": 9, "control_net_model_cache_size": 0}))
    assert (load_options(path).control_net_unit_count, load_options(path).control_net_model_cache_size) == (3, 2)
    runtime = Runtime.create(Settings(data_dir=tmp_path / "data"))
    for bad, message in (({"control_net_unit_count": 0}, "unit number must be between 1 and 8"),
                         ({"control_net_model_cache_size": 9}, "cache size must be between 1 and 8"),
                         ({"control_net_unit_count": 2.5}, "takes a int")):
        with pytest.raises(InputError, match=message):
            runtime.apply(bad)
    assert runtime.apply({"control_net_unit_count": 4}) == ["control_net_unit_count"]
    assert load_options(runtime.options_path).control_net_unit_count == 4


def _fill_cache(runtime: Runtime, names: list[str], monkeypatch) -> dict:
    """Load models named `names` into the runtime's ControlNet cache (a small torch module stands in for each
    network: the cache, not the file format, is under test); returns weak references by name."""
    folder = runtime.settings.model_dir("controlnet")
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}.safetensors").write_bytes(b"")
    cache = runtime.manager.controlnets
    cache.library.refresh()
    monkeypatch.setattr(cache, "_read", lambda path, model: torch.nn.Linear(2, 2))
    checkpoint = SimpleNamespace(file=SimpleNamespace(path=folder / "checkpoint.safetensors"))
    return {name: weakref.ref(cache.load(name, checkpoint)[0]) for name in names}


def test_the_model_cache_size_option_reaches_the_engine_and_frees_the_oldest(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.json").write_text(json.dumps({"control_net_model_cache_size": 3}))
    runtime = Runtime.create(Settings(data_dir=data))
    cache = runtime.manager.controlnets
    assert cache.size == 3  # applied at start-up
    refs = _fill_cache(runtime, ["a", "b", "c"], monkeypatch)
    assert [path.stem for path in cache.loaded()] == ["a", "b", "c"]
    runtime.apply({"control_net_model_cache_size": 1})
    assert cache.size == 1 and [path.stem for path in cache.loaded()] == ["c"]
    gc.collect()
    assert refs["a"]() is None and refs["b"]() is None and refs["c"]() is not None  # freed, not just forgotten
    runtime.apply({"control_net_model_cache_size": 2})
    _fill_cache(runtime, ["d", "e"], monkeypatch)
    assert [path.stem for path in cache.loaded()] == ["d", "e"]
    assert json.loads(runtime.options_path.read_text())["control_net_model_cache_size"] == 2


def test_the_settings_tab_shows_the_controlnet_options(five_units):
    import gradio as gr

    from ui.settings_tab import controlnet_controls, typed_values

    with gr.Blocks():
        controls = controlnet_controls(five_units.ctx.options)
    unit_number = controls["control_net_unit_count"]
    assert (unit_number.value, unit_number.minimum, unit_number.maximum) == (5, 1, 8)
    assert "(requires restart)" in unit_number.label
    assert controls["control_net_model_cache_size"].value == 2
    typed = typed_values({"control_net_unit_count": 4.0, "control_net_model_cache_size": 3.0, "eta_ddim": 0})
    assert typed == {"control_net_unit_count": 4, "control_net_model_cache_size": 3, "eta_ddim": 0.0}
    assert isinstance(typed["control_net_unit_count"], int) and isinstance(typed["eta_ddim"], float)
