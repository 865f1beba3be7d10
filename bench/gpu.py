"""Benchmark: Easel's speed and memory beside a plain diffusers pipeline on the same weights, in one run.

- On CUDA: SD 1.5 at 512x512 and SDXL at 1024x1024 with their real shapes (random weights, written once outside
  the repo), batch 1 and 4, 20 steps, DPM++ 2M Karras: it/s and peak VRAM of Easel by default, with
  --medvram and --lowvram, with torch.compile (and its compile time) and with fp8 weights, beside diffusers'
  StableDiffusionPipeline / StableDiffusionXLPipeline on the same modules.
- Always: the shipped default model at 64x64, 20 steps, DPM++ 2M Karras, batch 1 and 8, seconds per image of
  Easel vs diffusers on the same loaded modules (the per-step overhead outside the UNet), best of `--rounds`.

    python -m bench.gpu                      # CUDA when present; the CPU part always
    python -m bench.gpu --only-cpu
    python -m bench.gpu --tiny --device cpu  # the CUDA part's code on tiny shapes (a smoke test)
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from backend import generation, random_models
from backend.devices import Placement
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "easel-bench" / "gpu"
PROMPT = "a photograph of an astronaut riding a horse, detailed, 8k"
DEFAULT_PROMPT = "a large red star on a blue background, center"


def _pipeline(model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(model.scheduler_config, algorithm_type="dpmsolver++",
                                                        use_karras_sigmas=True)
    e, t = model.text_encoders, model.tokenizers
    if model.family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=e[0], tokenizer=t[0], text_encoder_2=e[1],
                                         tokenizer_2=t[1], unet=model.unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=e[0], tokenizer=t[0], unet=model.unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(function, device) -> float:
    _sync(device)
    start = time.perf_counter()
    function()
    _sync(device)
    return time.perf_counter() - start


def easel_seconds(manager, prompt, size, steps, batch, rounds) -> float:
    request = GenerationRequest(prompt=prompt, negative_prompt="blurry", width=size, height=size, steps=steps,
                                sampler="DPM++ 2M", schedule_type="Karras", cfg_scale=7, batch_size=batch, seed=1,
                                save_images=False)
    generation.generate(manager, request)  # warm-up (and, with compile, the compilation)
    return min(_timed(lambda: generation.generate(manager, request), manager.placement.device) for _ in range(rounds))


def diffusers_seconds(pipe, prompt, size, steps, batch, rounds, device) -> float:
    def call():
        pipe(prompt, negative_prompt="blurry", width=size, height=size, num_inference_steps=steps, guidance_scale=7,
             num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(1))

    call()
    return min(_timed(call, device) for _ in range(rounds))


# -- CPU: the overhead outside the UNet, on the default model ----------------------------------------------
def cpu_overhead(rounds: int) -> None:
    data = CACHE / "default"
    folder = data / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "models" / "Stable-diffusion" / "easel-shapes.safetensors", folder)
    manager = ModelManager(Settings(data_dir=data, device="cpu"))
    easel_seconds(manager, DEFAULT_PROMPT, 64, 2, 1, 1)
    pipe = _pipeline(manager.active)
    print(f"CPU, default model, 64x64, 20 steps, DPM++ 2M Karras, CFG 7, {torch.get_num_threads()} threads, "
          f"best of {rounds} (seconds per image):")
    for batch in (1, 8):
        ours = easel_seconds(manager, DEFAULT_PROMPT, 64, 20, batch, rounds) / batch
        theirs = diffusers_seconds(pipe, DEFAULT_PROMPT, 64, 20, batch, rounds, "cpu") / batch
        print(f"  batch {batch}: Easel {ours:.4f} s, diffusers {theirs:.4f} s, ratio {ours / theirs:.3f}x")


# -- CUDA: real shapes ---------------------------------------------------------------------------------------
def checkpoint(family: str, tiny: bool) -> Path:
    path = CACHE / "Stable-diffusion" / f"{family}-{'tiny' if tiny else 'real'}-random.safetensors"
    if not path.is_file():
        print(f"writing {path.name} (once)...", flush=True)
        model = random_models.build(family, tiny=tiny, seed=0)
        random_models.save_original(model, path.with_suffix(".tmp.safetensors"), torch.float16)
        os.replace(path.with_suffix(".tmp.safetensors"), path)
    return path


def _manager(device: str, mode: str) -> ModelManager:
    manager = ModelManager(Settings(data_dir=CACHE, ckpt_dir=CACHE / "Stable-diffusion", device=device))
    placement = manager.placement
    if mode in ("medvram", "lowvram"):  # the flags' placements, also where they are off (the CPU smoke test)
        manager.placement = Placement(placement.device, placement.dtype, placement.vae_dtype,
                                      "model" if mode == "medvram" else "sequential")
    if mode == "fp8":
        manager.set_fp8_storage("Enable")
    return manager


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else float("nan")


def real_shapes(device: str, tiny: bool, rounds: int, steps: int) -> None:
    for family, size in (("sd1", 512), ("sdxl", 1024)):
        size = 64 if tiny else size
        name = checkpoint(family, tiny).stem
        print(f"\n{family} at {size}x{size}, {steps} steps, DPM++ 2M Karras, CFG 7 ({device}):")
        baseline = {}
        for mode in ("default", "compile", "fp8", "medvram", "lowvram"):
            manager = _manager(device, mode)
            manager.activate(name)
            if mode == "compile":
                manager.set_speed(compiled=True, channels_last=False)
            for batch in (1, 4):
                if torch.device(device).type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                seconds = easel_seconds(manager, PROMPT, size, steps, batch, rounds)
                first = time.perf_counter() - start - seconds * rounds  # the warm-up beyond a timed run
                line = (f"  {mode:8s} batch {batch}: {steps * batch / seconds:7.2f} it/s (images x steps), "
                        f"peak VRAM {_peak(device):.2f} GiB")
                if mode == "default":
                    pipe = _pipeline(manager.active)
                    baseline[batch] = diffusers_seconds(pipe, PROMPT, size, steps, batch, rounds, device)
                    del pipe
                line += f", {baseline[batch] / seconds:.2f}x diffusers"
                if mode == "compile" and batch == 1:
                    line += f", first image (compiling) +{first:.1f} s"
                print(line, flush=True)
            manager.unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only-cpu", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: run the real-shape part's code anywhere")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu_overhead(args.rounds)
    if args.only_cpu:
        return
    if torch.device(args.device).type != "cuda" and not args.tiny:
        print("\nno CUDA device: the real-shape part needs one (--tiny --device cpu runs its code on tiny shapes)")
        return
    real_shapes(args.device, args.tiny, args.rounds, args.steps)


if __name__ == "__main__":
    main()
