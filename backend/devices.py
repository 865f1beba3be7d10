"""Device and precision choice: fp16 on CUDA (VAE upcast where needed), fp32 on the CPU."""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass

import torch

from backend.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    offload: str  # "none", "model" (--medvram) or "sequential" (--lowvram)


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def placement(settings: Settings) -> Placement:
    device = pick_device(settings.device)
    precision = settings.precision
    if settings.no_half or precision == "full":
        dtype = torch.float32
    elif precision == "half":
        dtype = torch.float16
    elif precision == "bf16":
        dtype = torch.bfloat16
    else:
        # bf16/fp16 eager on the CPU is slower than fp32 for the SD UNet (measured), so auto means fp32 there.
        dtype = torch.float16 if device.type in ("cuda", "mps") else torch.float32
    vae_dtype = torch.float32 if settings.no_half_vae else dtype
    offload = "sequential" if settings.lowvram else "model" if settings.medvram else "none"
    if offload != "none" and device.type == "cpu":
        logger.info("--medvram/--lowvram have no effect on the CPU")
        offload = "none"
    return Placement(device, dtype, vae_dtype, offload)


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU thread count: with a busy core, torch's default thread count ran 10-150x slower."""
    if threads:
        torch.set_num_threads(threads)


def empty_cache() -> None:
    """Give freed memory back: CUDA's cached blocks, and on Linux the C heap's free pages (glibc keeps
    freed blocks of large tensors mapped, so RSS creeps up over repeated large allocations)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        _ = libc.malloc_trim  # glibc only (not musl): AttributeError elsewhere
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()


def memory_report() -> dict:
    """A1111's `/sdapi/v1/memory`: RAM (this process and the system) and CUDA memory."""
    import psutil

    process, system = psutil.Process(), psutil.virtual_memory()
    ram = {"free": system.available, "used": process.memory_info().rss, "total": system.total}
    cuda: dict = {"error": "CUDA is not available"}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        cuda = {"system": {"free": free, "used": total - free, "total": total},
                "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}}
    return {"ram": ram, "cuda": cuda}
