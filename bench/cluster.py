"""Benchmark: `--workers` on one machine. The same mixed load (jobs alternating between two checkpoints)
run by a single process, by 1 replica and by 2 replicas on Ray Serve, side by side in one run:
throughput in images per minute, checkpoint loads, and the routing overhead per request (a one-step
job through the cluster minus the same job in-process).

    python -m bench.cluster                 # 16 jobs of 128x128, 12 steps, one torch thread everywhere
    python -m bench.cluster --jobs 8 --size 64

On the 2-core CI machines the goal is 2 replicas >= 1.7x the single process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from backend.clip_tokenizer import ensure_vocabulary_files
from backend.request import GenerationRequest
from backend.runtime import Runtime
from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DATA = Path.home() / ".cache" / "easel-bench" / "cluster"
CHECKPOINTS = ("easel-shapes.safetensors", "easel-shapes-b.safetensors")


def prepare() -> Path:
    """A data folder with the default model under two names (two model ids, the same cost per image)."""
    folder = DATA / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINTS:
        if not (folder / name).exists():
            shutil.copy(ROOT / "models" / "Stable-diffusion" / "easel-shapes.safetensors", folder / name)
    ensure_vocabulary_files(DATA / "cache")
    return DATA


def requests(jobs: int, size: int, steps: int) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=f"a large red star on a blue background, number {i}", seed=1000 + i,
                              checkpoint=CHECKPOINTS[i % 2], width=size, height=size, steps=steps,
                              sampler="DPM++ 2M", save_images=False) for i in range(jobs)]


def run_load(runtime: Runtime, load: list[GenerationRequest]) -> float:
    """All jobs submitted at once through the runtime's queue; seconds until the last is done."""
    def submit(request: GenerationRequest):
        return runtime.device.submit(lambda control: runtime.generate(request, control), "bench",
                                     checkpoint=request.checkpoint)

    started = time.perf_counter()
    jobs = [submit(request) for request in load]
    for job in jobs:
        job.wait()
    return time.perf_counter() - started


TINY = GenerationRequest(prompt="a dot", seed=1, checkpoint=CHECKPOINTS[0], width=64, height=64, steps=1,
                         sampler="Euler", save_images=False)


def overhead(runtime: Runtime, rounds: int) -> float:
    """Median seconds of a one-step 64x64 job through `runtime`, once every worker has run one (its torch
    warmed up, as the single process is)."""
    run_load(runtime, [TINY] * runtime.device.slots)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        runtime.generate(TINY)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def loads(runtime: Runtime) -> str:
    return ", ".join(f"{row['id']}: {row['loads']}" for row in runtime.workers())


def measure(label: str, settings: Settings, load, rounds: int, results: dict) -> None:
    started = time.perf_counter()
    runtime = Runtime.create(settings)
    ready = time.perf_counter() - started
    try:
        single_call = overhead(runtime, rounds)
        seconds = run_load(runtime, load)
        results[label] = (seconds, single_call)
        print(f"{label:<12} {len(load) / seconds * 60:8.1f} img/min  {seconds:7.2f} s  start {ready:5.1f} s  "
              f"one-step job {single_call * 1000:6.1f} ms  loads per worker: {loads(runtime)}", flush=True)
    finally:
        runtime.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=10, help="one-step jobs timed for the overhead")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    data = prepare()
    load = requests(args.jobs, args.size, args.steps)
    print(f"{args.jobs} jobs alternating between 2 checkpoints, {args.size}x{args.size}, {args.steps} steps, "
          f"DPM++ 2M; one torch thread per process; {os.cpu_count()} cores")
    base = Settings(data_dir=data, checkpoint_cache_size=2, threads=1)
    results: dict = {}
    measure("single", base, load, args.rounds, results)
    measure("1 replica", base.with_changes(workers=1), load, args.rounds, results)
    measure("2 replicas", base.with_changes(workers=2), load, args.rounds, results)
    single_seconds, single_call = results["single"]
    for label in ("1 replica", "2 replicas"):
        seconds, call = results[label]
        print(f"{label}: {single_seconds / seconds:.2f}x the single process's throughput; routing overhead "
              f"{(call - single_call) * 1000:+.1f} ms per request")


if __name__ == "__main__":
    main()
