"""The built-in scripts written on the extension API, on the shipped default model: X/Y/Z plot (grid size,
labels, cells and their infotexts, checkpoints loaded once, interrupt, size limits checked before any
work) and prompts from file."""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backend.infotext import parse_infotext
from backend.progress import JobControl
from backend.request import GenerationRequest, RequestError
from backend.runtime import Runtime
from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(prompt="a large red star on a blue background, center", width=64, height=64, steps=6, seed=21,
            save_images=False)
XYZ = "X/Y/Z plot"


@pytest.fixture(scope="module")
def manager(tmp_path_factory, tokenizer_cache) -> Runtime:
    data = tmp_path_factory.mktemp("scripts-data")
    ckpt = data / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    model = ROOT / "models" / "Stable-diffusion" / "easel-shapes.safetensors"
    shutil.copy(model, ckpt / model.name)
    shutil.copy(model, ckpt / "second-copy.safetensors")
    shutil.copytree(tokenizer_cache, data / "cache", dirs_exist_ok=True)
    # A runtime for a data folder with no extensions of its own: the built-ins alone
    return Runtime.create(Settings(data_dir=data, default_checkpoint="easel-shapes"))


def xyz(manager, control=None, **args):
    request = GenerationRequest(**BASE, script_name=XYZ, script_args={XYZ: args})
    return manager.generate(request, control)


def differing_keys(a: str, b: str) -> set[str]:
    pa, pb = parse_infotext(a), parse_infotext(b)
    return {k for k in pa.keys() | pb.keys() if pa.get(k) != pb.get(k)}


def test_xyz_plot_makes_a_labelled_2x3_grid_and_six_cells_that_differ_only_in_the_swept_fields(manager):
    result = xyz(manager, x_type="Steps", x_values="4, 8", y_type="CFG Scale", y_values="3-9 (+3)")
    grid, *cells = result.images
    assert len(cells) == 6
    assert grid.image.width > 2 * 64 and grid.image.height > 3 * 64  # the cells plus the legend
    left, top = grid.image.width - 2 * 64, grid.image.height - 3 * 64
    assert 20 < left < 200 and 10 < top < 60
    legend = np.asarray(grid.image.convert("L"))[:top, left:]
    assert (legend < 128).any() and (legend > 250).mean() > 0.5  # dark label text on white
    # each cell sits in the grid where its values put it
    for cell in cells:
        params = parse_infotext(cell.infotext)
        ix, iy = ["4", "8"].index(params["Steps"]), ["3", "6", "9"].index(params["CFG scale"])
        box = (left + ix * 64, top + iy * 64, left + ix * 64 + 64, top + iy * 64 + 64)
        assert np.array_equal(np.asarray(grid.image.crop(box)), np.asarray(cell.image.convert("RGB")))
    for other in cells[1:]:
        assert differing_keys(cells[0].infotext, other.infotext) <= {"Steps", "CFG scale"}
    assert result.notes == ["X/Y/Z plot: 6 of 6 cells"]


def test_a_checkpoint_axis_loads_each_checkpoint_once(manager):
    manager.manager.select("easel-shapes")
    before = manager.manager.load_count
    request = GenerationRequest(**BASE, checkpoint="easel-shapes.safetensors", script_name=XYZ, script_args={XYZ: {
        "x_type": "Seed", "x_values": "1, 2, 3", "y_type": "Checkpoint name", "y_values": "second-copy, easel-shapes"}})
    result = manager.generate(request)
    models = [parse_infotext(c.infotext)["Model"] for c in result.images[1:]]
    assert models == ["easel-shapes"] * 3 + ["second-copy"] * 3  # grouped by checkpoint
    assert manager.manager.load_count - before == 1  # the current model first, then second-copy, loaded once
    grid = result.images[0].image
    assert grid.size[1] > 2 * 64 and grid.size[0] > 3 * 64  # rows in the order the axis gave them


def test_prompt_search_replace_and_lora_weight_axes(manager):
    result = xyz(manager, x_type="Prompt S/R", x_values="red, green", y_type="Nothing", include_cells=True)
    prompts = [parse_infotext(c.infotext)["Prompt"] for c in result.images[1:]]
    assert prompts == [BASE["prompt"], BASE["prompt"].replace("red", "green")]
    with pytest.raises(RequestError, match="'purple' .* is not in the prompt"):
        xyz(manager, x_type="Prompt S/R", x_values="purple, green")
    lora = GenerationRequest(**{**BASE, "prompt": BASE["prompt"] + " <lora:easel-outlined:1>"}, script_name=XYZ,
                             script_args={XYZ: {"x_type": "LoRA weight", "x_values": "0, 0.8"}})
    cells = manager.generate(lora).images[1:]
    assert [parse_infotext(c.infotext)["Prompt"].split("<lora:")[1] for c in cells] == ["easel-outlined:0>",
                                                                                      "easel-outlined:0.8>"]


