"""Sharpen the default model's VAE decoder while the UNet trains: the encoder (and so every latent the
UNet learns from) stays frozen, only `post_quant_conv` and the decoder train. Saves `decoder.pt` in
the work folder; `train_default_model.py --export` merges it.

    python training/finetune_decoder.py --minutes 40
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import metrics, shapes  # noqa: E402
from training.train_default_model import build_models, model_configs, to_pixels  # noqa: E402

DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def decoder_state(vae) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(DECODER_PREFIXES)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "easel-training" / "default-model"))
    parser.add_argument("--minutes", type=float, default=40)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    vae = build_models(model_configs())["vae"]
    saved = torch.load(work / "state.pt", map_location="cpu", weights_only=False)
    if saved["state"]["unet_step"] == 0:
        raise SystemExit("the VAE stage has not finished (its latents are not normalised yet); wait for the UNet stage")
    vae.load_state_dict(saved["vae"])
    out = work / "decoder.pt"
    step = 0
    if out.is_file():
        previous = torch.load(out, map_location="cpu", weights_only=False)
        vae.load_state_dict(previous["weights"], strict=False)
        step = previous["step"]
    vae.requires_grad_(False)
    trainable = [p for n, p in vae.named_parameters() if n.startswith(DECODER_PREFIXES)]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    rng, exclude = random.Random(args.seed + step), shapes.held_out_triples()
    deadline, running = time.time() + args.minutes * 60, []
    while time.time() < deadline:
        pixels, _, _ = shapes.sample_batch(rng, args.batch, exclude)
        x = to_pixels(pixels)
        weight = 1 + 8 * torch.from_numpy(np.stack([metrics.object_mask(p)[0] for p in pixels]))[:, None].float()
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample()
        recon = vae.decode(latents).sample
        error = (recon - x).abs() + (recon - x) ** 2
        loss = (error * weight).mean() / weight.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        running.append(loss.item())
        if step % 50 == 0:
            print(json.dumps({"stage": "decoder", "step": step, "loss": sum(running) / len(running)}), flush=True)
            running = []
            torch.save({"weights": decoder_state(vae), "step": step}, out.with_suffix(".tmp"))
            out.with_suffix(".tmp").replace(out)
    torch.save({"weights": decoder_state(vae), "step": step}, out.with_suffix(".tmp"))
    out.with_suffix(".tmp").replace(out)


if __name__ == "__main__":
    main()
