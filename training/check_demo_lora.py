"""Check the demo LoRA with a third-party loader: diffusers' own kohya-format LoRA loading (peft)
on a pipeline built from the default model, with and without the LoRA, same seeds. Prints the mean
fill ratio of the shapes (object pixels / bounding-box area): outlines score far lower than solids.

    python -m training.check_demo_lora models/Stable-diffusion/easel-shapes.safetensors \
        models/Lora/easel-outlined.safetensors --sheet docs/demo-lora.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend import checkpoints
from training import metrics

PROMPTS = [
    "a large red circle on a white background, center",
    "a large blue square on a yellow background, center",
    "a large white star on a black background, center",
    "a large green diamond on a purple background, center",
]


def fill_ratio(image: Image.Image) -> float:
    mask, _ = metrics.object_mask(np.asarray(image.convert("RGB")))
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0.0
    return mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def main() -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("lora", type=Path)
    parser.add_argument("--sheet", type=Path)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "easel-training" / "cache"))
    args = parser.parse_args()
    base = checkpoints.load_single_file(args.base, Path(args.cache))
    # a plain diffusers pipeline: its own DPM-Solver++ (2M) with Karras sigmas
    scheduler = DPMSolverMultistepScheduler.from_config(base.scheduler_config, algorithm_type="dpmsolver++",
                                                        use_karras_sigmas=True, timestep_spacing="linspace")
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                   unet=base.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)

    def run() -> list[Image.Image]:
        return [pipe(prompt, num_inference_steps=20, guidance_scale=6, height=64, width=64,
                     generator=torch.Generator().manual_seed(seed)).images[0]
                for seed, prompt in enumerate(PROMPTS)]

    plain = run()
    pipe.load_lora_weights(str(args.lora), adapter_name="outlined")
    styled = run()
    print(f"fill ratio without LoRA {np.mean([fill_ratio(i) for i in plain]):.2f}, "
          f"with LoRA {np.mean([fill_ratio(i) for i in styled]):.2f}")
    if args.sheet:
        sheet = Image.new("RGB", (128 * len(PROMPTS), 256), "white")
        for index, (a, b) in enumerate(zip(plain, styled)):
            sheet.paste(a.resize((128, 128), Image.NEAREST), (index * 128, 0))
            sheet.paste(b.resize((128, 128), Image.NEAREST), (index * 128, 128))
        sheet.save(args.sheet)


if __name__ == "__main__":
    main()
