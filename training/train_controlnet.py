"""Train a canny (edge) ControlNet for the default model: given the edges of a shape, the model draws it
there, in the colours the prompt names, wherever the prompt puts it or does not say.

The ControlNet starts as a copy of the default model's encoder (diffusers' `ControlNetModel.from_unet`,
zero-initialised outputs) with a hint encoder that downsamples 4x, the default model's VAE factor. The
base model stays frozen. Control images are made exactly as Easel makes them at generation time
(`control_preprocessors.prepare_control_image` with the canny module, at a processor resolution drawn
from what users pick), so what it learned is what it sees. Captions leave the position out most of the
time and the shape out some of the time: the edges carry both.

Resumable: state goes to --work-dir every --save-every steps; rerunning continues. `--export` writes
the fp16 single file in lllyasviel's layout, with the training log in its metadata.

The shipped file came from two runs on one CPU core, 3,331 steps in 85 minutes (the first was stopped after
40 minutes and its state at step 1,500 resumed with a lower rate and a cooldown; log: training/logs/):

    python -m training.train_controlnet --batch 24 --lr 5e-4
    python -m training.train_controlnet --minutes 45 --batch 24 --lr 2e-4 --cooldown-minutes 30
    python -m training.train_controlnet --export models/ControlNet/easel-shapes-canny.safetensors
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend import checkpoints, control_preprocessors, random_controlnets
from training import metrics, shapes
from training.train_default_model import cooldown_factor, device_name, to_pixels

DEFAULT_BASE = Path(__file__).resolve().parent.parent / "models" / "Stable-diffusion" / "easel-shapes.safetensors"
# Processor resolutions drawn for the training maps: pixel perfect (the image's own 64) and the
# sd-webui-controlnet default of 512 most often.
PROCESSOR_RESOLUTIONS = (64, 64, 128, 256, 512, 512)


def control_caption(scene: shapes.Scene, rng: random.Random) -> str:
    """A caption that names the colours and usually the size; the position only sometimes and the shape
    not always (the edges show both); empty now and then, for the unconditional pass of CFG."""
    roll = rng.random()
    if roll < 0.15:
        return ""
    shape = scene.shape if rng.random() < 0.7 else "shape"
    size = f"{scene.size} " if rng.random() < 0.8 else ""
    text = f"a {size}{scene.color} {shape} on a {scene.background} background"
    if rng.random() < 0.2:
        text += f", {scene.position}"
    return text


def control_map(image, rng: random.Random) -> torch.Tensor:
    resolution = rng.choice(PROCESSOR_RESOLUTIONS)
    return control_preprocessors.prepare_control_image(image, "canny", (shapes.SIZE, shapes.SIZE),
                                                       processor_res=resolution)


def draw_batch(rng: random.Random, size: int, exclude) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    scenes = [shapes.random_scene(rng, exclude) for _ in range(size)]
    images = [shapes.render(scene, rng) for scene in scenes]
    pixels = np.stack([np.asarray(image) for image in images])
    hints = torch.stack([control_map(image, rng) for image in images])
    return to_pixels(pixels), [control_caption(scene, rng) for scene in scenes], hints


class Trainer:
    def __init__(self, args):
        from diffusers import ControlNetModel, DDPMScheduler

        self.args = args
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.exclude = shapes.held_out_triples()
        base = checkpoints.load_single_file(Path(args.base), self.work / "cache")
        self.unet, self.encoder, self.vae = base.unet.eval(), base.text_encoders[0].eval(), base.vae.eval()
        for module in (self.unet, self.encoder, self.vae):
            module.requires_grad_(False)
        self.tokenizer = base.tokenizers[0]
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=(16, 32, 64))
        self.optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=args.lr, weight_decay=0.0)
        self.state = {"step": 0, "seconds": 0.0}
        self.rng = random.Random(args.seed)
        self._resume()

    @property
    def checkpoint_path(self) -> Path:
        return self.work / "state.pt"

    def _resume(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        saved = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        self.controlnet.load_state_dict(saved["controlnet"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = saved["state"]
        self.rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        print(f"resumed at step {self.state['step']}", flush=True)

    def save(self) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({"controlnet": self.controlnet.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "state": self.state, "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(self.checkpoint_path)

    def log(self, record: dict) -> None:
        print(json.dumps(record), flush=True)
        with open(self.work / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def context(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return self.encoder(ids.input_ids).last_hidden_state

    def predict(self, noisy, t, context, hints) -> torch.Tensor:
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=context, controlnet_cond=hints,
                                    return_dict=False)
        return self.unet(noisy, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    def step(self) -> float:
        x, captions, hints = draw_batch(self.rng, self.args.batch, self.exclude)
        with torch.no_grad():
            latents = self.vae.encode(x).latent_dist.sample() * self.vae.config.scaling_factor
            context = self.context(captions)
        noise = torch.randn_like(latents)
        total = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, total, (len(latents),))
        noisy_half = torch.rand(len(latents)) < self.args.high_noise_share  # layout is decided there
        t[noisy_half] = torch.randint(total // 2, total, (int(noisy_half.sum()),))
        self.controlnet.train()
        prediction = self.predict(self.noise_scheduler.add_noise(latents, noise, t), t, context, hints)
        loss = F.mse_loss(prediction, self.noise_scheduler.get_velocity(latents, noise, t))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.controlnet.parameters(), 1.0)
        for group in self.optimizer.param_groups:  # warmup, constant, then the cooldown
            group["lr"] = self.args.lr * min(1.0, (self.state["step"] + 1) / 100) * self.cooldown()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def position_probe(self) -> float:
        """Share of 18 control images (nine cells, captions without a position) where the clean-image
        guess from pure noise puts the object in the edges' cell: a cheap signal that control works."""
        self.controlnet.eval()
        rng = random.Random(3)
        scenes = [shapes.Scene(shape, color, background, "large", position)
                  for shape, color, background in (("circle", "red", "blue"), ("star", "yellow", "purple"))
                  for position in shapes.POSITIONS]
        hints = torch.stack([control_map(shapes.render(scene), rng) for scene in scenes])
        context = self.context([f"a large {s.color} {s.shape} on a {s.background} background" for s in scenes])
        last = self.noise_scheduler.config.num_train_timesteps - 1
        noise = torch.randn(len(scenes), self.unet.config.in_channels, shapes.SIZE // 4, shapes.SIZE // 4,
                            generator=torch.Generator().manual_seed(0))
        t = torch.full((len(scenes),), last)
        v = self.predict(noise, t, context, hints)
        alpha = self.noise_scheduler.alphas_cumprod[last]
        x0 = alpha.sqrt() * noise - (1 - alpha).sqrt() * v
        images = ((self.vae.decode(x0 / self.vae.config.scaling_factor).sample.clamp(-1, 1) + 1) * 127.5).round()
        hits = 0
        for image, scene in zip(images.permute(0, 2, 3, 1).byte().numpy(), scenes):
            ys, xs = np.nonzero(metrics.object_mask(image)[0])
            if len(ys):
                hits += (min(2, int(ys.mean() * 3 / image.shape[0])), min(2, int(xs.mean() * 3 / image.shape[1]))) == scene.cell
        return hits / len(scenes)

    def cooldown(self) -> float:
        return cooldown_factor(self.deadline, self.args.cooldown_minutes)

    def train(self) -> None:
        args = self.args
        started = time.time()
        self.deadline = started + args.minutes * 60
        self.log({"stage": "run", "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
                  "batch": args.batch, "lr": args.lr, "minutes": args.minutes, "cooldown": args.cooldown_minutes})
        running = []
        while time.time() < self.deadline and self.state["step"] < args.steps:
            tick = time.time()
            running.append(self.step())
            self.state["step"] += 1
            self.state["seconds"] += time.time() - tick
            step = self.state["step"]
            if step % args.log_every == 0:
                self.log({"stage": "controlnet", "step": step, "loss": sum(running) / len(running),
                          "seconds": round(self.state["seconds"], 1)})
                running = []
            if step % args.probe_every == 0:
                self.log({"stage": "probe", "step": step, "position_from_noise": self.position_probe()})
            if step % args.save_every == 0:
                self.save()
        self.save()
        print(f"stopped after {time.time() - started:.0f} s at {self.state}", flush=True)


