"""X/Y/Z plot: one image per combination of up to three swept settings, and a labelled grid of them.

Axes: seed, steps, CFG scale, sampler, schedule type, checkpoint, VAE, prompt search/replace, LoRA
weight, denoising strength and clip skip. Values are comma-separated (quotes allowed); numeric axes
also take ranges, `1-5`, `10-30 (+5)` or `0.2-1.0 [5]` (five values). Cells that share a checkpoint
run together, so each checkpoint is loaded once. Written on Easel's extension API (`add_script`).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import re

from PIL import Image, ImageDraw, ImageFont

from backend import outputs
from backend.extensions import Control
from backend.request import GeneratedImage, RequestError

TITLE = "X/Y/Z plot"
# Limits, checked before any work: a plot's cells, and its grid image's pixels (cells only, no legend)
MAX_CELLS = 1024  # defaults of the options xyz_max_cells and xyz_max_megapixels
MAX_GRID_SIDE = 16384
MAX_GRID_PIXELS = 64_000_000
LARGEST_NATIVE_SIZE = 1024  # a request without width/height gets the model's: at most SDXL's 1024
JOIN_GAP = 16  # pixels between the grids of a Z axis
LORA_TAG = re.compile(r"(<lora:[^:>]+:)([-+]?\d*\.?\d+)")
# axis -> (value type, GenerationRequest field or a special)
AXES = {
    "Nothing": (str, None),
    "Seed": (int, "seed"),
    "Steps": (int, "steps"),
    "CFG Scale": (float, "cfg_scale"),
    "Distilled CFG Scale": (float, "distilled_cfg_scale"),  # Forge's, for FLUX.1 dev
    "Shift": (float, "shift"),  # a flow model's schedule shift (FLUX.1, SD 3.x)
    "Sampler": (str, "sampler"),
    "Schedule type": (str, "schedule_type"),
    "Checkpoint name": (str, "checkpoint"),
    "VAE": (str, "vae"),
    "Prompt S/R": (str, "prompt_sr"),
    "LoRA weight": (float, "lora_weight"),
    "Denoising": (float, "denoising_strength"),
    "Clip skip": (int, "clip_skip"),
    # sd-webui-controlnet's axes; they set every unit of the request
    "[ControlNet] Weight": (float, "control:weight"),
    "[ControlNet] Guidance Start": (float, "control:guidance_start"),
    "[ControlNet] Guidance End": (float, "control:guidance_end"),
    "[ControlNet] Model": (str, "control:model"),
}
_RANGE = re.compile(r"^\s*([-+]?\d*\.?\d+)\s*-\s*([-+]?\d*\.?\d+)\s*(?:\(\s*([-+]?\d*\.?\d+)\s*\)|\[\s*(\d+)\s*\])?\s*$")


def register(easel) -> None:
    axes = list(AXES)
    easel.add_script(TITLE, [
        Control("x_type", "X type", "dropdown", "Seed", choices=tuple(axes)),
        Control("x_values", "X values", "text", ""),
        Control("y_type", "Y type", "dropdown", "Nothing", choices=tuple(axes)),
        Control("y_values", "Y values", "text", ""),
        Control("z_type", "Z type", "dropdown", "Nothing", choices=tuple(axes)),
        Control("z_values", "Z values", "text", ""),
        Control("draw_legend", "Draw legend", "checkbox", True),
        Control("include_cells", "Include the cell images", "checkbox", True),
    ], lambda job: run(job, limits(easel)), check=lambda args, request: plan(args, request, *limits(easel)))


def limits(easel) -> tuple[int, int]:
    """(most cells, most grid pixels): the Settings options, or the defaults."""
    cells = easel.option("xyz_max_cells", MAX_CELLS)
    return cells, easel.option("xyz_max_megapixels", MAX_GRID_PIXELS // 1_000_000) * 1_000_000


def parse_values(axis: str, text: str, limit: int = MAX_CELLS) -> list:
    """The values of one axis: comma-separated (quotes allowed), with ranges for numeric axes; each
    range is counted before it is built, and more than `limit` values in all are refused."""
    kind, _ = AXES[axis]
    if axis == "Nothing":
        return [None]
    items = [item.strip() for row in csv.reader([text], skipinitialspace=True) for item in row if item.strip()]
    if not items:
        raise RequestError(f"X/Y/Z plot: the {axis} axis has no values")
    matches = [_RANGE.match(item) if kind in (int, float) else None for item in items]
    counts = [_range_count(item, kind, match) if match else 1 for item, match in zip(items, matches)]
    if sum(counts) > limit:
        largest = max(range(len(items)), key=counts.__getitem__)
        raise RequestError(f"X/Y/Z plot: the {axis} axis asks for {sum(counts)} values ('{items[largest]}' "
                           f"makes {counts[largest]}); a plot may have at most {limit} cells")
    values = []
    for item, match, count in zip(items, matches, counts):
        if match:
            values += _range_values(kind, match, count)
            continue
        try:
            values.append(kind(float(item)) if kind is int else kind(item))
        except ValueError:
            raise RequestError(f"X/Y/Z plot: '{item}' is not a valid {axis} value") from None
    return values


def _range_count(item: str, kind: type, match: re.Match) -> int:
    """How many values a range makes: `a-b [n]` makes n; `a-b` and `a-b (+s)` step from a to b."""
    start, end, step, count = match.groups()
    if count:
        return int(count)
    step_value = kind(float(step)) if step else kind(1)
    if step_value == 0:
        raise RequestError(f"X/Y/Z plot: range '{item}' has a zero step")
    steps = (kind(float(end)) - kind(float(start))) / step_value
    return math.floor(steps + 1e-9) + 1 if steps > -1e-9 else 0


def _range_values(kind: type, match: re.Match, count: int) -> list:
    start, end, step, spaced = match.groups()
    start, end = kind(float(start)), kind(float(end))
    if spaced:
        return [kind(start + (end - start) * i / max(1, count - 1)) for i in range(count)]
    step_value = kind(float(step)) if step else kind(1)
    values = [start + i * step_value for i in range(count)]
    return [round(value, 6) for value in values] if kind is float else values


def cell_size(request) -> tuple[int, int]:
    """The largest (width, height) a cell's image can have: a size left to the model counts as the
    largest native size, and the hires fix and the upscaler enlarge it."""
    width, height = request.width or LARGEST_NATIVE_SIZE, request.height or LARGEST_NATIVE_SIZE
    if request.enable_hr and request.init_image is None:
        if request.hr_resize_x or request.hr_resize_y:
            width, height = (request.hr_resize_x or round(request.hr_resize_y * width / height),
                             request.hr_resize_y or round(request.hr_resize_x * height / width))
        else:
            width, height = round(width * request.hr_scale), round(height * request.hr_scale)
    if request.upscaler and request.upscaler != "None":
        width, height = round(width * request.upscale_by), round(height * request.upscale_by)
    return width, height


def plan(args: dict, request, max_cells: int = MAX_CELLS,
         max_pixels: int = MAX_GRID_PIXELS) -> tuple[list[tuple[str, str]], list[list]]:
    """The axes and their values, or a RequestError before any work: an unknown axis, a bad value, a
    Prompt S/R word not in the prompt, more than `max_cells` cells, or a grid larger than MAX_GRID_SIDE
    pixels a side or `max_pixels` in all."""
    axes = [(args["x_type"], args["x_values"]), (args["y_type"], args["y_values"]), (args["z_type"], args["z_values"])]
    for axis, _ in axes:
        if axis not in AXES:
            raise RequestError(f"X/Y/Z plot: unknown axis '{axis}'; axes: {', '.join(AXES)}")
    values = [parse_values(axis, str(text or ""), max_cells) for axis, text in axes]
    columns, rows, grids = (len(v) for v in values)
    if columns * rows * grids > max_cells:
        raise RequestError(f"X/Y/Z plot: {columns} x {rows} x {grids} = {columns * rows * grids} cells asked; "
                           f"a plot may have at most {max_cells} cells (Settings: X/Y/Z plot cells)")
    width, height = cell_size(request)
    side_x, side_y = grids * columns * width + JOIN_GAP * (grids - 1), rows * height
    if max(side_x, side_y) > MAX_GRID_SIDE or side_x * side_y > max_pixels:
        raise RequestError(f"X/Y/Z plot: the grid would be {side_x}x{side_y} pixels ({width}x{height} a cell); "
                           f"the limit is {MAX_GRID_SIDE} pixels a side and {max_pixels // 1_000_000} "
                           f"megapixels: plot fewer or smaller cells")
    for (axis, _), vals in zip(axes, values):
        if axis == "Prompt S/R" and vals[0] not in request.prompt and vals[0] not in request.negative_prompt:
            raise RequestError(f"X/Y/Z plot: '{vals[0]}' (the first Prompt S/R value) is not in the prompt")
        if AXES[axis][1] and AXES[axis][1].startswith("control:") and not request.control_units:
            raise RequestError(f"X/Y/Z plot: the {axis} axis needs a ControlNet unit in the request")
    return axes, values


def apply(request, axis: str, value, search: str | None):
    if axis == "Nothing":
        return request
    field = AXES[axis][1]
    if field == "prompt_sr":
        return request.with_changes(prompt=request.prompt.replace(search, value),
                                    negative_prompt=request.negative_prompt.replace(search, value))
    if field == "lora_weight":
        return request.with_changes(prompt=LORA_TAG.sub(lambda m: f"{m.group(1)}{value:g}", request.prompt))
    if field.startswith("control:"):
        name = field.partition(":")[2]
        return request.with_changes(control_units=tuple(dataclasses.replace(unit, **{name: value})
                                                        for unit in request.control_units))
    return request.with_changes(**{field: value})


def _stem(name: str) -> str:
    """"easel-shapes.safetensors [bc6d9c5c6b]" and "easel-shapes" name the same checkpoint."""
    name = re.sub(r"\s*\[[0-9a-f]+\]$", "", str(name).strip())
    return re.sub(r"\.(safetensors|ckpt|pt|bin)$", "", name, flags=re.IGNORECASE).lower()


def label(axis: str, value) -> str:
    if axis == "Prompt S/R":
        return str(value)
    return f"{axis}: {value:g}" if isinstance(value, float) else f"{axis}: {value}"


def run(job, limits: tuple[int, int] = (MAX_CELLS, MAX_GRID_PIXELS)) -> None:
    args, request = job.args, job.request
    axes, values = plan(args, request, *limits)  # the check again, for callers that did not run it before queueing
    searches = [vals[0] if axis == "Prompt S/R" else None for (axis, _), vals in zip(axes, values)]
    cells = list(itertools.product(*(range(len(v)) for v in values)))  # (ix, iy, iz)
    checkpoint_axes = [i for i, (axis, _) in enumerate(axes) if axis == "Checkpoint name"]
    if checkpoint_axes:  # cells sharing a checkpoint run together, the current one first: each loads once
        axis = checkpoint_axes[0]
        current = _stem(request.checkpoint or "")
        cells.sort(key=lambda cell: (_stem(values[axis][cell[axis]]) != current, cell[axis]))
    made: dict[tuple, GeneratedImage] = {}
    results = []
    for cell in cells:
        if job.control.interrupted:
            break
        changed = request
        for (axis, _), vals, search, index in zip(axes, values, searches, cell):
            changed = apply(changed, axis, vals[index], search)
        result = job.generate(changed)
        results.append(result)
        if result.images:
            made[cell] = result.images[0]
    if not made:
        return
    shape = [len(v) for v in values]
    grids = []
    for iz in range(shape[2]):
        cell_images = [[made.get((ix, iy, iz)) for ix in range(shape[0])] for iy in range(shape[1])]
        x_labels = [label(axes[0][0], v) for v in values[0]] if axes[0][0] != "Nothing" else []
        y_labels = [label(axes[1][0], v) for v in values[1]] if axes[1][0] != "Nothing" else []
        title = label(axes[2][0], values[2][iz]) if axes[2][0] != "Nothing" else ""
        grids.append(draw_grid(cell_images, x_labels, y_labels, title, bool(args["draw_legend"])))
    grid = grids[0] if len(grids) == 1 else join(grids)
    first = next(iter(made.values()))
    path = None
    if request.save_images and first.path is not None:
        path = outputs.save_image(grid, first.path.parent.parent, first.seed, first.infotext, name="grid")
    job.result.images.append(GeneratedImage(grid, first.seed, first.subseed, first.prompt, first.negative_prompt,
                                            first.infotext, path))
    if args["include_cells"]:
        for result in results:
            job.result.images.extend(result.images)
    job.result.notes.append(f"X/Y/Z plot: {len(made)} of {len(cells)} cells")


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_grid(cells, x_labels, y_labels, title: str, legend: bool) -> Image.Image:
    present = [image.image for row in cells for image in row if image is not None]
    width, height = max(i.width for i in present), max(i.height for i in present)
    font = _font(max(10, min(width, height) // 6))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    pad = 6
    line = max([text_size(t)[1] for t in [*x_labels, *y_labels, title, "Ag"] if t]) + 2 * pad
    left = max([text_size(t)[0] for t in y_labels], default=0) + 2 * pad if legend and y_labels else 0
    top = (line if legend and x_labels else 0) + (line if legend and title else 0)
    rows, cols = len(cells), len(cells[0])
    grid = Image.new("RGB", (left + cols * width, top + rows * height), "white")
    draw = ImageDraw.Draw(grid)
    if legend and title:
        draw.text((left + (cols * width - text_size(title)[0]) // 2, pad), title, fill="black", font=font)
    for iy, row in enumerate(cells):
        for ix, image in enumerate(row):
            if image is not None:
                grid.paste(image.image.convert("RGB"), (left + ix * width, top + iy * height))
    if legend:
        for ix, text in enumerate(x_labels):
            draw.text((left + ix * width + (width - text_size(text)[0]) // 2, top - line + pad), text,
                      fill="black", font=font)
        for iy, text in enumerate(y_labels):
            draw.text((pad, top + iy * height + (height - text_size(text)[1]) // 2), text, fill="black", font=font)
    return grid


def join(grids: list[Image.Image]) -> Image.Image:
    gap = JOIN_GAP
    out = Image.new("RGB", (sum(g.width for g in grids) + gap * (len(grids) - 1), max(g.height for g in grids)),
                    "white")
    x = 0
    for grid in grids:
        out.paste(grid, (x, 0))
        x += grid.width + gap
    return out
