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
def sliced_attention(network):
    """The network computes attention a slice of heads at a time (diffusers' `set_attention_slice`: the same
    result with a smaller peak), restored afterwards. Networks without it are left as they are."""
    if not hasattr(network, "set_attention_slice") or not hasattr(network, "attn_processors"):
        yield False
        return
    saved = dict(network.attn_processors)
    network.set_attention_slice("auto")
    try:
        yield True
    finally:
        network.set_attn_processor(saved)


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
    with sliced_attention(model.unet) as sliced:
        mode = "with attention in slices" if sliced else "after freeing cached memory"
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
