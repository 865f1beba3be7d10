"""Train Easel's embedded default model from scratch on the synthetic shapes dataset.

Real SD 1.x architecture classes (AutoencoderKL, UNet2DConditionModel, CLIPTextModel with CLIP's BPE
tokenizer), small. Two stages: the VAE, then the UNet and text encoder together on its latents, with
v-prediction and a zero-terminal-SNR schedule (with SD's schedule the noise at t=999 still carries
the latent mean on small latents, and the model learns background colour from the noise, not the text).

Resumable: state is saved to --work-dir every --save-every steps; rerunning continues. On a CPU it
runs in the background at one torch thread by default. `--export` writes the single-file checkpoint.
The shipped model came from one 21-minute run on one GPU (an H100), with batches drawn by 14 workers:

    python -m training.train_default_model --device cuda --bf16 --workers 14 --threads 2 \
        --batch 256 --vae-batch 64 --vae-steps 1000000 --vae-minutes 5 --minutes 21 --lr 1e-3 \
        --cooldown-minutes 4 --ema-decay 0.9995 --log-every 200 --probe-every 2000 --save-every 2000 \
        --export-after models/Stable-diffusion/easel-shapes.safetensors
    python -m training.train_default_model --minutes 90            # on a CPU (resumes if state exists)
    python -m training.train_default_model --export models/Stable-diffusion/easel-shapes.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend import clip_tokenizer, model_detection, random_models
from training import metrics, shapes

NATIVE_SIZE = shapes.SIZE


def model_configs(family_config: dict | None = None) -> dict:
    """The default model's configs: the SD 1.x ones, shrunk."""
    config = family_config or model_detection.family_config("sd1")
    config["unet"].update(
        block_out_channels=[64, 128, 128],
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=128,
        sample_size=NATIVE_SIZE // 4,
    )
    config["vae"].update(
        block_out_channels=[32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=1,
        sample_size=NATIVE_SIZE,
    )
    config["text_encoders"][0].update(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=2, projection_dim=128)
    config["scheduler"].update(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                               timestep_spacing="trailing")
    return config


def build_models(config: dict) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from backend.checkpoints import text_config, text_encoder_class

    return {
        "config": config,
        "unet": UNet2DConditionModel.from_config(config["unet"]),
        "vae": AutoencoderKL.from_config(config["vae"]),
        "text_encoders": [text_encoder_class(c)(text_config(c)) for c in config["text_encoders"]],
    }


def to_pixels(batch) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1


def draw_batch(rng: random.Random, size: int, exclude, object_weights: bool = False):
    """One training batch: pixels in [-1, 1], captions, and (for the VAE) per-pixel loss weights that
    count the object's pixels nine times: it covers a few percent of the image, and unweighted the
    VAE settles for clean backgrounds and smudged shapes."""
    pixels, captions, _ = shapes.sample_batch(rng, size, exclude)
    weights = None
    if object_weights:
        weights = 1 + 8 * torch.from_numpy(np.stack([metrics.object_mask(p)[0] for p in pixels]))[:, None].float()
    return to_pixels(pixels), captions, weights


class DrawnBatches(torch.utils.data.IterableDataset):
    """Batches drawn in DataLoader worker processes (--workers), each worker seeded from the run's seed
    and its index: on a GPU machine drawing on one core cannot keep up with the GPU."""

    def __init__(self, seed: int, size: int, exclude, object_weights: bool):
        self.seed, self.size, self.exclude, self.object_weights = seed, size, exclude, object_weights

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1009 + (worker.id if worker else 0))
        while True:
            pixels, captions, weights = draw_batch(rng, self.size, self.exclude, self.object_weights)
            yield pixels, captions, weights if weights is not None else torch.empty(0)


