"""Benchmark: seconds per step with 0, 1 and 2 ControlNet units in Easel, beside a plain diffusers
`StableDiffusionControlNetPipeline` on the same weights (the SD 1.5-shaped model of
`bench.engine_vs_diffusers`, and an SD 1.5-shaped ControlNet made from its UNet, random weights), in the
same run. Also the ControlNet's share of a step's FLOPs, estimated from parameter counts.

    python -m bench.controlnet --size 256 --steps 4      # CPU
    python -m bench.controlnet --size 512 --steps 20     # GPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from backend import control_preprocessors, random_controlnets
from backend.control_units import ControlUnit
from backend.model_manager import ModelManager
from backend.settings import Settings
from bench.engine_vs_diffusers import build_checkpoints, time_diffusers, time_easel

CONTROLNET = "sd15-random-canny"


def edges(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 6, size // 6, size * 2 // 3, size * 2 // 3), outline="black", width=4)
    return image


def build_controlnet(manager: ModelManager) -> None:
    folder = manager.settings.model_dir("controlnet")
    target = folder / f"{CONTROLNET}.safetensors"
    if not target.is_file():
        print("building an SD 1.5-shaped ControlNet with random weights (once)...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        net = random_controlnets.for_unet(manager.activate("sd15-random-a").unet.float(), seed=0)
        random_controlnets.save_lllyasviel(net, target, torch.float16)
        manager.controlnets.library.refresh()


def diffusers_pipeline(model, net):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(
        model.scheduler_config, algorithm_type="dpmsolver++", use_karras_sigmas=True, timestep_spacing="linspace")
    return StableDiffusionControlNetPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
        controlnet=net, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (the best is kept)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "easel-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = build_checkpoints(args.cache)
    manager = ModelManager(Settings(data_dir=args.cache, ckpt_dir=folder, device=args.device))
    build_controlnet(manager)
    model = manager.activate("sd15-random-a")
    net, _ = manager.controlnets.load(CONTROLNET, model)
    print(f"device {manager.placement.device}, dtype {manager.placement.dtype}, threads {args.threads}, "
          f"{args.size}x{args.size}, {args.steps} steps, CFG 7, DPM++ 2M Karras, canny")
    pipe = diffusers_pipeline(model, net)
    times: dict[str, list[float]] = {"easel 0": [], "easel 1": [], "easel 2": [], "diffusers 1": []}
    unit = ControlUnit(CONTROLNET, "canny", edges(args.size))
    hint = control_preprocessors.run_preprocessor("canny", edges(args.size), args.size).convert("RGB")
    for _ in range(args.repeats):  # interleaved, so each sees the same machine load
        for units in (0, 1, 2):
            times[f"easel {units}"].append(time_easel(manager, args, control_units=(unit,) * units))
        times["diffusers 1"].append(time_diffusers(pipe, args, image=hint))
    best = {key: min(values) for key, values in times.items()}
    unet_params = sum(p.numel() for p in model.unet.parameters())
    net_params = sum(p.numel() for p in net.parameters())
    print()
    print(f"{'seconds per step':34}{'s':>10}{'vs diffusers':>14}")
    for key, label in (("easel 0", "Easel, no unit"), ("easel 1", "Easel, 1 unit"), ("easel 2", "Easel, 2 units"),
                       ("diffusers 1", "diffusers ControlNet pipeline")):
        print(f"{label:34}{best[key]:>10.3f}{best[key] / best['diffusers 1']:>13.2f}x")
    overhead = best["easel 1"] / best["easel 0"] - 1
    share = net_params / unet_params
    print(f"\none unit's overhead over none: {overhead:+.0%}; the ControlNet's parameters are {share:.0%} of the "
          "UNet's (roughly its share of the FLOPs: it is the UNet's encoder and middle)")


if __name__ == "__main__":
    main()
