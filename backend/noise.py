"""Seeds and initial noise, drawn on the CPU from each image's own generator so a seed means the same
image on every device and image i of a batch can be regenerated alone with seed+i.

Variation seeds blend two noises by spherical interpolation; seed resize pastes noise drawn at the old
size into the centre of the new one (A1111's "Resize seed from").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

MAX_SEED = 2**32 - 1


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


def initial_noise(spec: NoiseSpec, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Generator]:
    """Noise of `shape` (C, H, W) for one image, and its generator, left ready for the sampler's
    own noise draws (ancestral and SDE samplers)."""
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    draw_shape = (shape[0], *spec.resize_from) if spec.resize_from else shape
    noise = torch.randn(draw_shape, generator=generator)
    if spec.subseed_strength > 0:
        sub = torch.randn(draw_shape, generator=torch.Generator("cpu").manual_seed(spec.subseed))
        noise = slerp(spec.subseed_strength, noise, sub)
    if tuple(draw_shape) != tuple(shape):
        full = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(spec.seed))
        noise = _paste_centred(noise, full)
    return noise, generator


def batch_noise(specs: list[NoiseSpec], shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    drawn = [initial_noise(spec, shape) for spec in specs]
    return torch.stack([n for n, _ in drawn]), [g for _, g in drawn]
