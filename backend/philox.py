"""The "NV" noise source: NVIDIA's Philox4x32-10 and torch's CUDA `randn` layout, computed on the CPU
with numpy, so an image made on an NVIDIA GPU can be reproduced on any machine (A1111's `RNG: NV`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Philox4x32 round multipliers and Weyl key increments (Salmon et al., "Parallel Random Numbers: As Easy
# as 1, 2, 3", SC 2011); cuRAND uses the same constants.
PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
PHILOX_W = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))

# torch launches its distribution kernels in blocks of 256 threads; each thread's Philox call yields four
# normals (curand_normal4: two Box-Muller pairs).
BLOCK_SIZE = 256
NORMALS_PER_CALL = 4

# torch hands a kernel only 32-bit byte offsets; bigger tensors are split into several launches, each
# advancing the generator, which this port does not reproduce.
MAX_NUMEL = (2**31 - 1) // 4

# cuRAND's _curand_box_muller constants: CURAND_2POW32_INV and CURAND_2POW32_INV_2PI, both float32.
_TWO_POW32_INV = float(np.float32(2.0**-32))
_TWO_POW32_INV_2PI = float(np.float32(2.0**-32 * float(np.float32(2 * np.pi))))

_UINT32_MASK = 0xFFFFFFFF


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox4x32-`rounds` of each column: `counter` is (4, n) uint32, `key` (2, n) (or (2,), shared by
    every column); returns the (4, n) uint32 output. The inputs are left unchanged."""
    counter = np.asarray(counter, dtype=np.uint32)
    key = np.asarray(key, dtype=np.uint32)
    if counter.shape[:1] != (4,) or key.shape[:1] != (2,):
        raise ValueError(f"philox4x32 takes a (4, n) counter and a (2, n) key; got {counter.shape} and {key.shape}")
    c0, c1, c2, c3 = counter
    k0, k1 = (np.broadcast_to(word, c0.shape) for word in key)
    for round_index in range(rounds):
        if round_index:  # the key is bumped before every round but the first
            k0, k1 = k0 + PHILOX_W[0], k1 + PHILOX_W[1]
        # 32x32 -> 64-bit products; the high and low halves are the round's new words.
        product0 = c0.astype(np.uint64) * PHILOX_M[0]
        product1 = c2.astype(np.uint64) * PHILOX_M[1]
        high0, low0 = (product0 >> np.uint64(32)).astype(np.uint32), product0.astype(np.uint32)
        high1, low1 = (product1 >> np.uint64(32)).astype(np.uint32), product1.astype(np.uint32)
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
    return np.stack([c0, c1, c2, c3])


def _split64(values: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) uint32 words of 64-bit unsigned values, the way cuRAND lays a 64-bit number out."""
    values = np.asarray(values, dtype=np.uint64)
    return (values & np.uint64(_UINT32_MASK)).astype(np.uint32), (values >> np.uint64(32)).astype(np.uint32)


def _uniform(bits: np.ndarray, scale: float) -> np.ndarray:
    """cuRAND's uint32 -> float32 conversion: x is rounded to float32, then `x * scale + scale / 2` is
    rounded once (nvcc fuses it into an FMA); in float64 the product is exact, so one rounding it is."""
    return (bits.astype(np.float32).astype(np.float64) * scale + scale / 2).astype(np.float32)


def _box_muller(x: np.ndarray, y: np.ndarray, use_cosine: np.ndarray) -> np.ndarray:
    """One normal per element from the Box-Muller pair (x, y): the sine half, or the cosine half where
    `use_cosine`. The radius and angle are computed in float64 from cuRAND's float32 uniforms, so the
    result differs from the GPU's `logf`/`__sincosf` only in the last float32 bits."""
    radius = np.sqrt(-2.0 * np.log(_uniform(x, _TWO_POW32_INV).astype(np.float64)))
    angle = _uniform(y, _TWO_POW32_INV_2PI).astype(np.float64)
    return (radius * np.where(use_cosine, np.cos(angle), np.sin(angle))).astype(np.float32)