class Trainer:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.exclude = shapes.held_out_triples()
        self.config = model_configs()
        self.models = build_models(self.config)
        self.device = torch.device(args.device)
        for module in (self.models["unet"], self.models["vae"], self.models["text_encoders"][0]):
            module.to(self.device)
        self.tokenizer = clip_tokenizer.load_clip_tokenizer(str(self.work / "cache"))
        self.state = {"vae_step": 0, "unet_step": 0, "seconds": 0.0}
        self.rng = random.Random(args.seed)
        self.vae_opt = torch.optim.AdamW(self.models["vae"].parameters(), lr=args.vae_lr)
        params = list(self.models["unet"].parameters()) + list(self.models["text_encoders"][0].parameters())
        self.unet_opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        # Exponential moving averages of the UNet and text encoder: what gets exported.
        self.ema = {name: {k: v.detach().clone() for k, v in self._trained(name).state_dict().items()}
                    for name in ("unet", "text_encoder")}
        self._batches = {}
        self._resume()
        if args.init_from and not self.checkpoint_path.is_file():
            self._init_from(Path(args.init_from))

    # -- persistence -------------------------------------------------------------------------------
    def _trained(self, name: str) -> torch.nn.Module:
        return self.models["unet"] if name == "unet" else self.models["text_encoders"][0]

    def restart_ema(self) -> None:
        """Start the averages from the current weights (after loading weights saved without them)."""
        self.state["ema_start"] = self.state["unet_step"]
        for name, averages in self.ema.items():
            averages.update({k: v.detach().clone() for k, v in self._trained(name).state_dict().items()})

    @torch.no_grad()
    def update_ema(self) -> None:
        # Warm up the decay as in diffusers' EMAModel, so early averages are not dominated by the init.
        step = self.state["unet_step"] - self.state.get("ema_start", 0)
        decay = min(self.args.ema_decay, (1 + step) / (10 + step))
        averages, values = [], []
        for name, saved in self.ema.items():
            for key, value in self._trained(name).state_dict().items():
                if value.dtype.is_floating_point:
                    averages.append(saved[key])
                    values.append(value)
                else:
                    saved[key].copy_(value)
        torch._foreach_lerp_(averages, values, 1 - decay)

    @property
    def checkpoint_path(self) -> Path:
        return self.work / "state.pt"

    def _resume(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        saved = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        for name in ("unet", "vae"):
            self.models[name].load_state_dict(saved[name])
        self.models["text_encoders"][0].load_state_dict(saved["text_encoder"])
        self.vae_opt.load_state_dict(saved["vae_opt"])
        self.unet_opt.load_state_dict(saved["unet_opt"])
        self.state = saved["state"]
        if "ema" in saved:
            self.ema = saved["ema"]
        else:  # a state saved before averaging was added: start the averages here
            self.restart_ema()
        self.rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"].cpu())
        print(f"resumed at VAE step {self.state['vae_step']}, UNet step {self.state['unet_step']}", flush=True)

    def _init_from(self, path: Path) -> None:
        """Continue from an exported checkpoint (e.g. the shipped model) when no training state exists:
        weights and step counts come back, the optimiser starts afresh."""
        from backend import checkpoints

        loaded = checkpoints.load_single_file(path, self.work / "cache")
        self.models["unet"].load_state_dict(loaded.unet.state_dict())
        self.models["vae"].load_state_dict(loaded.vae.state_dict())
        self.models["text_encoders"][0].load_state_dict(loaded.text_encoders[0].state_dict())
        saved = json.loads(checkpoints.read_metadata(path).get("easel.training", "{}"))
        self.state = {"vae_step": saved.get("vae_step", 0), "vae_done": True,
                      "unet_step": saved.get("unet_step", 0), "seconds": saved.get("seconds", 0.0)}
        self.restart_ema()
        print(f"initialised from {path} at UNet step {self.state['unet_step']}", flush=True)

    def save(self) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({
            "unet": self.models["unet"].state_dict(), "vae": self.models["vae"].state_dict(),
            "text_encoder": self.models["text_encoders"][0].state_dict(),
            "vae_opt": self.vae_opt.state_dict(), "unet_opt": self.unet_opt.state_dict(),
            "ema": self.ema, "state": self.state, "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(),
        }, tmp)
        tmp.replace(self.checkpoint_path)

    def batches(self, stage: str):
        """The stage's batch stream: drawn in this process from the resumable rng, or with --workers
        in worker processes (faster, but a resumed run then draws a different sequence)."""
        if stage not in self._batches:
            size = self.args.vae_batch if stage == "vae" else self.args.batch
            if self.args.workers:
                loader = torch.utils.data.DataLoader(
                    DrawnBatches(self.args.seed + self.state["unet_step"] + self.state["vae_step"], size,
                                 self.exclude, stage == "vae"),
                    batch_size=None, num_workers=self.args.workers, prefetch_factor=4, persistent_workers=True,
                    pin_memory=self.device.type == "cuda")
                self._batches[stage] = iter(loader)
            else:
                def local():
                    while True:
                        yield draw_batch(self.rng, size, self.exclude, stage == "vae")
                self._batches[stage] = local()
        return next(self._batches[stage])

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def log(self, record: dict) -> None:
        with open(self.work / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # -- stage 1: VAE ----------------------------------------------------------------------------
    def vae_step(self) -> float:
        vae = self.models["vae"].train()
        x, _, weight = self.batches("vae")
        x, weight = x.to(self.device, non_blocking=True), weight.to(self.device, non_blocking=True)
        with self.autocast():
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        error = (recon - x).abs() + (recon - x) ** 2
        loss = (error * weight).mean() / weight.mean() + 1e-6 * posterior.kl().float().mean()
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.vae_opt.param_groups:  # linear decay to a tenth
            group["lr"] = self.args.vae_lr * (1 - 0.9 * self.vae_progress())
        self.vae_opt.step()
        return loss.item()

    @torch.no_grad()
    def normalise_latents(self) -> float:
        """Fold a scale into the VAE so that latents * 0.18215 (SD's factor) have unit spread."""
        vae = self.models["vae"].eval()
        pixels, _, _ = shapes.sample_batch(random.Random(99), 256, self.exclude)
        mean = vae.encode(to_pixels(pixels).to(self.device)).latent_dist.mean
        scale = 1.0 / (mean.std().item() * vae.config.scaling_factor)
        channels = vae.config.latent_channels
        vae.quant_conv.weight[:channels] *= scale
        vae.quant_conv.bias[:channels] *= scale
        vae.quant_conv.bias[channels:] += 2 * math.log(scale)  # log-variance of the scaled latent
        vae.post_quant_conv.weight /= scale
        return scale

    # -- stage 2: UNet + text encoder ------------------------------------------------------------------
    def tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids.to(self.device)

    def unet_step(self, noise_scheduler) -> float:
        unet, encoder, vae = self.models["unet"].train(), self.models["text_encoders"][0].train(), self.models["vae"]
        x, captions, _ = self.batches("unet")
        with torch.no_grad(), self.autocast():
            latents = vae.eval().encode(x.to(self.device, non_blocking=True)).latent_dist.sample().float()
            latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = self.sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise_scheduler.get_velocity(latents, noise, t)
        with self.autocast():
            context = encoder(self.tokens(captions)).last_hidden_state
            prediction = unet(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction.float(), target)
        self.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(encoder.parameters()), 1.0)
        step = self.state["unet_step"]
        for group in self.unet_opt.param_groups:  # warmup, constant, then the cooldown
            group["lr"] = self.args.lr * min(1.0, (step + 1) / 500) * self.cooldown()
        self.unet_opt.step()
        return loss.item()

    def sample_timesteps(self, count: int, total: int) -> torch.Tensor:
        """Uniform timesteps, with a share (--high-noise-share) drawn from the noisier half instead:
        that is where layout, colour and shape are decided from the text; the quieter half only
        refines edges, which the model learns quickly."""
        t = torch.randint(0, total, (count,))
        noisy = torch.rand(count) < self.args.high_noise_share
        t[noisy] = torch.randint(total // 2, total, (int(noisy.sum()),))
        return t.to(self.device)

    @torch.no_grad()
    def position_probe(self, noise_scheduler) -> float:
        """Share of the nine positions the model's clean-image guess from pure noise (t=T) puts the
        object in, for two fixed captions each: a cheap signal of whether the text steers layout."""
        unet, encoder, vae = self.models["unet"].eval(), self.models["text_encoders"][0].eval(), self.models["vae"].eval()
        scenes = [shapes.Scene(shape, color, background, "large", position)
                  for shape, color, background in (("circle", "red", "blue"), ("square", "yellow", "purple"))
                  for position in shapes.POSITIONS]
        context = encoder(self.tokens([scene.caption() for scene in scenes])).last_hidden_state
        last = noise_scheduler.config.num_train_timesteps - 1
        noise = torch.randn(len(scenes), *self._latent_shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        v = unet(noise, torch.full((len(scenes),), last, device=self.device), encoder_hidden_states=context).sample
        alpha = noise_scheduler.alphas_cumprod[last].to(self.device)
        x0 = alpha.sqrt() * noise - (1 - alpha).sqrt() * v
        images = ((vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) * 127.5).round()
        images = images.permute(0, 2, 3, 1).byte().cpu().numpy()
        hits = 0
        for image, scene in zip(images, scenes):
            mask, _ = metrics.object_mask(image)
            ys, xs = np.nonzero(mask)
            if len(ys):
                hits += (min(2, int(ys.mean() * 3 / image.shape[0])), min(2, int(xs.mean() * 3 / image.shape[1]))) == scene.cell
        unet.train(), encoder.train()
        return hits / len(scenes)

    @property
    def _latent_shape(self) -> tuple[int, int, int]:
        side = self.config["unet"]["sample_size"]
        return self.config["unet"]["in_channels"], side, side

    def vae_progress(self) -> float:
        """How far the VAE stage is, 0..1: by steps, or by this run's time with --vae-minutes."""
        progress = self.state["vae_step"] / self.args.vae_steps
        if self.args.vae_minutes:
            progress = max(progress, (time.time() - self.started) / (self.args.vae_minutes * 60))
        return min(1.0, progress)

    def cooldown(self) -> float:
        return cooldown_factor(self.deadline, self.args.cooldown_minutes)

    def train(self) -> None:
        from diffusers import DDPMScheduler

        args = self.args
        started = self.started = time.time()
        deadline = self.deadline = started + args.minutes * 60
        noise_scheduler = DDPMScheduler.from_config(self.config["scheduler"])
        running = []
        self.log({"stage": "run", "device": device_name(self.device), "threads": torch.get_num_threads(),
                  "batch": args.batch, "workers": args.workers, "bf16": args.bf16})
        while time.time() < deadline and self.state["unet_step"] < args.unet_steps:
            tick = time.time()
            # Stage 1 until the VAE is done and its latents normalised (states saved before "vae_done"
            # existed record only the scale).
            if not self.state.get("vae_done", "latent_scale" in self.state):
                loss = self.vae_step()
                self.state["vae_step"] += 1
                stage, step = "vae", self.state["vae_step"]
                if self.vae_progress() >= 1:
                    self.state.update(latent_scale=self.normalise_latents(), vae_done=True)
                    self.save()
            else:
                loss = self.unet_step(noise_scheduler)
                self.state["unet_step"] += 1
                self.update_ema()
                stage, step = "unet", self.state["unet_step"]
            self.state["seconds"] += time.time() - tick
            running.append(loss)
            if step % args.log_every == 0:
                record = {"stage": stage, "step": step, "loss": sum(running) / len(running),
                          "seconds": round(self.state["seconds"], 1)}
                self.log(record)
                print(json.dumps(record), flush=True)
                running = []
            if stage == "unet" and step % args.probe_every == 0:
                record = {"stage": "probe", "step": step, "position_from_noise": self.position_probe(noise_scheduler)}
                self.log(record)
                print(json.dumps(record), flush=True)
            if step % args.save_every == 0:
                self.save()
        self.save()
        print(f"stopped after {time.time() - started:.0f} s at {self.state}", flush=True)


def cooldown_factor(deadline: float, minutes: float) -> float:
    """Learning-rate factor: 1, falling linearly to 0.05 over the last `minutes` before `deadline` (0: off)."""
    if not minutes:
        return 1.0
    return max(0.05, min(1.0, (deadline - time.time()) / 60 / minutes))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def export(args) -> Path:
    """Write the trained model as an original-layout fp16 .safetensors with its metadata."""
    from safetensors.torch import save_file

    trainer = Trainer(args)
    for name, averages in trainer.ema.items():  # export the averaged weights
        trainer._trained(name).load_state_dict(averages)
    sd = random_models.original_state_dict({**trainer.models, "unet": trainer.models["unet"].cpu(),
                                            "vae": trainer.models["vae"].cpu(),
                                            "text_encoders": [trainer.models["text_encoders"][0].cpu()]})
    sd = {k: v.to(torch.float16) for k, v in sd.items()}
    sd["v_pred"] = torch.tensor([])  # markers Forge and Easel read: v-prediction, zero terminal SNR
    sd["ztsnr"] = torch.tensor([])
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": "Easel shapes",
        "modelspec.description": "A small SD 1.x-architecture model trained from scratch by Easel on "
                                 "synthetic coloured shapes, for trying Easel without downloading weights.",
        "modelspec.resolution": f"{NATIVE_SIZE}x{NATIVE_SIZE}",
        "modelspec.prediction_type": "v",
        "modelspec.license": "same as Easel",
        "easel.training": json.dumps({"hardware": device_name(trainer.device), **trainer.state}),
    }
    out = Path(args.export)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(sd, tmp, metadata=metadata)
    tmp.replace(out)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "easel-training" / "default-model"))
    parser.add_argument("--minutes", type=float, default=60, help="wall-clock budget of this run")
    parser.add_argument("--vae-steps", type=int, default=1600)
    parser.add_argument("--unet-steps", type=int, default=100_000)
    parser.add_argument("--vae-minutes", type=float, default=0,
                        help="end the VAE stage after this many minutes of this run (or --vae-steps)")
    parser.add_argument("--vae-batch", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--cooldown-minutes", type=float, default=0,
                        help="lower the learning rate linearly over this run's last minutes")
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--high-noise-share", type=float, default=0.5,
                        help="share of timesteps drawn from the noisier half of the schedule")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--probe-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (much faster)")
    parser.add_argument("--workers", type=int, default=0, help="draw batches in this many processes")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (on a GPU)")
    parser.add_argument("--export-after", help="after training, also export to this .safetensors path")
    parser.add_argument("--init-from", help="start from an exported .safetensors when --work-dir has no state")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--export", help="write the model to this .safetensors path instead of training")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.export:
        print(export(args))
    else:
        Trainer(args).train()
        if args.export_after:
            args.export = args.export_after
            print(export(args))


if __name__ == "__main__":
    main()