def export(args) -> Path:
    """Write the ControlNet as an fp16 `.safetensors` in lllyasviel's layout, with its training log."""
    from safetensors.torch import save_file

    trainer = Trainer(args)
    state = random_controlnets.lllyasviel_state_dict(trainer.controlnet.float())
    state = {k: v.to(torch.float16) for k, v in state.items()}
    log_path = trainer.work / "log.jsonl"
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/controlnet",
        "modelspec.title": "Easel shapes canny",
        "modelspec.description": "A canny-edge ControlNet for Easel's default shapes model, trained by Easel.",
        "modelspec.license": "same as Easel",
        "easel.training": json.dumps({**trainer.state, "batch": args.batch, "lr": args.lr,
                                      "base": Path(args.base).name}),
        "easel.training_log": json.dumps([r for r in records if r.get("stage") != "run"]),
    }
    out = Path(args.export)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(state, tmp, metadata=metadata)
    tmp.replace(out)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(DEFAULT_BASE), help="the model the ControlNet is made for")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "easel-training" / "controlnet-canny"))
    parser.add_argument("--minutes", type=float, default=60, help="wall-clock budget of this run")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--cooldown-minutes", type=float, default=0,
                        help="lower the learning rate linearly over this run's last minutes")
    parser.add_argument("--high-noise-share", type=float, default=0.5,
                        help="share of timesteps drawn from the noisier half of the schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--probe-every", type=int, default=100)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--export", help="write the ControlNet to this .safetensors path instead of training")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.export:
        print(export(args))
    else:
        Trainer(args).train()


if __name__ == "__main__":
    main()