def test_bad_axis_values_fail_before_any_generation(manager):
    events = []
    with pytest.raises(RequestError, match="'fast' is not a valid Steps value"):
        xyz(manager, JobControl(on_progress=events.append), x_type="Steps", x_values="4, fast")
    assert events == []


@pytest.mark.parametrize("axis, text, expected", [
    ("Seed", "1-4", [1, 2, 3, 4]),
    ("Steps", "10-30 (+5)", [10, 15, 20, 25, 30]),
    ("Seed", "5-1 (-2)", [5, 3, 1]),
    ("CFG Scale", "0.2-1.0 (+0.2)", [0.2, 0.4, 0.6, 0.8, 1.0]),
    ("Denoising", "0.2-1.0 [5]", [0.2, 0.4, 0.6, 0.8, 1.0]),
    ("Sampler", '"Euler a", DPM++ 2M', ["Euler a", "DPM++ 2M"]),
    ("Seed", "1-1000, 2001-2024", [*range(1, 1001), *range(2001, 2025)]),  # 1024: the limit
])
def test_axis_values_and_ranges(manager, axis, text, expected):
    assert sys.modules["easel_extensions.xyz_plot"].parse_values(axis, text) == pytest.approx(expected)


@pytest.mark.parametrize("axis, text, asked, largest", [
    ("Seed", "1-2 [20000]", 20000, "'1-2 [20000]' makes 20000"),
    ("Seed", "1-1000000000", 1000000000, "'1-1000000000' makes 1000000000"),
    ("CFG Scale", "0-2 (+0.001)", 2001, "'0-2 (+0.001)' makes 2001"),
    ("Seed", "1-1000, 2001-2025", 1025, "'1-1000' makes 1000"),
])
def test_axis_values_are_counted_before_they_are_built_and_refused_over_the_limit(manager, axis, text, asked,
                                                                                   largest):
    xyz_plot = sys.modules["easel_extensions.xyz_plot"]
    assert xyz_plot.MAX_CELLS == 1024
    started = time.monotonic()
    message = f"asks for {asked} values ({largest}); a plot may have at most 1024 cells"
    with pytest.raises(RequestError, match=re.escape(message)):
        xyz_plot.parse_values(axis, text)
    assert time.monotonic() - started < 5


def plot_request(size: dict | None = None, **args) -> GenerationRequest:
    return GenerationRequest(**{**BASE, **(size or {})}, script_name=XYZ, script_args={XYZ: args})


@pytest.mark.parametrize("size, args, message", [
    ({}, dict(x_values="1-40", y_type="Steps", y_values="1-40"),
     "40 x 40 x 1 = 1600 cells asked; a plot may have at most 1024 cells"),
    ({"width": 1024, "height": 1024}, dict(x_values="1-20", y_type="Steps", y_values="1-20"),
     r"20480x20480 pixels \(1024x1024 a cell\); the limit is 16384 pixels a side and 64 megapixels"),
    ({"width": 1024, "height": 1024}, dict(x_values="1-10", y_type="Steps", y_values="1-10"), "10240x10240 pixels"),
    ({"width": 512, "height": 512, "enable_hr": True}, dict(x_values="1-8", y_values="1-8", y_type="Steps"),
     r"8192x8192 pixels \(1024x1024 a cell\)"),  # the hires fix doubles each cell
    ({"width": 256, "height": 256, "upscaler": "Lanczos", "upscale_by": 4},
     dict(x_values="1-8", y_type="Steps", y_values="1-8"), r"8192x8192 pixels"),
    ({"width": None, "height": None}, dict(x_values="1-4", y_type="Steps", y_values="1-4", z_type="CFG Scale",
     z_values="1-4"), r"16432x4096 pixels \(1024x1024 a cell\)"),  # the model's size; four grids side by side
])
def test_a_plot_too_large_is_refused_before_queueing_and_before_any_generation(manager, size, args, message):
    request = plot_request(size, **args)
    with pytest.raises(RequestError, match=message):
        manager.extensions.check_script(request)  # what the API and the UI call before queueing
    events = []
    with pytest.raises(RequestError, match=message):
        manager.generate(request, JobControl(on_progress=events.append))  # the script checks again itself
    assert events == []


def test_plots_within_the_limits_and_other_scripts_pass_the_check(manager):
    manager.extensions.check_script(plot_request({"width": 512, "height": 512}, x_values="1-8", y_type="Steps",
                                                 y_values="1-8"))  # 4096x4096: allowed
    manager.extensions.check_script(plot_request(x_values="1-32", y_type="Steps", y_values="1-32"))  # 1024 cells
    manager.extensions.check_script(GenerationRequest(**BASE))  # no script
    manager.extensions.check_script(GenerationRequest(**BASE, script_name="Prompts from file or textbox"))  # no check
    with pytest.raises(RequestError, match="'purple' .* is not in the prompt"):
        manager.extensions.check_script(plot_request(x_type="Prompt S/R", x_values="purple, green"))


