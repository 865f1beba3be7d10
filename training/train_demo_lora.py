"""Train the demo LoRA on the default model: shapes drawn as outlines instead of filled, saved in
the kohya-ss `.safetensors` format that civitai serves (`lora_unet_*` keys with `lora_down`,
`lora_up` and `alpha`), so it loads wherever A1111-style LoRAs do.

    python -m training.train_demo_lora models/Stable-diffusion/easel-shapes.safetensors \
        models/Lora/easel-outlined.safetensors --minutes 10
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from backend import checkpoints
from training import shapes
from training.train_default_model import to_pixels


class LoRALinear(torch.nn.Module):
    """y = W x + (alpha / rank) * up(down(x)), with W frozen; `up` starts at zero (no change)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.down.weight, std=1 / rank)
        torch.nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank
        self.alpha = alpha

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def attach(unet, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap the attention projections (to_q, to_k, to_v, to_out.0 of every attn1/attn2);
    returns {diffusers module path: wrapper}."""
    wrapped = {}
    for name, module in list(unet.named_modules()):
        if name.split(".")[-1] not in ("attn1", "attn2"):
            continue
        for attr in ("to_q", "to_k", "to_v"):
            lora = LoRALinear(getattr(module, attr), rank, alpha)
            setattr(module, attr, lora)
            wrapped[f"{name}.{attr}"] = lora
        lora = LoRALinear(module.to_out[0], rank, alpha)
        module.to_out[0] = lora
        wrapped[f"{name}.to_out.0"] = lora
    return wrapped


def kohya_state_dict(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for path, lora in wrapped.items():
        key = "lora_unet_" + path.replace(".", "_")
        out[f"{key}.lora_down.weight"] = lora.down.weight.detach().to(torch.float16).contiguous()
        out[f"{key}.lora_up.weight"] = lora.up.weight.detach().to(torch.float16).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(lora.alpha), dtype=torch.float16)
    return out


def train(args) -> Path:
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = checkpoints.load_single_file(args.base, Path(args.cache))
    unet, encoder, vae = base.unet, base.text_encoders[0], base.vae
    unet.requires_grad_(False)
    wrapped = attach(unet, args.rank, args.alpha)
    if args.init_from:  # continue from an earlier LoRA file (e.g. after the base model trained further)
        from safetensors.torch import load_file

        saved = load_file(args.init_from)
        with torch.no_grad():
            for path, lora in wrapped.items():
                key = "lora_unet_" + path.replace(".", "_")
                lora.down.weight.copy_(saved[f"{key}.lora_down.weight"].float())
                lora.up.weight.copy_(saved[f"{key}.lora_up.weight"].float())
    params = [p for lora in wrapped.values() for p in (lora.down.weight, lora.up.weight)]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    tokenizer = base.tokenizers[0]
    rng = random.Random(args.seed)
    exclude = shapes.held_out_triples()
    deadline, step, running, log = time.time() + args.minutes * 60, 0, [], []
    while time.time() < deadline and step < args.steps:
        pixels, captions, _ = shapes.sample_batch(rng, args.batch, exclude, style="outlined")
        with torch.no_grad():
            latents = vae.encode(to_pixels(pixels)).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            context = encoder(ids.input_ids).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        prediction = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, noise_scheduler.get_velocity(latents, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        running.append(loss.item())
        if step % 25 == 0:
            log.append({"step": step, "loss": sum(running) / len(running)})
            print(json.dumps(log[-1]), flush=True)
            running = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(args.rank),
        "ss_network_alpha": str(args.alpha),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": Path(args.base).name,
        "ss_output_name": out.stem,
        "ss_training_comment": "Easel demo LoRA: shapes drawn as outlines",
        "easel.training": json.dumps({"steps": step, "batch": args.batch, "log": log}),
    }
    tmp = out.with_suffix(".tmp")
    save_file(kohya_state_dict(wrapped), tmp, metadata=metadata)
    tmp.replace(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init-from", type=Path, help="start from the weights of an earlier LoRA file")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "easel-training" / "cache"))
    print(train(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
