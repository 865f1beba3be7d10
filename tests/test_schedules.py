"""backend.schedules against A1111 v1.10's schedules, written here a second time as closed forms in numpy float64
(no torch, no linspace where a formula will do), plus published numbers for SD's noise schedule."""

import math

import numpy as np
import pytest
import torch
from scipy import special

from backend import schedules
from backend.errors import InputError

STEPS = (1, 2, 10, 20, 30)
LABELS = schedules.SCHEDULE_TYPES[1:]


def sd_alphas_cumprod() -> np.ndarray:
    """SD1/SD2/SDXL's scaled_linear betas 0.00085..0.012 over 1000 steps, cumulated in float64, stored float32."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


ALPHAS = sd_alphas_cumprod()
TABLE = np.sqrt((1.0 - ALPHAS.astype(np.float64)) / ALPHAS.astype(np.float64))
# A1111's published AYS lists (modules/sd_schedulers.py), from NVIDIA's "Align Your Steps" how-to.
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def sigma_at(t, table=TABLE):
    """Sigma at fractional timesteps: linear in log sigma between neighbouring integer timesteps."""
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    k = np.minimum(np.floor(t).astype(int), len(table) - 2)
    w = t - k
    return np.exp((1 - w) * np.log(table[k]) + w * np.log(table[k + 1]))


def ramp(n):
    """0 .. 1 in n evenly spaced points; a single point is 0."""
    return np.arange(n) / (n - 1) if n > 1 else np.zeros(1)


def ays_reference(n, levels):
    if n == len(levels):
        return [*levels, 0.0]
    ascending = np.log(levels[::-1])
    values = []
    for p in ramp(n):
        k = min(int(p * 10), 9)
        w = p * 10 - k
        values.append(math.exp((1 - w) * ascending[k] + w * ascending[k + 1]))
    return [*values[::-1], 0.0]


def reference(label, n, table=TABLE, family="sd1", lo=None, hi=None, rho=None, beta=(0.6, 0.6)):
    """A1111's schedule `label` with n sigmas (before its trailing 0), float64."""
    last = len(table) - 1
    lo = table[0] if lo is None else lo
    hi = table[-1] if hi is None else hi
    f = ramp(n)
    if label in ("Uniform", "Normal"):
        values = sigma_at(last * (1 - f), table)
    elif label == "SGM Uniform":
        values = sigma_at(last * (1 - np.arange(n) / n), table)
    elif label == "Karras":
        r = 7.0 if rho is None else rho
        values = (hi ** (1 / r) + f * (lo ** (1 / r) - hi ** (1 / r))) ** r
    elif label == "Exponential":
        values = hi * (lo / hi) ** f
    elif label == "Polyexponential":
        values = np.exp(math.log(lo) + (1 - f) ** (1.0 if rho is None else rho) * math.log(hi / lo))
    elif label == "KL Optimal":
        i = np.arange(n + 1) / n
        return np.tan(math.atan(hi) * (1 - i) + math.atan(lo) * i)  # no trailing 0 in A1111
    elif label == "Align Your Steps":
        return np.array(ays_reference(n, AYS_SDXL if family == "sdxl" else AYS_SD15))
    elif label == "Simple":
        values = table[[last - (x * len(table)) // n for x in range(n)]]
    elif label == "DDIM":
        stride = max(len(table) // n, 1)
        values = table[[1 + k * stride for k in range((len(table) - 2) // stride + 1)]][::-1]
    elif label == "Beta":
        values = lo + special.betaincinv(*beta, 1 - f) * (hi - lo)
    return np.append(values, 0.0)


def assert_close(actual: torch.Tensor, expected, rtol=1e-6):
    # float32 holds ~7 digits: 1e-6 absolute at sigma 14.6 is one unit in the last place, so also relative.
    assert actual.dtype == torch.float32
    np.testing.assert_allclose(actual.numpy(), np.asarray(expected, dtype=np.float64), rtol=rtol, atol=1e-6)


def test_scaled_linear_alphas_cumprod_is_the_compvis_schedule():
    np.testing.assert_array_equal(schedules.scaled_linear_alphas_cumprod().numpy(), ALPHAS)


def test_model_sigmas_match_published_values():
    table = schedules.model_sigmas(torch.from_numpy(ALPHAS))
    assert table.dtype == torch.float32 and table.shape == (1000,)
    # ComfyUI's KarrasScheduler defaults are SD's range: sigma_max 14.614642, sigma_min 0.0291675.
    assert table[-1].item() == pytest.approx(14.614642, abs=1e-6)
    assert table[0].item() == pytest.approx(0.0291675, abs=1e-7)
    # Stability's sgm LegacyDDPMDiscretization at 30 steps visits t = 999, 965, 932, 899, 865, 832.
    published = [14.6146, 11.9484, 9.9172, 8.3028, 6.9739, 5.9347]
    np.testing.assert_allclose(table[[999, 965, 932, 899, 865, 832]].numpy(), published, atol=5e-5)
    assert_close(table, TABLE)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("label", LABELS)
def test_schedule_matches_closed_form(label, steps):
    expected = reference(label, steps)
    actual = schedules.sigmas(torch.from_numpy(ALPHAS), steps, label)
    assert actual.shape == (len(expected),)
    # A1111 takes tan() of a float32 angle near atan(14.6): its rounding grows by 1 + sigma**2.
    assert_close(actual, expected, rtol=3e-6 if label == "KL Optimal" else 1e-6)


def test_simple_keeps_a1111s_float_truncation():
    # A1111 picks int(x * (1000 / n)): at 38 steps, x = 19 gives 499.99999999999994, so t = 999 - 499 = 500.
    actual = schedules.sigmas(ALPHAS, 38, "Simple")
    assert actual[19].item() == pytest.approx(TABLE[500], rel=1e-6)
    assert actual[18].item() == pytest.approx(TABLE[999 - (18 * 1000) // 38], rel=1e-6)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("label", LABELS)
def test_schedule_shape(label, steps):
    actual = schedules.sigmas(ALPHAS, steps, label).numpy()
    ddim_count = len(range(1, 1000, max(1000 // steps, 1)))
    assert len(actual) == (ddim_count if label == "DDIM" else steps) + 1
    assert (np.diff(actual) < 0).all(), "sigmas must decrease strictly"
    if label == "KL Optimal":
        assert actual[-1] == pytest.approx(TABLE[0], rel=1e-6)  # A1111's KL Optimal stops at sigma_min
    else:
        assert actual[-1] == 0.0
    if label == "Align Your Steps":
        assert actual[0] == pytest.approx(14.615 if steps > 1 else 0.029, rel=1e-6)
    elif label == "DDIM":
        assert actual[0] == pytest.approx(TABLE[1 + (ddim_count - 1) * (1000 // steps)], rel=1e-6)
    else:
        assert actual[0] == pytest.approx(TABLE[-1], rel=1e-6)


@pytest.mark.parametrize("steps, expected_length", [(3, 4), (7, 9), (30, 32), (1, 2)])
def test_ddim_schedule_can_have_more_steps_than_asked(steps, expected_length):
    assert len(schedules.sigmas(ALPHAS, steps, "DDIM")) == expected_length


def test_karras_at_20_steps():
    actual = schedules.sigmas(ALPHAS, 20, "Karras")
    expected_slice = [14.6146, 11.7254, 9.3402, 7.3836, 5.7894]
    np.testing.assert_allclose(actual[:5].numpy(), expected_slice, atol=5e-5)
    assert actual[-2].item() == pytest.approx(0.0292, abs=5e-5)


@pytest.mark.parametrize("family, levels", [("sd1", AYS_SD15), ("sd2", AYS_SD15), ("sdxl", AYS_SDXL)])
def test_align_your_steps_uses_the_published_lists(family, levels):
    # 11 sigmas are A1111's list itself: 10 steps of DPM2, which computes one more and drops the 0.029.
    exact = schedules.sigmas(ALPHAS, 11, "Align Your Steps", family=family)
    np.testing.assert_array_equal(exact.numpy(), np.array([*levels, 0.0], dtype=np.float32))
    dpm2 = schedules.sigmas(ALPHAS, 10, "Align Your Steps", family=family, sampler="DPM2")
    np.testing.assert_array_equal(dpm2.numpy(), np.array([*levels[:-1], 0.0], dtype=np.float32))
    for steps in (5, 20, 30):
        assert_close(schedules.sigmas(ALPHAS, steps, "Align Your Steps", family=family),
                     ays_reference(steps, levels))


def test_schedule_names_and_aliases():
    assert torch.equal(schedules.sigmas(ALPHAS, 8, "sgm_uniform"), schedules.sigmas(ALPHAS, 8, "SGM Uniform"))
    assert torch.equal(schedules.sigmas(ALPHAS, 8, "SGMUniform"), schedules.sigmas(ALPHAS, 8, "sgm uniform"))
    assert schedules.schedule_label("align_your_steps") == "Align Your Steps"


def test_overrides_for_range_rho_and_beta():
    assert_close(schedules.sigmas(ALPHAS, 12, "Karras", sigma_min=0.1, sigma_max=10.0, rho=5.0),
                 reference("Karras", 12, lo=0.1, hi=10.0, rho=5.0))
    assert_close(schedules.sigmas(ALPHAS, 12, "Polyexponential", rho=2.0), reference("Polyexponential", 12, rho=2.0))
    assert_close(schedules.sigmas(ALPHAS, 12, "Beta", beta_alpha=0.5, beta_beta=0.7),
                 reference("Beta", 12, beta=(0.5, 0.7)))
    # SGM Uniform maps a custom range to timesteps and spaces those evenly.
    t_hi, t_lo = schedules.sigma_to_t(torch.tensor([8.0, 0.5]), torch.from_numpy(TABLE).float().log()).tolist()
    expected = sigma_at(t_hi + (t_lo - t_hi) * np.arange(9) / 9)
    assert_close(schedules.sigmas(ALPHAS, 9, "SGM Uniform", sigma_min=0.5, sigma_max=8.0), [*expected, 0.0])


# sampler -> (Automatic resolves to, discard penultimate sigma, second order, sigma input, infotext schedule)
SAMPLERS = {
    "Euler a": ("Uniform", False, False, "sigmas", "Automatic"),
    "Euler": ("Uniform", False, False, "sigmas", "Automatic"),
    "LMS": ("Uniform", False, False, "sigmas", "Automatic"),
    "Heun": ("Uniform", False, True, "sigmas", "Automatic"),
    "DPM2": ("Karras", True, True, "sigmas", "Karras"),
    "DPM2 a": ("Karras", True, True, "sigmas", "Karras"),
    "DPM++ 2S a": ("Karras", False, True, "sigmas", "Karras"),
    "DPM++ 2M": ("Karras", False, False, "sigmas", "Karras"),
    "DPM++ SDE": ("Karras", False, True, "sigmas", "Karras"),
    "DPM++ 2M SDE": ("Exponential", False, False, "sigmas", "Exponential"),
    "DPM++ 2M SDE Heun": ("Exponential", False, False, "sigmas", "Exponential"),
    "DPM++ 3M SDE": ("Exponential", True, False, "sigmas", "Exponential"),
    "DPM fast": ("Uniform", False, False, "range", "Automatic"),
    "DPM adaptive": ("Uniform", False, False, "range", "Automatic"),
    "Restart": ("Karras", False, True, "sigmas", "Karras"),
    "DDIM": (None, False, False, "timesteps", "Automatic"),
    "DDIM CFG++": (None, False, False, "timesteps", "Automatic"),
    "PLMS": (None, False, False, "timesteps", "Automatic"),
    "UniPC": (None, False, False, "timesteps", "Automatic"),
    "LCM": ("Uniform", False, False, "sigmas", "Automatic"),
}
ENSD = {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive"}


def test_every_a1111_sampler_is_listed():
    assert set(schedules.SAMPLER_NAMES) == set(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_schedule_automatic(name):
    schedule, discard, second_order, sigma_input, infotext = SAMPLERS[name]
    plan = schedules.sampler_schedule(name)
    assert (plan.sampler, plan.schedule, plan.discard_penultimate_sigma, plan.second_order, plan.sigma_input,
            plan.infotext_schedule) == (name, schedule, discard, second_order, sigma_input, infotext)
    assert plan.uses_ensd == (name in ENSD)
    assert plan.brownian_noise == ("SDE" in name)
    assert plan.lcm_table == (name == "LCM")


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_schedule_named(name):
    plan = schedules.sampler_schedule(name.upper(), "kl_optimal", always_discard_penultimate_sigma=True)
    assert plan.sampler == name
    assert plan.infotext_schedule == "KL Optimal"
    assert plan.schedule == (None if SAMPLERS[name][3] == "timesteps" else "KL Optimal")
    assert plan.discard_penultimate_sigma


def test_sampler_aliases():
    assert schedules.sampler_schedule("k_dpmpp_2m").sampler == "DPM++ 2M"
    assert schedules.sampler_schedule("k_euler_ancestral").sampler == "Euler a"
    assert schedules.sampler_schedule("ddim_cfgpp").sampler == "DDIM CFG++"


def test_dpm_2m_sde_automatic_is_exponential():
    # Issue 15: A1111 pairs DPM++ 2M SDE with Exponential, not Karras.
    actual = schedules.sigmas(ALPHAS, 20, sampler="DPM++ 2M SDE")
    assert torch.equal(actual, schedules.sigmas(ALPHAS, 20, "Exponential"))


@pytest.mark.parametrize("name, label", [("DPM2", "Karras"), ("DPM2 a", "Karras"), ("DPM++ 3M SDE", "Exponential")])
@pytest.mark.parametrize("steps", STEPS)
def test_discarded_penultimate_sigma(name, label, steps):
    longer = reference(label, steps + 1)
    expected = np.append(longer[:-2], 0.0)
    actual = schedules.sigmas(ALPHAS, steps, sampler=name)
    assert actual.shape == (steps + 1,)
    assert_close(actual, expected)


def test_always_discard_penultimate_sigma():
    actual = schedules.sigmas(ALPHAS, 10, "Uniform", always_discard_penultimate_sigma=True)
    assert_close(actual, np.append(reference("Uniform", 11)[:-2], 0.0))
    assert torch.equal(actual, schedules.sigmas(ALPHAS, 10, sampler="Euler", always_discard_penultimate_sigma=True))


@pytest.mark.parametrize("name", ["Euler", "Euler a", "LMS", "Heun", "DPM fast", "DPM adaptive"])
def test_samplers_without_a_default_use_uniform(name):
    assert torch.equal(schedules.sigmas(ALPHAS, 20, sampler=name), schedules.sigmas(ALPHAS, 20, "Uniform"))


LCM_TABLE = TABLE[19::20]  # LCM's 50 original steps: t = 19, 39, ..., 999


@pytest.mark.parametrize("steps", (1, 2, 4, 8, 20))
def test_lcm_spaces_its_own_table(steps):
    expected = np.append(sigma_at(49 * (1 - ramp(steps)), LCM_TABLE), 0.0)
    assert_close(schedules.sigmas(ALPHAS, steps, sampler="LCM"), expected)
    assert_close(schedules.sigmas(ALPHAS, steps, "Uniform", sampler="LCM"), expected)


def test_lcm_range_and_table_schedules():
    assert_close(schedules.sigmas(ALPHAS, 6, "Karras", sampler="LCM"), reference("Karras", 6, lo=LCM_TABLE[0]))
    assert_close(schedules.sigmas(ALPHAS, 5, "Simple", sampler="LCM"), reference("Simple", 5, table=LCM_TABLE))


def test_timestep_samplers_use_compvis_timesteps():
    with pytest.raises(InputError, match="compvis_timesteps"):
        schedules.sigmas(ALPHAS, 20, "Karras", sampler="DDIM")
    assert schedules.compvis_timesteps(20).tolist() == list(range(1, 1000, 50))
    assert schedules.compvis_timesteps(30).tolist() == list(range(1, 1000, 33))
    assert schedules.compvis_timesteps(1).tolist() == [1]
    assert schedules.compvis_timesteps(4, discard_penultimate_sigma=True).tolist() == [1, 201, 401, 601, 801]


def test_sigma_to_t_and_back():
    log_sigmas = torch.from_numpy(TABLE).float().log()
    whole = torch.tensor([0, 1, 250, 500, 998, 999])
    assert torch.equal(schedules.t_to_sigma(whole, log_sigmas), log_sigmas[whole].exp())
    np.testing.assert_allclose(schedules.sigma_to_t(log_sigmas[whole].exp(), log_sigmas).numpy(), whole, atol=1e-3)
    t = torch.tensor([0.25, 17.5, 499.9, 998.75])
    assert_close(schedules.t_to_sigma(t, log_sigmas), sigma_at(t.numpy()))
    np.testing.assert_allclose(schedules.sigma_to_t(torch.from_numpy(sigma_at(t.numpy())), log_sigmas).numpy(),
                               t.numpy(), atol=1e-3)
    # Outside the table: clamped to the first and last timestep; a python float works too.
    assert schedules.sigma_to_t(torch.tensor([100.0, 1e-3]), log_sigmas).tolist() == [999.0, 0.0]
    assert schedules.sigma_to_t(1.0, log_sigmas).shape == ()


def test_zero_terminal_snr():
    ztsnr = schedules.zero_terminal_snr(torch.from_numpy(ALPHAS))
    root = np.sqrt(ALPHAS.astype(np.float64))
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    expected[-1] = 4.8973451890853435e-08
    np.testing.assert_allclose(ztsnr.numpy(), expected, rtol=1e-5, atol=1e-7)
    sigma_max = math.sqrt((1 - np.float32(4.8973451890853435e-08)) / np.float32(4.8973451890853435e-08))
    assert sigma_max == pytest.approx(4518.76, abs=0.01)
    # A final 0 (diffusers' rescale) is replaced the same way, so every schedule starts from a finite sigma.
    with_zero = ztsnr.clone()
    with_zero[-1] = 0.0
    for label in ("Karras", "Exponential", "Uniform", "Beta"):
        actual = schedules.sigmas(with_zero, 10, label)
        assert torch.isfinite(actual).all()
        assert actual[0].item() == pytest.approx(sigma_max, rel=1e-6)
    assert torch.equal(schedules.sigmas(with_zero, 10, "Karras"), schedules.sigmas(ztsnr, 10, "Karras"))


@pytest.mark.parametrize("call, message", [
    (lambda: schedules.sigmas(ALPHAS, 20, "Karras2"), "unknown schedule type 'Karras2'; available: Automatic"),
    (lambda: schedules.sigmas(ALPHAS, 20), "depends on the sampler"),
    (lambda: schedules.sigmas(ALPHAS, 0, "Karras"), "at least 1"),
    (lambda: schedules.sigmas(ALPHAS, 2.5, "Karras"), "whole number"),
    (lambda: schedules.sigmas(ALPHAS, 20, "Karras", family="flux"), "unknown model family 'flux'"),
    (lambda: schedules.sigmas(ALPHAS[::-1].copy(), 20, "Karras"), "decrease"),
    (lambda: schedules.sigmas(ALPHAS[None], 20, "Karras"), "1-D"),
    (lambda: schedules.sigmas(ALPHAS[:500], 4, sampler="LCM"), "1000-step"),
    (lambda: schedules.sampler_schedule("Euler b"), "unknown sampler 'Euler b'; available: DPM\\+\\+ 2M"),
])
def test_errors_name_the_fix(call, message):
    with pytest.raises(InputError, match=message):
        call()