def launch_threads(numel: int, gpu_threads: int | None = None) -> int:
    """Threads torch launches to draw `numel` normals (`calc_execution_policy`): one per element in
    blocks of 256, capped at the GPU's resident threads (multiProcessorCount x maxThreadsPerMultiProcessor)."""
    blocks = -(-numel // BLOCK_SIZE)
    if gpu_threads is not None:
        blocks = min(blocks, max(gpu_threads // BLOCK_SIZE, 1))
    return blocks * BLOCK_SIZE


def offset_increment(numel: int, gpu_threads: int | None = None) -> int:
    """How far one `randn` of `numel` elements advances the generator, in Philox counter steps (torch's
    `philox_offset_per_thread` / 4): the number of grid-stride steps each thread takes."""
    if numel == 0:
        return 0
    return -(-numel // (NORMALS_PER_CALL * launch_threads(numel, gpu_threads)))


def randn_at(seed: int, numel: int, index: np.ndarray | Sequence[int], *, offset: int = 0,
             gpu_threads: int | None = None) -> np.ndarray:
    """Values at flat positions `index` of `torch.randn(numel)` drawn on CUDA from a generator seeded
    with `seed`, `offset` Philox steps in (see `PhiloxGenerator.offset`).

    torch's kernel runs a grid-stride loop: thread t starts cuRAND's Philox at subsequence t (the counter's
    high 64 bits) and offset (the low 64 bits); each step's call gives four normals, written `threads`
    elements apart. Below one wave of threads every element is its own thread's first normal, which is
    the layout A1111's port assumes and the same on every NVIDIA GPU.
    """
    index = np.asarray(index, dtype=np.int64)
    threads = launch_threads(numel, gpu_threads)
    thread = index % threads
    step, lane = np.divmod(index // threads, NORMALS_PER_CALL)
    counter_low, counter_high = _split64(offset + step)
    thread_low, thread_high = _split64(thread)
    seed_low, seed_high = _split64(seed)
    bits = philox4x32(np.stack([counter_low, counter_high, thread_low, thread_high]),
                      np.stack([seed_low, seed_high]))
    first_pair = lane < 2
    x = np.where(first_pair, bits[0], bits[2])
    y = np.where(first_pair, bits[1], bits[3])
    return _box_muller(x, y, use_cosine=lane % 2 == 1)


class PhiloxGenerator:
    """A stand-in for `torch.Generator("cuda").manual_seed(seed)` that draws `randn` on the CPU.

    Successive `randn` calls continue the way successive CUDA draws do (each advances `offset`), so the
    extra noise ancestral and SDE samplers draw per step matches too. `gpu_threads` (the imitated GPU's
    multiProcessorCount x maxThreadsPerMultiProcessor, e.g. 82 x 1536 for an RTX 3090) matters only for
    draws bigger than that; None keeps A1111's layout, which assumes every draw fits in one wave.
    """

    def __init__(self, seed: int, *, gpu_threads: int | None = None):
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed}; resolve -1 (random) "
                             "to a concrete seed before drawing noise")
        if gpu_threads is not None and gpu_threads < BLOCK_SIZE:
            raise ValueError(f"gpu_threads is the GPU's multiProcessorCount x maxThreadsPerMultiProcessor "
                             f"(at least {BLOCK_SIZE}), got {gpu_threads}")
        self.seed = int(seed)
        self.gpu_threads = gpu_threads
        self.offset = 0  # Philox counter steps used so far: torch's philox_offset_per_thread / 4

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        """Standard normal float32 noise of `shape`, equal to the CUDA draw to float32 rounding."""
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(size) for size in shape)
        numel = int(np.prod(shape, dtype=np.int64))
        if numel > MAX_NUMEL:
            raise ValueError(f"cannot reproduce a CUDA draw of {numel} elements (torch splits draws over "
                             f"{MAX_NUMEL} into several launches); draw it in smaller pieces")
        values = randn_at(self.seed, numel, np.arange(numel), offset=self.offset, gpu_threads=self.gpu_threads)
        self.offset += offset_increment(numel, self.gpu_threads)
        return values.reshape(shape)

    def randn_tensor(self, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`randn` as a CPU tensor of `dtype`. Half and bfloat16 round the float32 draw, as CUDA does."""
        if dtype == torch.float64:
            raise ValueError("CUDA draws float64 noise with a different algorithm; draw float32 noise and "
                             "convert it with .double()")
        return torch.from_numpy(self.randn(shape)).to(dtype)
