"""Benchmark: FLUX.1 and SD 3.5 in Easel beside diffusers' own pipelines on the same random weights, and what
loading a FLUX.1-dev-width transformer costs stored bf16 vs fp8, in one run.

1. Seconds per step (the difference between a long and a short run, so text encoding and decoding cancel)
   of Easel vs `FluxPipeline` / `StableDiffusion3Pipeline`, same modules, same sampler (Euler), same sigmas.
   Reduced shapes on the CPU (width 512, 2 double + 4 single blocks / 4 joint blocks, 1,024 image tokens).
2. Load time and peak RSS of a transformer with FLUX.1-dev's exact width (3072, 24 heads, T5 4096, CLIP 768)
   and `--double`/`--single` blocks, from a bf16 file and from an fp8 (e4m3fn) file, with and without fp8
   storage, each in a fresh process; and the stored bytes of the full 19 + 38-block model, built on the
   meta device.

    python -m bench.flow                  # CPU, 2 threads
    python -m bench.flow --device cuda    # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from backend import generation, random_flux, random_sd3, random_text_encoders
from backend.model_manager import ModelManager
from backend.random_flow_models import FlowModel, save_separate, tiny_vae
from backend.random_t5_tokenizer import write_t5_tokenizer
from backend.request import GenerationRequest
from backend.settings import Settings

CACHE = Path.home() / ".cache" / "easel-bench" / "flow"
SIZE, SHORT, LONG = 128, 2, 6  # 128 px with the 2x test VAE: 64x64 latents, 1,024 tokens


def _encoders(t5_width: int, projection: bool) -> dict:
    t5 = random_text_encoders.tiny_t5(1, d_model=t5_width)
    return {"clip_l": random_text_encoders.tiny_clip_l(2, projection=projection), "t5xxl": t5}


def build_models(root: Path) -> None:
    """flux-bench and sd3-bench in `root`'s folders (once)."""
    settings = Settings(data_dir=root)
    if (settings.model_dir("checkpoints") / "flux-bench.safetensors").is_file():
        return
    print("writing the bench models (once)...", flush=True)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    from backend.clip_tokenizer import ensure_vocabulary_files

    ensure_vocabulary_files(settings.cache_dir)
    write_t5_tokenizer(settings.cache_dir)
    flux_config = dict(random_flux.tiny_config(), num_layers=2, num_single_layers=4, attention_head_dim=128,
                       num_attention_heads=4, joint_attention_dim=256, axes_dims_rope=(16, 56, 56))
    flux = FlowModel("flux", random_flux.build_transformer(flux_config), tiny_vae("flux"), _encoders(256, False))
    save_separate(flux, settings.models_dir, "flux-bench", dtype=torch.float32, encoder_dtype=torch.float32)
    clip_g = random_text_encoders.tiny_clip_g(3)
    sd3_config = dict(random_sd3.tiny_config(pooled_projection_dim=32 + 48, joint_attention_dim=256),
                      num_layers=4, num_attention_heads=8, attention_head_dim=64, caption_projection_dim=512,
                      pos_embed_max_size=64)
    encoders = {**_encoders(256, True), "clip_g": clip_g}
    sd3 = FlowModel("sd3", random_sd3.build_transformer(sd3_config), tiny_vae("sd3"), encoders)
    # the SD 3 model's encoders go in as an all-in-one file, so the two models' parts do not collide
    from backend.random_flow_models import save_all_in_one

    save_all_in_one(sd3, settings.model_dir("checkpoints") / "sd3-bench.safetensors", dtype=torch.float32,
                    encoder_dtype=torch.float32, vae_prefix="first_stage_model.")


def _pipeline(model):

    e, t = model.text_encoders, model.tokenizers
    pipe = _pipeline_for(model, e, t)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_for(model, e, t):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    if model.family == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(scheduler=scheduler, vae=model.vae, text_encoder=e[0], tokenizer=t[0],
                            text_encoder_2=e[1], tokenizer_2=t[1], transformer=model.unet)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=model.vae,
                                    text_encoder=e[0], tokenizer=t[0], text_encoder_2=e[1], tokenizer_2=t[1],
                                    text_encoder_3=e[2], tokenizer_3=t[2], transformer=model.unet)


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def step_times(manager: ModelManager, name: str, rounds: int) -> tuple[float, float]:
    """(Easel, diffusers) seconds per step, medians over interleaved rounds."""
    import numpy as np

    cfg = 1.0 if name.startswith("flux") else 5.0

    def easel(steps):
        generation.generate(manager, GenerationRequest(prompt="a red cat", negative_prompt="", width=SIZE,
                                                       height=SIZE, steps=steps, seed=1, sampler="Euler",
                                                       cfg_scale=cfg, checkpoint=name, save_images=False))

    easel(SHORT)
    pipe = _pipeline(manager.active)

    def theirs(steps):
        pipe("a red cat", height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=3.5 if cfg == 1 else cfg,
             sigmas=list(np.linspace(1.0, 1 / steps, steps)), generator=torch.Generator().manual_seed(1))

    ours, base = [], []
    for _ in range(rounds):
        ours.append((_timed(lambda: easel(LONG)) - _timed(lambda: easel(SHORT))) / (LONG - SHORT))
        base.append((_timed(lambda: theirs(LONG)) - _timed(lambda: theirs(SHORT))) / (LONG - SHORT))
    return statistics.median(ours), statistics.median(base)


