"""Benchmark: Easel's engine vs a plain diffusers StableDiffusionPipeline on the same SD 1.5-shaped
weights, plus cold load vs cached switch time and RSS over repeated checkpoint switches.

The model has the real SD 1.5 shapes (860M-parameter UNet) with random weights, built once and cached
outside the repo (`--cache`). Prints figures and ratios measured in this one run.

    python -m bench.engine_vs_diffusers --size 256 --steps 4      # CPU
    python -m bench.engine_vs_diffusers --size 512 --steps 20     # GPU
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import psutil
import torch

from backend import random_models
from backend.generation import generate
from backend.model_manager import ModelManager
from backend.progress import JobControl
from backend.request import GenerationRequest
from backend.settings import Settings

PROMPT = "a photograph of an astronaut riding a horse, detailed, 8k"
NEGATIVE = "blurry, low quality"


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


def build_checkpoints(cache: Path) -> Path:
    """Two names for one SD 1.5-shaped fp16 file (a hard link: switching really reloads)."""
    folder = cache / "Stable-diffusion"
    first, second = folder / "sd15-random-a.safetensors", folder / "sd15-random-b.safetensors"
    if not first.is_file():
        print("building an SD 1.5-shaped model with random weights (once)...", flush=True)
        model = random_models.build("sd1", tiny=False, seed=0)
        random_models.save_original(model, first.with_suffix(".tmp.safetensors"), torch.float16)
        first.with_suffix(".tmp.safetensors").rename(first)
        del model
        gc.collect()
    if not second.exists():
        os.link(first, second)
    return folder


def step_times(events: list[float]) -> float:
    """Median seconds per step from per-step timestamps (the first step is dropped as warm-up)."""
    gaps = sorted(b - a for a, b in zip(events, events[1:]))
    return gaps[len(gaps) // 2]


def time_easel(manager, args, **fields) -> float:
    """Seconds per step of Easel; `fields`: more request fields (ControlNet units)."""
    stamps: list[float] = []
    control = JobControl(on_progress=lambda p: stamps.append(time.perf_counter()))
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps, sampler="DPM++ 2M",
                                schedule_type="Karras", cfg_scale=7, width=args.size, height=args.size,
                                seed=1, save_images=False, **fields)
    generate(manager, request, control)
    return step_times(stamps)


def diffusers_pipeline(model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(
        model.scheduler_config, algorithm_type="dpmsolver++", use_karras_sigmas=True, timestep_spacing="linspace")
    return StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def time_diffusers(pipe, args, **inputs) -> float:
    """Seconds per step of a diffusers pipeline; `inputs`: more call arguments (a ControlNet's image)."""
    stamps: list[float] = []

    def on_step(pipe, step, timestep, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7, width=args.size,
         height=args.size, generator=torch.Generator("cpu").manual_seed(1), callback_on_step_end=on_step,
         output_type="pil", **inputs)
    return step_times(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--switches", type=int, default=20, help="checkpoint switches for the RSS figure")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each engine (best is kept)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "easel-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = build_checkpoints(args.cache)
    settings = Settings(data_dir=args.cache, ckpt_dir=folder, device=args.device, checkpoint_cache_size=2)
    manager = ModelManager(settings)
    print(f"device {manager.placement.device}, dtype {manager.placement.dtype}, threads {args.threads}, "
          f"{args.size}x{args.size}, {args.steps} steps, CFG 7, DPM++ 2M Karras")

    # 1. Load times: cold, then a switch to a checkpoint that is still cached
    start = time.perf_counter()
    model = manager.activate("sd15-random-a")
    cold = time.perf_counter() - start
    manager.activate("sd15-random-b")
    start = time.perf_counter()
    manager.activate("sd15-random-a")
    cached = time.perf_counter() - start

    # 2. Seconds per step, interleaved so both engines see the same machine load
    pipe = diffusers_pipeline(model)
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(time_easel(manager, args))
        theirs.append(time_diffusers(pipe, args))
    del pipe, model

    # 3. RSS over switches that really reload (cache of one, as A1111's default)
    manager.unload()
    gc.collect()
    single = ModelManager(settings.with_changes(checkpoint_cache_size=1))
    single.activate("sd15-random-a")
    gc.collect()
    rss_one = rss_gib()
    for index in range(args.switches):
        single.activate("sd15-random-b" if index % 2 == 0 else "sd15-random-a")
    gc.collect()
    rss_many = rss_gib()

    best_ours, best_theirs = min(ours), min(theirs)
    print()
    print(f"{'':34}{'Easel':>10}{'diffusers':>12}{'ratio':>8}")
    print(f"{'seconds per step (best of ' + str(args.repeats) + ')':34}{best_ours:>10.3f}{best_theirs:>12.3f}"
          f"{best_ours / best_theirs:>8.2f}")
    print(f"{'cold load (s)':34}{cold:>10.2f}")
    print(f"{'cached switch (s)':34}{cached:>10.4f}{'':>12}{cached / cold:>8.4f}  (goal <= 0.1)")
    print(f"{'RSS after 1 load (GiB)':34}{rss_one:>10.2f}")
    print(f"{'RSS after ' + str(args.switches) + ' switches (GiB)':34}{rss_many:>10.2f}{'':>12}"
          f"{rss_many / rss_one:>8.2f}  (goal ~1.0)")


if __name__ == "__main__":
    main()
