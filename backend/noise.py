"""Seeds and initial noise, from each image's own generator so image i of a batch can be regenerated
alone with seed+i, from A1111's noise sources: CPU (torch's CPU generator: the same image on every
device), GPU (the generation device's generator, A1111's default) and NV (NVIDIA's Philox generator
computed on the CPU: an NVIDIA GPU's image on any machine).

Variation seeds blend two noises by spherical interpolation; seed resize pastes noise drawn at the old
size into the centre of the new one (A1111's "Resize seed from").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from backend import philox
from backend.request import RANDN_SOURCES

MAX_SEED = 2**32 - 1
GPU, CPU, NV = RANDN_SOURCES


def resolve_seed(seed: int | None, rng: random.Random | None = None) -> int:
    """-1 (or None) means random; anything else is used as given."""
    if seed is None or int(seed) < 0:
        return (rng or random.SystemRandom()).randrange(0, MAX_SEED)
    return int(seed)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1), treating each tensor as one vector."""
    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a_flat / a_flat.norm(), b_flat / b_flat.norm()).clamp(-1, 1)
    if cos > 0.9995:  # nearly parallel: plain interpolation is exact enough and stable
        return ((1 - t) * a.double() + t * b.double()).to(a.dtype)
    omega = torch.arccos(cos)
    out = (torch.sin((1 - t) * omega) * a.double() + torch.sin(t * omega) * b.double()) / torch.sin(omega)
    return out.to(a.dtype)


def _paste_centred(small: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
    """Put `small` in the centre of `large` (cropping `small` where it is bigger)."""
    out = large.clone()
    _, sh, sw = small.shape
    _, lh, lw = large.shape
    h, w = min(sh, lh), min(sw, lw)
    sy, sx = (sh - h) // 2, (sw - w) // 2
    ly, lx = (lh - h) // 2, (lw - w) // 2
    out[:, ly : ly + h, lx : lx + w] = small[:, sy : sy + h, sx : sx + w]
    return out


@dataclass(frozen=True)
class NoiseSpec:
    seed: int
    subseed: int = 0
    subseed_strength: float = 0.0
    resize_from: tuple[int, int] | None = None  # latent (height, width) the seed was first used at
    source: str = CPU  # A1111's `randn_source`: CPU, GPU or NV
    device: str = "cpu"  # where GPU noise is drawn (the generation device)


def effective_source(source: str, device: str) -> str:
    """The source a draw really uses: GPU noise on a device without its own generator (the CPU, MPS) is
    the CPU's, so it is recorded as such and reproduces elsewhere with `RNG: CPU`."""
    if source not in RANDN_SOURCES:
        raise ValueError(f"noise source must be one of {', '.join(RANDN_SOURCES)}, not {source!r}")
    if source == GPU and not str(device).startswith("cuda"):
        return CPU
    return source


def randn_for_seed(source: str, seed: int, shape, device: str) -> torch.Tensor:
    """One standard normal draw of `shape` for `seed`, on the CPU, from the chosen source."""
    if source == NV:
        return philox.PhiloxGenerator(seed).randn_tensor(tuple(shape))
    if source == GPU:
        generator = torch.Generator(device).manual_seed(seed)
        return torch.randn(tuple(shape), generator=generator, device=device).cpu()
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed))


def initial_noise(spec: NoiseSpec, shape: tuple[int, int, int]) -> torch.Tensor:
    """Noise of `shape` (C, H, W) for one image, as A1111's ImageRNG draws it first: the seed's, mixed with
    the variation seed's, and with "resize seed from" the smaller draw pasted into the centre of a full one."""
    source = effective_source(spec.source, spec.device)
    draw_shape = (shape[0], *spec.resize_from) if spec.resize_from else shape
    noise = randn_for_seed(source, spec.seed, draw_shape, spec.device)
    if spec.subseed_strength > 0:
        noise = slerp(spec.subseed_strength, noise, randn_for_seed(source, spec.subseed, draw_shape, spec.device))
    if tuple(draw_shape) != tuple(shape):
        noise = _paste_centred(noise, randn_for_seed(source, spec.seed, shape, spec.device))
    return noise


def batch_noise(specs: list[NoiseSpec], shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.stack([initial_noise(spec, shape) for spec in specs])
