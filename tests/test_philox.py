"""The NV noise source: Philox4x32 known answers, torch.randn values recorded on NVIDIA GPUs, and the
offset arithmetic that lets successive draws continue like successive CUDA draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend import philox
from backend.philox import PhiloxGenerator

# Random123's known-answer vectors (its `kat_vectors` file), as cut and pasted into
# DEShawResearch/Random123-Boost libs/random/test/test_philox.cpp (test_kat_philox4x32):
# rounds, counter words, key words, expected output words.
PHILOX4X32_KAT = [
    (7, (0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# Successive CUDA draws after seeding with 0, printed to 4 decimals: the libtorch program in
# kapilsh/cuda-mode-lecture (README.md, "Tensor x", "Tensor bias", "Tensor y") runs torch::manual_seed(0),
# then torch::randn({8, 10}), torch::randn({10}), torch::randn({8, 10}) on kCUDA. Its first 64 values are
# also the Python torch.randn((8, 8), device="cuda") printed in the same README.
CUDA_SEED0_SEQUENCE = [
    ((8, 10), [
        -0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284, -1.0745, -0.3631,
        -1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820, -0.1271, 1.2169, 1.4353, 1.0605,
        -0.4941, -1.4244, -0.7244, -1.2973, 0.0697, -0.0074, 1.8969, 0.6878, -0.0779, -0.8373,
        1.3506, -0.2879, -0.5965, -0.3283, -0.9086, -0.8059, -0.7407, -0.0504, 0.5435, 1.5150,
        0.0141, 0.4532, 1.6349, 0.7124, -0.1806, 1.0252, -1.4622, -0.7554, -0.1836, 0.3824,
        0.3918, -0.0830, 0.8971, -1.1123, 0.1116, 0.4863, -0.5499, -0.3231, -0.5469, 0.9049,
        0.2837, 0.1210, 0.4730, -1.0823, -0.0334, -0.9734, 0.9559, -1.1795, -1.0064, 0.1160,
        0.6852, -0.4124, -0.6738, -0.5404, 0.6898, -1.5517, 0.3805, -0.0436, 0.3597, -0.5043,
    ]),
    ((10,), [0.1808, -0.5523, 0.9238, -0.7350, 1.3800, 0.8676, 0.1297, -0.9406, 0.8109, 0.8821]),
    ((8, 10), [
        2.5441, -0.7163, -0.4934, 0.1267, 0.1014, -0.4035, 0.9023, 0.8099, -0.6884, 0.1372,
        1.0377, 0.0925, -0.3752, -0.0908, 2.0639, -1.8164, -0.2719, 0.2811, -1.0399, 0.7765,
        0.8814, 0.0444, -1.4870, 1.1334, 1.3268, -1.2616, 0.9501, -0.6558, 0.9098, -0.6290,
        -0.6587, 2.0811, 1.4151, -0.3091, -0.2055, 2.0562, -0.0490, -0.6361, -0.5359, -0.1310,
        -0.2945, 1.2275, 1.0549, 0.3576, 1.6378, -0.2310, 0.7883, -0.0807, -0.3924, 1.2673,
        1.0420, -0.4945, -1.1637, 1.5740, 0.7116, 0.6104, 1.2852, -0.6533, 1.1171, -1.0067,
        1.2912, 1.6028, 0.1332, 1.0703, -1.1161, -0.8396, -3.6680, 0.8189, 0.1255, -0.7691,
        0.1552, -0.8782, -0.4734, 0.9690, -1.9985, 0.1030, 0.8580, 0.7625, -1.2587, -0.8183,
    ]),
]

# Single big CUDA draws from bug reports, as (source, seed, numel, gpu_threads, {flat index: value}),
# printed to 4 decimals. Past one wave of threads (multiProcessorCount x maxThreadsPerMultiProcessor)
# the values depend on the GPU; the first elements do not.
_RTX3060_ROWS = {  # torch.randn([1, 64, 2048]) seed 42: the first and last three values of six rows
    0: [0.1940, 2.1614, -0.1721, 1.4540, -2.7733, -0.8932],
    1: [-0.4574, 0.8063, 0.1580, 0.1124, 0.2769, -1.2535],
    2: [1.1346, -0.6329, -0.9147, -1.0001, -1.1552, -0.6955],
    61: [-0.4861, 0.3358, 1.0578, -0.7282, 0.5087, 0.1318],
    62: [0.7881, 0.8339, -1.1424, -0.6297, -1.1112, -0.4091],
    63: [-1.2356, -0.4083, -0.4695, -0.4841, 1.2850, -0.0282],
}
_ISSUE_143086_NUMEL = 49 * 12 * 112 * 144
CUDA_REFERENCE = [
    # pytorch/pytorch#158398 (torch 2.7.1+cu126, GeForce RTX 3060: 28 SMs x 1536 threads).
    ("pytorch#158398 RTX 3060", 42, 64 * 2048, 28 * 1536, {
        row * 2048 + column: value
        for row, values in _RTX3060_ROWS.items()
        for column, value in zip([0, 1, 2, 2045, 2046, 2047], values)
    }),
    # pytorch/pytorch#143086 (torch 2.5.1): torch.randn(1, 49 * 12 * 112 * 144) seed 1 on an A100
    # (108 SMs x 2048 threads) and an H100; the H100's tail is that of the SXM part's 132 SMs.
    ("pytorch#143086 A100", 1, _ISSUE_143086_NUMEL, 108 * 2048, {
        0: -0.2963, 1: 2.6764, 2: -0.1408,
        _ISSUE_143086_NUMEL - 3: 0.1549, _ISSUE_143086_NUMEL - 2: -0.6797, _ISSUE_143086_NUMEL - 1: -0.1656,
    }),
    ("pytorch#143086 H100", 1, _ISSUE_143086_NUMEL, 132 * 2048, {
        0: -0.2963, 1: 2.6764, 2: -0.1408,
        _ISSUE_143086_NUMEL - 3: -0.6970, _ISSUE_143086_NUMEL - 2: -0.7780, _ISSUE_143086_NUMEL - 1: 0.3267,
    }),
]
PRINTED_TOLERANCE = 5e-5 + 5e-6  # half the last printed digit, plus the GPU's fast-math sine

# A1111's own port (modules/rng_philox.py docstring): Generator(seed=0).randn(shape=(3, 4)). A1111
# converts the exact uint32 to float64 where cuRAND first rounds it to float32, hence a few 1e-7 apart.
A1111_SEED0_3X4 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]


@pytest.mark.parametrize(("rounds", "counter", "key", "expected"), PHILOX4X32_KAT)
def test_philox4x32_known_answers(rounds, counter, key, expected):
    out = philox.philox4x32(np.array(counter, np.uint32)[:, None], np.array(key, np.uint32)[:, None], rounds)
    assert out.dtype == np.uint32
    assert [int(word) for word in out[:, 0]] == list(expected)


def test_philox4x32_is_vectorised_per_column_and_leaves_its_inputs_alone():
    cases = [case for case in PHILOX4X32_KAT if case[0] == 10]
    counter = np.array([case[1] for case in cases], np.uint32).T
    key = np.array([case[2] for case in cases], np.uint32).T
    counter_before, key_before = counter.copy(), key.copy()
    out = philox.philox4x32(counter, key)
    assert out.T.tolist() == [list(case[3]) for case in cases]
    assert np.array_equal(counter, counter_before) and np.array_equal(key, key_before)


def test_randn_is_standard_normal():
    draws = PhiloxGenerator(2024).randn(1_000_000)
    assert draws.dtype == np.float32 and draws.shape == (1_000_000,)
    assert abs(draws.mean()) < 0.005  # the standard error is 0.001
    assert abs(draws.std() - 1) < 0.005
    assert abs(np.mean(np.abs(draws) < 1) - 0.6827) < 0.003
    assert np.isfinite(draws).all()


def test_randn_is_deterministic_per_seed_and_differs_between_seeds():
    first = PhiloxGenerator(1234).randn((4, 64, 64))
    assert np.array_equal(first, PhiloxGenerator(1234).randn((4, 64, 64)))
    assert not np.allclose(first, PhiloxGenerator(1235).randn((4, 64, 64)))
    # Both 32-bit halves of the seed are key words.
    assert not np.allclose(PhiloxGenerator(5).randn(64), PhiloxGenerator(2**32 + 5).randn(64))


def test_successive_draws_match_cuda_after_manual_seed_0():
    generator = PhiloxGenerator(0)
    for shape, expected in CUDA_SEED0_SEQUENCE:
        drawn = generator.randn(shape)
        assert drawn.shape == shape
        np.testing.assert_allclose(drawn.ravel(), expected, rtol=0, atol=PRINTED_TOLERANCE)


@pytest.mark.parametrize(("source", "seed", "numel", "gpu_threads", "values"), CUDA_REFERENCE,
                         ids=[case[0] for case in CUDA_REFERENCE])
def test_big_draws_match_cuda_on_the_reported_gpu(source, seed, numel, gpu_threads, values):
    index = np.array(list(values))
    drawn = philox.randn_at(seed, numel, index, gpu_threads=gpu_threads)
    np.testing.assert_allclose(drawn, list(values.values()), rtol=0, atol=PRINTED_TOLERANCE, err_msg=source)


def test_matches_a1111s_port():
    drawn = PhiloxGenerator(0).randn((3, 4))
    np.testing.assert_allclose(drawn, A1111_SEED0_3X4, rtol=0, atol=1e-6)


def test_successive_draws_are_the_first_lanes_of_one_big_draw():
    # torch advances the offset by the grid-stride steps a draw takes, so with T threads one draw of
    # 4 * T * steps elements uses the counters of `steps` successive T-element draws: element
    # t + T * (4 * step + lane) is lane `lane` of thread t's Philox call at that step, and lane 0 is the
    # normal a one-wave draw gives element t.
    threads, steps = 512, 3
    big_generator = PhiloxGenerator(77, gpu_threads=threads)
    big = big_generator.randn(4 * threads * steps).reshape(steps, 4, threads)
    small_generator = PhiloxGenerator(77, gpu_threads=threads)
    successive = np.stack([small_generator.randn(threads) for _ in range(steps)])
    assert np.array_equal(big[:, 0, :], successive)
    assert big_generator.offset == small_generator.offset == steps
    # The other lanes are fresh numbers, not copies.
    assert not np.allclose(big[:, 1, :], successive)


@pytest.mark.parametrize(("numel", "gpu_threads", "increment"), [
    (1, None, 1), (4 * 64 * 64, None, 1), (16 * 128 * 128, None, 1),
    (4 * 64 * 64, 28 * 1536, 1), (28 * 1536 * 4, 28 * 1536, 1), (28 * 1536 * 4 + 1, 28 * 1536, 2),
    (0, None, 0),
])
def test_offset_advances_by_the_grid_stride_steps(numel, gpu_threads, increment):
    generator = PhiloxGenerator(3, gpu_threads=gpu_threads)
    generator.randn(numel)
    assert generator.offset == increment


def test_successive_draws_differ_and_replay_from_the_same_seed():
    generator = PhiloxGenerator(9)
    draws = [generator.randn((4, 8, 8)) for _ in range(3)]
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[1], draws[2])
    replay = PhiloxGenerator(9)
    assert all(np.array_equal(draw, replay.randn((4, 8, 8))) for draw in draws)


def test_the_gpu_matters_only_past_one_wave_of_threads():
    latent = (4, 64, 64)
    assert np.array_equal(PhiloxGenerator(5).randn(latent), PhiloxGenerator(5, gpu_threads=28 * 1536).randn(latent))
    big = (16, 128, 128)
    assert not np.array_equal(PhiloxGenerator(5).randn(big), PhiloxGenerator(5, gpu_threads=28 * 1536).randn(big))


def test_randn_tensor_rounds_the_float32_draw():
    expected = torch.from_numpy(PhiloxGenerator(11).randn((2, 3)))
    assert torch.equal(PhiloxGenerator(11).randn_tensor((2, 3)), expected)
    half = PhiloxGenerator(11).randn_tensor((2, 3), dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, expected.half())
    with pytest.raises(ValueError, match="float64"):
        PhiloxGenerator(11).randn_tensor((2, 3), dtype=torch.float64)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_out_of_range_seeds_are_refused(seed):
    with pytest.raises(ValueError, match="seed must be"):
        PhiloxGenerator(seed)
