"""Benchmark: upscaling throughput (output megapixels per second), tiled vs untiled, on a model with
RealESRGAN_x4plus's exact architecture and size (RRDBNet, 23 blocks, 64 features, 16.7M parameters)
and random weights, written as the official `.pth` layout and loaded through Easel's code path.

    python -m bench.upscale                       # CPU: 200x200 -> 800x800
    python -m bench.upscale --size 512 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from backend.random_models import rrdbnet_state
from backend.upscalers import TileSettings, UpscalerLibrary, tiled_apply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=200, help="input side in pixels")
    parser.add_argument("--tiles", type=int, nargs="+", default=[64, 96, 192], help="tile sizes to compare")
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="easel-upscale-bench-"))
    torch.save({"params_ema": rrdbnet_state(features=64, blocks=23)}, folder / "RealESRGAN_x4plus.pth")
    library = UpscalerLibrary([folder], torch.device(args.device), half=args.device.startswith("cuda"))
    model = library.model(library.find("R-ESRGAN 4x+"))
    dtype = torch.float16 if library.half else torch.float32
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)
    megapixels = (args.size * 4) ** 2 / 1e6
    print(f"RRDBNet x4 ({sum(p.numel() for p in model.model.parameters()) / 1e6:.1f}M parameters), "
          f"{args.size}x{args.size} -> {args.size * 4}x{args.size * 4}, {args.device}, {args.threads} threads")

    def timed(tile: int) -> float:
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):  # the first is warm-up
                start = time.perf_counter()
                tiled_apply(model, image, 4, TileSettings(tile, args.overlap))
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    whole = timed(0)
    print(f"  untiled: {whole:.2f} s, {megapixels / whole:.3f} MP/s")
    for tile in args.tiles:
        seconds = timed(tile)
        print(f"  tiles of {tile} (overlap {args.overlap}): {seconds:.2f} s, {megapixels / seconds:.3f} MP/s "
              f"({whole / seconds:.2f}x untiled throughput)", flush=True)


if __name__ == "__main__":
    main()
