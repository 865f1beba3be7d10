"""Evaluate the default model on held-out prompts (attribute combinations never seen in training).

Generates through Easel's own engine (20 steps, DPM++ 2M, CFG 6, fixed seeds), scores every image with
`training.metrics`, prints the scores beside the ceiling (the same measures on real renders of the
same scenes), and writes a contact sheet.

    python -m training.evaluate_default_model models/Stable-diffusion/easel-shapes.safetensors \
        --sheet docs/default-model-heldout.png
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from backend.generation import generate
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from backend.settings import Settings
from training import metrics, shapes


def held_out_scenes(per_triple: int = 2) -> list[shapes.Scene]:
    rng = random.Random(2024)
    scenes = []
    for shape, color, background in sorted(shapes.held_out_triples()):
        for _ in range(per_triple):
            scenes.append(shapes.Scene(shape, color, background, rng.choice(tuple(shapes.SIZES)),
                                       rng.choice(shapes.POSITIONS)))
    return scenes


def contact_sheet(images: list[Image.Image], scenes: list[shapes.Scene], columns: int = 8, scale: int = 2) -> Image.Image:
    cell_w, cell_h = shapes.SIZE * scale, shapes.SIZE * scale + 30
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (image, scene) in enumerate(zip(images, scenes)):
        x, y = (index % columns) * cell_w, (index // columns) * cell_h
        sheet.paste(image.resize((cell_w, cell_w), Image.NEAREST), (x, y))
        draw.text((x + 2, y + cell_w + 1), f"{scene.size} {scene.color} {scene.shape}", fill=(0, 0, 0))
        draw.text((x + 2, y + cell_w + 14), f"on {scene.background}, {scene.position}", fill=(80, 80, 80))
    return sheet


@torch.no_grad()
def vae_round_trip(model_path: Path, images: list[Image.Image], scratch: Path) -> list[Image.Image]:
    """Real renders encoded and decoded by the checkpoint's own VAE: the best the model could draw."""
    from backend import checkpoints

    vae = checkpoints.load_single_file(Path(model_path), scratch).vae.float().eval()
    x = torch.stack([torch.from_numpy(np.array(image)) for image in images]).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    pixels = ((y.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    return [Image.fromarray(p) for p in pixels]


def evaluate(model_path: Path, sheet: Path | None = None, steps: int = 20) -> dict:
    # A scratch data folder: hashes and the tokenizer cache stay out of the models folder.
    scratch = Path(tempfile.mkdtemp(prefix="easel-eval-"))
    settings = Settings(data_dir=scratch, ckpt_dir=Path(model_path).resolve().parent)
    manager = ModelManager(settings)
    scenes = held_out_scenes()
    captions = [scene.caption() for scene in scenes]
    images, seconds = [], []
    for index, caption in enumerate(captions):
        start = time.perf_counter()
        result = generate(manager, GenerationRequest(
            prompt=caption, checkpoint=Path(model_path).stem, steps=steps, sampler="DPM++ 2M", cfg_scale=6,
            seed=1000 + index, save_images=False))
        seconds.append(time.perf_counter() - start)
        images.append(result.images[0].image)
    scorer = metrics.Scorer().fit()
    rng = random.Random(5)
    renders = [shapes.render(s, rng) for s in scenes]
    report = {
        "prompts": len(scenes),
        "model": scorer.score(images, scenes),
        "ceiling (real renders)": scorer.score(renders, scenes),
        "real renders through the model's VAE": scorer.score(vae_round_trip(model_path, renders, scratch), scenes),
        "seconds per image (median)": sorted(seconds)[len(seconds) // 2],
        "threads": torch.get_num_threads(),
    }
    if sheet:
        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(images, scenes).save(sheet)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--sheet", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(evaluate(args.model, args.sheet), indent=2))


if __name__ == "__main__":
    main()
