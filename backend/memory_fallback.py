"""Out of memory as a path, not a crash: recognising the error, freeing caches, and the lower-memory modes a job
retries in once (attention computed in slices in the UNet / transformer; the VAE in tiles), with a warning that
says what happened."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from backend import devices
from backend.errors import UnavailableError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# torch >= 2.5 names it torch.OutOfMemoryError; CUDA's is the same class, MPS raises a RuntimeError
_OOM_TYPES = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


class OutOfMemoryError(UnavailableError):
    """A job ran out of memory twice; the message names the remedies."""


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, _OOM_TYPES) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def free_memory() -> None:
    """Drop what the failed attempt left: Python's garbage (its tensors), then the allocator's cached blocks."""
    gc.collect()
    devices.empty_cache()


@contextlib.contextmanager
def lower_memory(model):
    """A lower-memory mode for one attempt, restored afterwards; yields what it is, for the warning. The UNet
    computes attention a slice of heads at a time (diffusers' `set_attention_slice`: the same result, a smaller
    peak); a network without slicing (FLUX.1's, SD 3's transformer) runs with the model's other parts on the
    CPU between uses, as --medvram keeps them."""
    network = model.unet
    if hasattr(network, "set_attention_slice") and hasattr(network, "attn_processors"):
        saved = dict(network.attn_processors)
        network.set_attention_slice("auto")
        try:
            yield "with attention in slices"
        finally:
            network.set_attn_processor(saved)
    elif model.placement.offload == "none":
        with model.offloaded():
            yield "with the model's parts on the CPU between uses (as --medvram)"
    else:
        yield "after freeing cached memory"


def retry_in_less_memory(attempt: Callable[[], T], model, warnings: list[str], what: str) -> T:
    """`attempt()`; after an out-of-memory error, free memory and run it once more with the network's attention
    in slices, saying so in `warnings`. A second failure raises `OutOfMemoryError` naming the remedies."""
    try:
        return attempt()
    except Exception as error:  # noqa: BLE001 - anything but out of memory is re-raised as it is
        if not is_out_of_memory(error):
            raise
        logger.warning("Out of memory during %s: %s", what, error)
    free_memory()
    with lower_memory(model) as mode:
        warnings.append(f"out of memory during {what}: retried {mode} (slower, less memory)")
        try:
            return attempt()
        except Exception as error:  # noqa: BLE001
            if not is_out_of_memory(error):
                raise
            free_memory()
            raise OutOfMemoryError(
                f"out of memory during {what}, also {mode}: lower the size or the batch size, or start Easel "
                "with --medvram (or --lowvram), or turn on FP8 weight in Settings") from error