# -- loading a FLUX.1-dev-width transformer ----------------------------------------------------------------
def dev_width_file(double: int, single: int, dtype: torch.dtype) -> Path:
    """A BFL-layout transformer file at FLUX.1-dev's width with random weights (once per shape and dtype)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from backend import flux_layout

    path = CACHE / f"flux-dev-width-{double}-{single}-{str(dtype).split('.')[-1]}.safetensors"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"writing {path.name} (once)...", flush=True)
    config = dict(dev_config(), num_layers=double, num_single_layers=single)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    shapes = flux_layout.from_diffusers(model.state_dict(), model.config)
    generator = torch.Generator().manual_seed(0)
    tensors = {key: (torch.randn(tuple(value.shape), generator=generator) * 0.02).to(dtype)
               for key, value in shapes.items()}
    save_file(tensors, str(path))
    return path


def dev_config() -> dict:
    return dict(patch_size=1, in_channels=64, out_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))


# In a fresh process: load, then read every weight once (as the first step does: safetensors maps the file, so
# its pages come in on first use); memory from /proc: anonymous (owned) and file-backed (page cache, shared).
_CHILD = """
import json, sys, time, torch
from pathlib import Path
from backend import fp8_storage
from backend import flux_layout
from backend.families import flow_files

def memory():
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return {key: int(status[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile", "VmHWM")}

before = memory()
start = time.perf_counter()
keep = sys.argv[2] == "fp8"
_, _, model = flow_files.read_transformer(Path(sys.argv[1]), flux_layout, "FluxTransformer2DModel", torch.bfloat16,
                                         keep_fp8=keep)
if keep:
    fp8_storage.store_fp8(model, torch.bfloat16)
loaded = time.perf_counter() - start
for parameter in model.parameters():
    parameter.view(torch.uint8).sum() if parameter.dtype == torch.float8_e4m3fn else parameter.sum()
seconds = time.perf_counter() - start
after = memory()
print(json.dumps({"load_s": loaded, "read_s": seconds, "anon_mib": after["RssAnon"] - before["RssAnon"],
                  "file_mib": after["RssFile"] - before["RssFile"], "peak_mib": after["VmHWM"] - before["VmHWM"],
                  "stored_mib": fp8_storage.stored_bytes(model) / 2**20}))
"""


def load_figures(path: Path, storage: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), storage], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def full_size_bytes() -> tuple[float, float]:
    """GiB of the full FLUX.1-dev transformer's parameters in bf16 and with fp8 storage (meta device)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from backend import fp8_storage

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(dev_config()).to(torch.bfloat16)
    bf16 = fp8_storage.stored_bytes(model)
    fp8_storage.store_fp8(model, torch.bfloat16)
    return bf16 / 2**30, fp8_storage.stored_bytes(model) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--double", type=int, default=2, help="double blocks of the dev-width transformer")
    parser.add_argument("--single", type=int, default=4, help="single blocks of the dev-width transformer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = CACHE / "data"
    build_models(root)
    manager = ModelManager(Settings(data_dir=root, device=args.device, checkpoint_cache_size=2))
    print(f"per step, {SIZE}x{SIZE} (1,024 image tokens), Euler, {args.threads} threads, median of {args.rounds}:")
    for name, label in (("flux-bench", "FLUX.1 (dev-like, distilled guidance)"), ("sd3-bench", "SD 3.5 (CFG 5)")):
        ours, theirs = step_times(manager, name, args.rounds)
        print(f"  {label:40s} Easel {ours:.3f} s   diffusers {theirs:.3f} s   ratio {ours / theirs:.2f}x")
    print(f"\nloading a FLUX.1-dev-width transformer ({args.double} double + {args.single} single blocks), bf16 "
          "compute, fresh process each:")
    for source in (torch.bfloat16, torch.float8_e4m3fn):
        path = dev_width_file(args.double, args.single, source)
        for storage in ("bf16", "fp8"):
            figures = load_figures(path, storage)
            print(f"  {path.stat().st_size / 2**20:5.0f} MiB {str(source).split('.')[-1]:13s} file -> {storage}: "
                  f"load {figures['load_s']:.2f} s (+ first read: {figures['read_s']:.2f} s); weights "
                  f"{figures['stored_mib']:.0f} MiB; RSS +{figures['anon_mib']:.0f} MiB owned, "
                  f"+{figures['file_mib']:.0f} MiB file pages; peak +{figures['peak_mib']:.0f} MiB")
    bf16, fp8 = full_size_bytes()
    print(f"\nfull FLUX.1-dev transformer (19 + 38 blocks) weights: bf16 {bf16:.2f} GiB, fp8 storage {fp8:.2f} GiB")


if __name__ == "__main__":
    main()
