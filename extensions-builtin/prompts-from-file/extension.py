"""Prompts from file or textbox: one generation per line, as A1111's script. A plain line is the
prompt; a line of `--option value` pairs sets any of prompt, negative_prompt, steps, cfg_scale, seed,
sampler_name, scheduler, width, height, batch_size, n_iter, denoising_strength, clip_skip and styles
for that line (values with spaces in quotes). Written on Easel's extension API (`add_script`).
"""

from __future__ import annotations

import random
import shlex

from backend.extensions import Control
from backend.request import RequestError

TITLE = "Prompts from file or textbox"
# option -> (GenerationRequest field, type)
OPTIONS = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float), "seed": ("seed", int), "sampler_name": ("sampler", str),
    "sampler_index": ("sampler", str), "scheduler": ("schedule_type", str), "width": ("width", int),
    "height": ("height", int), "batch_size": ("batch_size", int), "n_iter": ("batch_count", int),
    "denoising_strength": ("denoising_strength", float), "clip_skip": ("clip_skip", int),
    "subseed": ("subseed", int), "subseed_strength": ("subseed_strength", float), "styles": ("styles", str),
}


def register(easel) -> None:
    easel.add_script(TITLE, [
        Control("prompts", "List of prompt inputs (one per line)", "textarea", ""),
        Control("iterate_seed", "Iterate seed every line", "checkbox", False),
        Control("same_seed", "Use the same random seed for all lines", "checkbox", False),
    ], run)


def parse_line(line: str, number: int) -> dict:
    if not line.lstrip().startswith("--"):
        return {"prompt": line.strip()}
    try:
        tokens = shlex.split(line)
    except ValueError as error:
        raise RequestError(f"prompts from file, line {number}: {error}") from None
    changes = {}
    for index in range(0, len(tokens), 2):
        option = tokens[index]
        if not option.startswith("--") or option[2:] not in OPTIONS:
            raise RequestError(f"prompts from file, line {number}: unknown option {option!r}; options: "
                               + ", ".join(f"--{o}" for o in OPTIONS))
        if index + 1 >= len(tokens):
            raise RequestError(f"prompts from file, line {number}: {option} needs a value")
        field, kind = OPTIONS[option[2:]]
        value = tokens[index + 1]
        try:
            changes[field] = tuple(s.strip() for s in value.split(",")) if field == "styles" else \
                kind(float(value)) if kind is int else kind(value)
        except ValueError:
            raise RequestError(f"prompts from file, line {number}: {option} takes a number, not {value!r}") from None
    return changes


def run(job) -> None:
    lines = [(n, line) for n, line in enumerate(str(job.args["prompts"]).splitlines(), 1) if line.strip()]
    if not lines:
        raise RequestError("prompts from file: the list is empty; write one prompt (or --options) per line")
    jobs = [parse_line(line, n) for n, line in lines]  # every line is checked before anything runs
    base = job.request
    seed = base.seed
    if seed < 0 and (job.args["iterate_seed"] or job.args["same_seed"]):
        seed = random.randrange(0, 2**32 - 1)
    for index, changes in enumerate(jobs):
        if job.control.interrupted:
            break
        request = base.with_changes(**changes)
        if "seed" not in changes and seed >= 0 and (job.args["iterate_seed"] or job.args["same_seed"]):
            request = request.with_changes(seed=seed + index if job.args["iterate_seed"] else seed)
        result = job.generate(request)
        job.result.images.extend(result.images)
    job.result.notes.append(f"Prompts from file: {len(job.result.images)} images from {len(jobs)} lines")
