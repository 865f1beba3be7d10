"""Seeds and noise: CPU generators per image, slerp, seed resize."""

import random

import pytest
import torch

from backend import noise
from backend.k_sampling import ImageNoise
from backend.noise import NoiseSpec


def test_noise_is_torch_randn_from_a_cpu_generator_seeded_with_the_seed():
    drawn = noise.initial_noise(NoiseSpec(1234), (4, 8, 8))
    assert torch.equal(drawn, torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(1234)))
    # Per-step noise continues each image's generator from there (A1111's ImageRNG.next).
    reference = torch.Generator().manual_seed(1234)
    torch.randn((4, 8, 8), generator=reference)
    steps = ImageNoise([1234, 99], "CPU", "cpu", (4, 8, 8))
    first, second = steps.next(), steps.next()
    assert torch.equal(first[0], torch.randn((4, 8, 8), generator=reference))
    assert torch.equal(second[0], torch.randn((4, 8, 8), generator=reference))
    assert torch.equal(first[1], torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(99))[1])


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_ensd_draws_per_step_noise_from_generators_seeded_seed_plus_delta(source):
    steps = ImageNoise([1234, 2**64 - 1], source, "cpu", (4, 8, 8), ensd=31337)
    first, second = steps.next(), steps.next()
    # A1111's ImageRNG.first(): after the initial noise, fresh generators seeded seed + ENSD
    fresh = ImageNoise([1234 + 31337], source, "cpu", (4, 8, 8), first_drawn=False)
    assert torch.equal(first[0], fresh.next()[0]) and torch.equal(second[0], fresh.next()[0])
    assert torch.equal(first[0], noise.randn_for_seed(source, 1234 + 31337, (4, 8, 8), "cpu"))
    assert torch.equal(first[1], noise.randn_for_seed(source, 31336, (4, 8, 8), "cpu"))  # wraps past 2^64


def test_a_resized_seeds_generator_starts_at_the_seed():
    # A1111 draws a resized seed's noise apart from its generator, so the first step's noise is the seed's first draw
    steps = ImageNoise([3], "CPU", "cpu", (4, 8, 12), first_drawn=False)
    assert torch.equal(steps.next()[0], torch.randn((4, 8, 12), generator=torch.Generator().manual_seed(3)))


def test_batch_noise_equals_single_draws():
    batch = noise.batch_noise([NoiseSpec(5), NoiseSpec(6)], (4, 8, 8))
    assert torch.equal(batch[1], noise.initial_noise(NoiseSpec(6), (4, 8, 8)))


def test_slerp_endpoints_and_norm():
    a = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1))
    b = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(noise.slerp(0.0, a, b), a, atol=1e-6)
    assert torch.allclose(noise.slerp(1.0, a, b), b, atol=1e-5)
    mid = noise.slerp(0.5, a, b)
    # Spherical, not linear: the blend keeps the noise's magnitude.
    assert abs(mid.norm() / a.norm() - 1) < 0.05 and (0.5 * (a + b)).norm() / a.norm() < 0.8


def test_variation_strength_blends_toward_the_subseed():
    base = noise.initial_noise(NoiseSpec(10), (4, 8, 8))
    sub = noise.initial_noise(NoiseSpec(11), (4, 8, 8))
    half = noise.initial_noise(NoiseSpec(10, 11, 0.5), (4, 8, 8))
    assert torch.allclose(half, noise.slerp(0.5, base, sub))


def test_seed_resize_pastes_the_old_noise_in_the_centre():
    small = noise.initial_noise(NoiseSpec(3), (4, 8, 8))
    wide = noise.initial_noise(NoiseSpec(3, resize_from=(8, 8)), (4, 8, 12))
    assert torch.equal(wide[:, :, 2:10], small)
    narrow = noise.initial_noise(NoiseSpec(3, resize_from=(8, 8)), (4, 8, 4))
    assert torch.equal(narrow, small[:, :, 2:6])


def test_random_seed_uses_the_injected_rng():
    assert noise.resolve_seed(-1, random.Random(1)) == random.Random(1).randrange(0, 2**32 - 1)
    assert noise.resolve_seed(77) == 77


def test_the_nv_source_draws_nvidias_philox_noise_on_the_cpu():
    from backend.philox import PhiloxGenerator

    drawn = noise.initial_noise(NoiseSpec(1234, source="NV"), (4, 8, 8))
    assert torch.equal(drawn, PhiloxGenerator(1234).randn_tensor((4, 8, 8)))
    assert not torch.equal(drawn, noise.initial_noise(NoiseSpec(1234), (4, 8, 8)))
    # variation seeds and seed resize draw from the same source
    varied = noise.initial_noise(NoiseSpec(1234, 99, 0.5, source="NV"), (4, 8, 8))
    assert torch.allclose(varied, noise.slerp(0.5, drawn, PhiloxGenerator(99).randn_tensor((4, 8, 8))))
    resized = noise.initial_noise(NoiseSpec(1234, resize_from=(4, 4), source="NV"), (4, 8, 8))
    assert torch.equal(resized[:, 2:6, 2:6], PhiloxGenerator(1234).randn_tensor((4, 4, 4)))


@pytest.mark.parametrize("source, device, effective", [
    ("GPU", "cpu", "CPU"), ("GPU", "cuda:0", "GPU"), ("GPU", "mps", "CPU"), ("CPU", "cuda", "CPU"),
    ("NV", "cpu", "NV"), ("NV", "cuda", "NV"),
])
def test_gpu_noise_on_a_device_without_its_own_generator_is_the_cpus(source, device, effective):
    assert noise.effective_source(source, device) == effective


def test_gpu_noise_on_the_cpu_equals_cpu_noise():
    assert torch.equal(noise.initial_noise(NoiseSpec(7, source="GPU"), (4, 8, 8)),
                       noise.initial_noise(NoiseSpec(7, source="CPU"), (4, 8, 8)))


def test_generation_records_the_source_it_used_and_pastes_back(sd1_manager):
    import numpy as np

    from backend.generation import generate
    from backend.infotext import parse_infotext, request_fields
    from backend.request import GenerationRequest

    base = dict(prompt="a red star", width=64, height=64, steps=2, sampler="Euler", seed=5, save_images=False)
    default = generate(sd1_manager, GenerationRequest(**base)).images[0]
    nv = generate(sd1_manager, GenerationRequest(**base, randn_source="NV")).images[0]
    cpu = generate(sd1_manager, GenerationRequest(**base, randn_source="CPU")).images[0]
    assert "RNG: CPU" in default.infotext and "RNG: NV" in nv.infotext  # GPU noise on a CPU is the CPU's
    assert np.array_equal(np.asarray(default.image), np.asarray(cpu.image))
    assert not np.array_equal(np.asarray(nv.image), np.asarray(cpu.image))
    pasted = request_fields(parse_infotext(nv.infotext))
    again = generate(sd1_manager, GenerationRequest(**{**base, "randn_source": pasted["randn_source"]})).images[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(nv.image))
