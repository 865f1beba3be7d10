"""Evaluate the default model's canny ControlNet on held-out scenes (attribute combinations never seen in
training), through Easel's own engine as a user runs it: the unit gets the scene's rendered image with
the canny preprocessor at its default thresholds, pixel perfect (at the default processor resolution of 512
a 64-pixel image is blown up 8x, and the soft edges of a low-contrast pair such as red on orange fall
under the thresholds: 10 of the 48 images give no edges at all), and the prompt does not name the position.

Three conditions, same seeds: the prompt names the shape ("with edges"), the prompt says only "shape"
("edges alone": the shape must come from the edges), and no unit at all ("no ControlNet": the position
is then a guess). Scores come from `training.metrics`, beside the ceiling of real renders.

    python -m training.evaluate_controlnet models/ControlNet/easel-shapes-canny.safetensors \
        --sheet docs/controlnet-heldout.png
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from backend.control_units import ControlUnit
from backend.generation import generate
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from backend.settings import Settings
from training import metrics, shapes
from training.evaluate_default_model import contact_sheet, held_out_scenes

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "Stable-diffusion" / "easel-shapes.safetensors"
TARGETS = {"position": 0.9, "shape": 0.8, "color": 0.9}


def prompt_for(scene: shapes.Scene, name_shape: bool = True) -> str:
    return f"a {scene.size} {scene.color} {scene.shape if name_shape else 'shape'} on a {scene.background} background"


def generate_all(manager: ModelManager, checkpoint: str, scenes, controls, name_shape: bool, steps: int):
    images, seconds = [], []
    for index, (scene, control) in enumerate(zip(scenes, controls)):
        units = () if control is None else (ControlUnit(model=control[0], module="canny", image=control[1],
                                                        pixel_perfect=True),)
        start = time.perf_counter()
        result = generate(manager, GenerationRequest(
            prompt=prompt_for(scene, name_shape), checkpoint=checkpoint, steps=steps, sampler="DPM++ 2M",
            cfg_scale=6, seed=1000 + index, width=shapes.SIZE, height=shapes.SIZE, control_units=units,
            save_images=False))
        seconds.append(time.perf_counter() - start)
        images.append(result.images[0].image)
    return images, sorted(seconds)[len(seconds) // 2]


def evaluate(controlnet: Path, model: Path = DEFAULT_MODEL, sheet: Path | None = None, steps: int = 20) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="easel-eval-"))  # hashes and caches stay out of models/
    settings = Settings(data_dir=scratch, ckpt_dir=Path(model).resolve().parent,
                        controlnet_dir=Path(controlnet).resolve().parent)
    manager = ModelManager(settings)
    scenes = held_out_scenes()
    rng = random.Random(11)  # control images: renders with their own jitter, not the ones scored as ceiling
    control_images = [shapes.render(scene, rng) for scene in scenes]
    name = Path(controlnet).stem
    scorer = metrics.Scorer().fit()
    report: dict = {"prompts": len(scenes), "steps": steps}
    sheets = []
    for label, with_unit, name_shape in (("with edges", True, True), ("edges alone", True, False),
                                         ("no ControlNet", False, True)):
        controls = [(name, image) if with_unit else None for image in control_images]
        images, seconds = generate_all(manager, Path(model).stem, scenes, controls, name_shape, steps)
        report[label] = {**scorer.score(images, scenes), "seconds per image (median)": round(seconds, 3)}
        sheets.append(images)
    report["ceiling (real renders)"] = scorer.score(control_images, scenes)
    report["targets met"] = all(report["with edges"][k] >= v for k, v in TARGETS.items())
    report["threads"] = torch.get_num_threads()
    if sheet:
        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        _sheet(control_images, sheets, scenes).save(sheet)
    return report


def _sheet(control_images, sheets, scenes, count: int = 16) -> Image.Image:
    """Rows of `count` scenes: the control image, then each condition's generation."""
    rows = [contact_sheet(images[:count], scenes[:count], columns=count) for images in (control_images, *sheets)]
    out = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), (255, 255, 255))
    for index, row in enumerate(rows):
        out.paste(row, (0, index * rows[0].height))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("controlnet", type=Path)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--sheet", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(evaluate(args.controlnet, args.model, args.sheet, args.steps), indent=2))


if __name__ == "__main__":
    main()
