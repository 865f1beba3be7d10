"""Benchmark: LoRA on an SD 1.5-shaped model, Easel's design (merge into the weights over saved copies,
restore exactly) beside the alternative (unfused adapters: forward hooks adding up(down(x)) per layer).

Figures: reading a LoRA file, apply + remove time, UNet step time with 0, 1 and 3 LoRAs for both
designs, and RSS over 50 apply/remove cycles with different LoRAs. The LoRAs are kohya-format files
built here (rank 32, alpha 16, fp16, on every linear/1x1 layer of the transformer blocks and the
text encoder, as kohya's sd-scripts trains by default), with random values.

    python -m bench.lora                  # CPU, 256x256 latents-equivalent steps
    python -m bench.lora --size 512 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from backend import lora as lora_module
from backend.extra_networks import NetworkSession, parse_tags
from backend.lora_files import load_lora
from backend.model_manager import ModelManager
from backend.settings import Settings
from bench.engine_vs_diffusers import build_checkpoints

RANK, ALPHA = 32, 16.0


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def write_lora(model, path: Path, seed: int) -> Path:
    """A kohya LoRA over the transformer blocks' linear and 1x1 layers and the text encoder's."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = [("lora_unet_", n, m) for n, m in model.unet.named_modules()
               if ".attentions." in n and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
               and (isinstance(m, torch.nn.Linear) or m.kernel_size == (1, 1))]
    targets += [("lora_te_", "text_model." + n.removeprefix("text_model."), m)
                for n, m in model.text_encoders[0].named_modules() if isinstance(m, torch.nn.Linear)]
    for prefix, name, module in targets:
        out_features, in_features = module.weight.shape[:2]
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = (torch.randn(RANK, in_features, generator=generator) * 0.01).half()
        tensors[f"{key}.lora_up.weight"] = (torch.randn(out_features, RANK, generator=generator) * 0.01).half()
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA).half()
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    return path


class Unfused:
    """The alternative design: each layer computes W x + s * up(down(x)) at every step."""

    def __init__(self, matched: list[tuple[lora_module.Matched, float]]):
        self.handles = []
        for found, strength in matched:
            for module, update in found.unet:
                down = update.tensors["lora_down.weight"].float()
                up = update.tensors["lora_up.weight"].float()
                scale = update.scale * strength
                self.handles.append(module.register_forward_hook(self._hook(down, up, scale, module)))

    @staticmethod
    def _hook(down, up, scale, module):
        conv = isinstance(module, torch.nn.Conv2d)
        if conv:
            down, up = down.reshape(*down.shape[:2], 1, 1), up.reshape(*up.shape[:2], 1, 1)

        def hook(_, args, output):
            x = args[0]
            extra = F.conv2d(F.conv2d(x, down), up) if conv else F.linear(F.linear(x, down), up)
            return output + scale * extra
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def unet_step_seconds(model, size: int, repeats: int) -> float:
    """Median seconds of a UNet forward pass (after one warm-up pass)."""
    side = size // 8
    latents = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)
    context = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1)).to(model.device, model.dtype)
    t = torch.tensor([500, 500], device=model.device)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first is warm-up
            start = time.perf_counter()
            model.unet(latents, t, encoder_hidden_states=context)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side the UNet steps are timed at")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "easel-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = build_checkpoints(args.cache)
    scratch = Path(tempfile.mkdtemp(prefix="easel-lora-bench-"))
    settings = Settings(data_dir=scratch, ckpt_dir=folder, lora_dir=scratch / "Lora", device=args.device,
                        threads=args.threads)
    (scratch / "Lora").mkdir()
    manager = ModelManager(settings)
    model = manager.activate("sd15-random-a")
    print(f"model: SD 1.5 shapes, {model.dtype}, {model.device}, {args.threads} threads", flush=True)
    paths = [write_lora(model, scratch / "Lora" / f"lora{i}.safetensors", seed=i) for i in range(5)]
    print(f"LoRA files: {len(paths)} x {paths[0].stat().st_size / 2**20:.0f} MiB "
          f"(rank {RANK}, {len(load_lora(manager.loras.find('lora0')).layers)} layers)", flush=True)
    manager.loras.refresh()
    networks = NetworkSession(model, manager.loras, manager.embeddings, [])

    start = time.perf_counter()
    networks.activate(parse_tags("<lora:lora0:1>")[1])
    first = time.perf_counter() - start
    networks.close()
    cycles = []
    for strength in (0.5, 0.8, 1.0, 0.7, 0.9):
        start = time.perf_counter()
        networks.activate(parse_tags(f"<lora:lora0:{strength}>")[1])
        networks.close()
        cycles.append(time.perf_counter() - start)
    print(f"first use (read + parse + apply + remove): {first:.2f} s; then apply + remove: "
          f"{statistics.median(cycles):.3f} s (median of {len(cycles)}, file cached; files read: {manager.loras.reads})",
          flush=True)

    # Step times, interleaved: each round times every configuration once, so drift in this shared
    # machine's speed hits all of them alike; medians over the rounds.
    configs = {"none": "", "1 LoRA": "<lora:lora0:0.8>", "3 LoRAs": "<lora:lora0:0.8> <lora:lora1:0.8> <lora:lora2:0.8>"}
    actives = {name: _actives(networks, tags) for name, tags in configs.items() if tags}
    times: dict[str, list[float]] = {}
    for _round in range(args.repeats + 1):  # round 0 is warm-up
        for name, tags in configs.items():
            networks.activate(parse_tags(tags)[1])
            step = unet_step_seconds(model, args.size, 2)
            networks.close()
            times.setdefault(f"{name}, merged", []).append(step)
            if name in actives:
                unfused = Unfused([(a.matched, a.activation.unet) for a in actives[name]])
                times.setdefault(f"{name}, unfused", []).append(unet_step_seconds(model, args.size, 2))
                unfused.remove()
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    base = medians.pop("none, merged")
    print(f"UNet step (batch 2 = CFG pair, {args.size}x{args.size}), median of {args.repeats} interleaved rounds:")
    print(f"  no LoRA: {base:.3f} s")
    for name, seconds in medians.items():
        print(f"  {name}: {seconds:.3f} s ({seconds / base:.3f}x)", flush=True)

    for index in range(10):  # warm up: every file read and cached, allocator settled
        networks.activate(parse_tags(f"<lora:lora{index % 5}:0.8>")[1])
        networks.close()
    gc.collect()
    before = rss_mib()
    for index in range(args.cycles):
        networks.activate(parse_tags(f"<lora:lora{index % 5}:0.8> <lora:lora{(index + 2) % 5}:0.5>")[1])
        networks.close()
    gc.collect()
    print(f"RSS over {args.cycles} apply/remove cycles of 2 LoRAs out of 5: {before:.0f} -> {rss_mib():.0f} MiB "
          f"(LoRA cache bound {settings.lora_cache_mb} MiB)", flush=True)


def _actives(networks: NetworkSession, tags: str):
    """Resolve tags to parsed, matched LoRAs without applying them (for the unfused variant)."""
    networks.activate(parse_tags(tags)[1])
    actives = list(networks.active)
    networks.close()
    return actives


if __name__ == "__main__":
    main()
