"""Seeds and noise: CPU generators per image, slerp, seed resize."""

import random

import torch

from backend import noise
from backend.noise import NoiseSpec


def test_noise_is_torch_randn_from_a_cpu_generator_seeded_with_the_seed():
    drawn, generator = noise.initial_noise(NoiseSpec(1234), (4, 8, 8))
    assert torch.equal(drawn, torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(1234)))
    # The generator continues from there for the sampler's own draws.
    reference = torch.Generator().manual_seed(1234)
    torch.randn((4, 8, 8), generator=reference)
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=reference))


def test_batch_noise_equals_single_draws():
    batch, _ = noise.batch_noise([NoiseSpec(5), NoiseSpec(6)], (4, 8, 8))
    assert torch.equal(batch[1], noise.initial_noise(NoiseSpec(6), (4, 8, 8))[0])


def test_slerp_endpoints_and_norm():
    a = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1))
    b = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(noise.slerp(0.0, a, b), a, atol=1e-6)
    assert torch.allclose(noise.slerp(1.0, a, b), b, atol=1e-5)
    mid = noise.slerp(0.5, a, b)
    # Spherical, not linear: the blend keeps the noise's magnitude.
    assert abs(mid.norm() / a.norm() - 1) < 0.05 and (0.5 * (a + b)).norm() / a.norm() < 0.8


def test_variation_strength_blends_toward_the_subseed():
    base, _ = noise.initial_noise(NoiseSpec(10), (4, 8, 8))
    sub, _ = noise.initial_noise(NoiseSpec(11), (4, 8, 8))
    half, _ = noise.initial_noise(NoiseSpec(10, 11, 0.5), (4, 8, 8))
    assert torch.allclose(half, noise.slerp(0.5, base, sub))


def test_seed_resize_pastes_the_old_noise_in_the_centre():
    small, _ = noise.initial_noise(NoiseSpec(3), (4, 8, 8))
    wide, _ = noise.initial_noise(NoiseSpec(3, resize_from=(8, 8)), (4, 8, 12))
    assert torch.equal(wide[:, :, 2:10], small)
    narrow, _ = noise.initial_noise(NoiseSpec(3, resize_from=(8, 8)), (4, 8, 4))
    assert torch.equal(narrow, small[:, :, 2:6])


def test_random_seed_uses_the_injected_rng():
    assert noise.resolve_seed(-1, random.Random(1)) == random.Random(1).randrange(0, 2**32 - 1)
    assert noise.resolve_seed(77) == 77
