"""Benchmark: face restoration time per face, GFPGAN v1.4 (full size, 86M parameters) and CodeFormer
(one transformer layer of nine), random weights written in the released `.pth` layout and loaded
through Easel's code path, on scikit-image's astronaut photo (one face).

Baseline, measured in the same run: the same pipeline with the restorer replaced by the identity
(detection, alignment, paste-back and blending only), so the ratio shows what the network costs.

    python -m bench.faces                 # CPU, 2 threads
    python -m bench.faces --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.faces import FaceRestorers
from backend.random_models import save_face_restorers


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    folder = Path(tempfile.mkdtemp(prefix="easel-faces-bench-"))
    save_face_restorers(folder / "GFPGAN", folder / "Codeformer")
    restorers = FaceRestorers(folder / "GFPGAN", folder / "Codeformer", torch.device(args.device))
    detector = restorers.detector()
    faces = len(detector.detect(np.asarray(photo)))
    print(f"device {args.device}, {args.threads} threads, {photo.width}x{photo.height} photo, {faces} face(s), "
          f"detector: {detector.name}")
    detect = timed(lambda: detector.detect(np.asarray(photo)), args.repeats)
    print(f"detection: {detect * 1000:.0f} ms")
    for name in ("GFPGAN", "CodeFormer"):
        start = time.perf_counter()
        restorers.model(name)
        load = time.perf_counter() - start
        restorers.restore(photo, name)  # warm-up
        full = timed(lambda name=name: restorers.restore(photo, name), args.repeats)
        real_run = FaceRestorers._run
        FaceRestorers._run = lambda self, descriptor, crop, weight: crop.astype(np.float32)
        try:
            baseline = timed(lambda name=name: restorers.restore(photo, name), args.repeats)
        finally:
            FaceRestorers._run = real_run
        print(f"{name}: load {load:.1f} s, {full / max(1, faces):.2f} s per face "
              f"(pipeline without the network {baseline * 1000:.0f} ms; network = {full / baseline:.0f}x that)")


if __name__ == "__main__":
    main()