def test_the_plot_limits_are_settings(manager):
    small = plot_request(x_values="1-3", y_type="Steps", y_values="1-2")  # 6 cells of 64x64
    manager.extensions.check_script(small)
    manager.apply({"xyz_max_cells": 4}, save=False)
    try:
        with pytest.raises(RequestError, match=r"= 6 cells asked; a plot may have at most 4 cells"):
            manager.extensions.check_script(small)
        with pytest.raises(RequestError, match="at most 4 cells"):
            manager.generate(small)
        manager.apply({"xyz_max_cells": 1024, "xyz_max_megapixels": 1}, save=False)
        wide = plot_request({"width": 512, "height": 512}, x_values="1-2", y_type="Steps", y_values="1-3")
        with pytest.raises(RequestError, match=r"1024x1536 pixels .* 1 megapixels"):
            manager.extensions.check_script(wide)
    finally:
        manager.apply({"xyz_max_cells": 1024, "xyz_max_megapixels": 64}, save=False)


def test_xyz_plot_is_interruptible_between_cells(manager):
    control = JobControl()
    control.on_progress = lambda p: control.interrupt() if p.step == 6 else None
    result = xyz(manager, control, x_type="Seed", x_values="1-4")
    assert result.interrupted and result.notes == ["X/Y/Z plot: 1 of 4 cells"]


def test_prompts_from_file_runs_each_line_with_its_options(manager):
    lines = "\n".join(["a small blue circle on a white background, top left",
                       '--prompt "a large green square on a black background" --steps 4 --cfg_scale 5 --seed 9',
                       "", "a large yellow cross on a purple background, center"])
    request = GenerationRequest(**BASE, script_name="Prompts from file or textbox",
                                script_args={"prompts-from-file": {"prompts": lines, "iterate_seed": True}})
    result = manager.generate(request)
    params = [parse_infotext(i.infotext) for i in result.images]
    assert [p["Prompt"] for p in params] == ["a small blue circle on a white background, top left",
                                            "a large green square on a black background",
                                            "a large yellow cross on a purple background, center"]
    assert [p["Seed"] for p in params] == ["21", "9", "23"]  # iterated per line; the option wins on line 2
    assert params[1]["Steps"] == "4" and params[1]["CFG scale"] == "5" and params[0]["Steps"] == "6"
    bad = request.with_changes(script_args={"prompts-from-file": {"prompts": "--stepz 4"}})
    with pytest.raises(RequestError, match="line 1: unknown option '--stepz'"):
        manager.generate(bad)


def test_an_unknown_script_names_the_installed_ones(manager):
    with pytest.raises(RequestError, match="script 'Loopback' not found; scripts: .*X/Y/Z plot"):
        manager.generate(GenerationRequest(**BASE, script_name="Loopback"))


def test_xyz_plot_sweeps_a_controlnet_units_weight(manager):
    from PIL import Image, ImageDraw

    from backend.control_units import ControlUnit
    from tests.test_api import write_controlnet

    folder = manager.settings.model_dir("controlnet")
    write_controlnet(folder / "shapes_canny.safetensors", manager.settings.cache_dir)
    manager.manager.controlnets.library.refresh()
    edges = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(edges).rectangle((8, 8, 40, 40), outline="black", width=3)
    unit = ControlUnit("shapes_canny", "canny", edges)
    request = GenerationRequest(**BASE, control_units=(unit,), script_name=XYZ, script_args={XYZ: {
        "x_type": "[ControlNet] Weight", "x_values": "0, 1", "y_type": "Nothing", "y_values": "",
        "z_type": "Nothing", "z_values": ""}})
    result = manager.generate(request)
    cells = result.images[1:]
    assert [parse_infotext(c.infotext)["ControlNet 0"].split(", ")[2] for c in cells] == ["Weight: 0.0", "Weight: 1.0"]
    plain = manager.generate(GenerationRequest(**BASE)).images[0]
    assert np.array_equal(np.asarray(cells[0].image), np.asarray(plain.image))
    assert not np.array_equal(np.asarray(cells[1].image), np.asarray(plain.image))
    with pytest.raises(RequestError, match="needs a ControlNet unit"):
        manager.extensions.check_script(GenerationRequest(**BASE, script_name=XYZ, script_args={XYZ: {
            "x_type": "[ControlNet] Weight", "x_values": "0, 1", "y_type": "Nothing", "y_values": "",
            "z_type": "Nothing", "z_values": ""}}))
