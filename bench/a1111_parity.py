"""Benchmark: how close Easel's images are to A1111 v1.10's, per sampler and schedule type.

Each case is generated from the same seed (CPU noise source) on Easel's default model twice: through
`backend.generation.generate`, and through a reference written here that runs A1111's algorithm on the
same loaded UNet and VAE without Easel's sampler code: k-diffusion's own samplers, CompVis wrappers,
schedules and Brownian trees (0.0.16, the code A1111 pins), A1111's schedule functions, Restart, LCM,
DDIM, DDIM CFG++, PLMS, CFG batching, ImageRNG and 8-bit conversion written out from its source, and
UniPC from the float64 reference in tests/test_unipc.py. Only the prompt encoding is Easel's. The
default model is v-prediction with zero terminal SNR: the reference is A1111 with a "v" model config
and the "Zero Terminal SNR" noise schedule option. The issue's bar: mean <= 0.05 and max <= 1 (0-255).

    .venv/bin/pip install --no-deps k-diffusion==0.0.16     # once; not a project dependency
    OMP_NUM_THREADS=1 python -m bench.a1111_parity [--steps 10] [--size 64] [--only "Euler / Beta"]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backend import conditioning
from backend.generation import generate
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from backend.settings import Settings

PIP_COMMAND = ".venv/bin/pip install --no-deps k-diffusion==0.0.16"
CHECKPOINT = "easel-shapes"
PROMPT, NEGATIVE = "a red house on a hill", "blurry"
LONG_PROMPT = ", ".join(["a red house on a hill with a blue door"] * 16)  # 175 tokens: three chunks
CFG_SCALE = 7.0
ETA_ANCESTRAL, ETA_DDIM = 1.0, 0.0  # A1111's "Eta for ancestral samplers" and "Eta for DDIM" defaults
MEAN_BAR, MAX_BAR = 0.05, 1
V_PREDICTION_NOTE = """
On a v-prediction model Easel departs from A1111 on purpose in two places, both A1111 bugs:
- with zero terminal SNR, A1111's DDIM, DDIM CFG++, PLMS and UniPC turn v into noise with the model's
  original alpha tables (the rescale replaces alphas_cumprod only); Easel uses the rescaled schedule;
- A1111's LCM treats a v-prediction output as noise; Easel converts it.
On an epsilon model (--model tiny-epsilon) every case matches."""

# A1111 v1.10's k-diffusion sampler table (plus Restart and LCM): function, "Automatic" schedule (None: the
# model's own spacing), options (discard_next_to_last_sigma, brownian_noise, solver_type heun).
K_SAMPLERS = {
    "DPM++ 2M": ("sample_dpmpp_2m", "Karras", ""), "DPM++ SDE": ("sample_dpmpp_sde", "Karras", "brownian"),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "Exponential", "brownian"),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", "Exponential", "brownian heun"),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "Karras", ""),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "Exponential", "discard brownian"),
    "Euler a": ("sample_euler_ancestral", None, ""), "Euler": ("sample_euler", None, ""),
    "LMS": ("sample_lms", None, ""), "Heun": ("sample_heun", None, ""),
    "DPM2": ("sample_dpm_2", "Karras", "discard"), "DPM2 a": ("sample_dpm_2_ancestral", "Karras", "discard"),
    "DPM fast": ("sample_dpm_fast", None, ""), "DPM adaptive": ("sample_dpm_adaptive", None, ""),
    "Restart": ("restart", "Karras", ""), "LCM": ("lcm", None, ""),
}
TIMESTEP_SAMPLERS = ("DDIM", "DDIM CFG++", "PLMS", "UniPC")
SAMPLERS = (*list(K_SAMPLERS)[:-1], *TIMESTEP_SAMPLERS, "LCM")  # A1111's order
AYS_SIGMAS = {  # A1111's Align Your Steps lists (10 steps)
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


@dataclass(frozen=True)
class Case:
    label: str
    sampler: str
    schedule: str = "Automatic"
    prompt: str = PROMPT
    batch: int = 1


def all_cases() -> list[Case]:
    cases = [Case(f"{name} / Automatic", name) for name in SAMPLERS]
    cases += [Case(f"DPM++ 2M / {s}", "DPM++ 2M", s) for s in ("Karras", "Exponential", "Uniform")]
    cases += [Case(f"Euler / {s}", "Euler", s) for s in ("SGM Uniform", "Polyexponential", "KL Optimal",
                                                        "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")]
    cases.append(Case("DPM++ 2M / 3-chunk prompt", "DPM++ 2M", prompt=LONG_PROMPT))
    cases.append(Case("Euler a / batch of 2", "Euler a", batch=2))
    return cases


# -- k-diffusion, without its package __init__ ----------------------------------------------------------


def load_k_diffusion():
    """k_diffusion.sampling and .external imported one by one (the package __init__ imports training
    libraries); torchdiffeq, which only its log_likelihood uses, is stubbed when missing."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        sys.exit(f"k-diffusion is not installed; the reference needs it: {PIP_COMMAND}")
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    if importlib.util.find_spec("torchdiffeq") is None:
        stub = types.ModuleType("torchdiffeq")
        stub.odeint = None
        sys.modules.setdefault("torchdiffeq", stub)
    return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")


class ImageRNG:
    """A1111's ImageRNG, CPU source, and its TorchHijack: one generator per image seeded by its seed; the
    first draw is the initial noise, every later one (k-diffusion's `torch.randn_like`, DDIM's and
    Restart's noise) continues it. Anything else asked of it is torch's."""

    def __init__(self, shape: tuple[int, ...], seeds: list[int]):
        self.shape = shape
        self.generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]

    def next(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])

    def randn_like(self, x):
        return self.next()

    def __getattr__(self, item):
        return getattr(torch, item)


@contextlib.contextmanager
def a1111_patches(ks, rng: ImageRNG):
    """What A1111 patches while it samples: k-diffusion's `torch` (TorchHijack), its `to_d`
    (sd_schedulers), and torchsde's normals (sd_samplers_common: randn_local on the CPU source)."""
    import torchsde._brownian.brownian_interval as interval

    saved = ks.torch, ks.to_d, interval._randn
    ks.torch = rng
    ks.to_d = lambda x, sigma, denoised: (x - denoised) / sigma
    interval._randn = lambda size, dtype, device, seed: torch.randn(
        size, generator=torch.Generator("cpu").manual_seed(int(seed))).to(device=device, dtype=dtype)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Should have t", module="torchsde")
            yield
    finally:
        ks.torch, ks.to_d, interval._randn = saved


# -- the model as A1111's LDM code sees it ----------------------------------------------------------------


class LdmModel:
    """What A1111's samplers read from an LDM model: `alphas_cumprod` (float32 of the float64 cumprod),
    rescaled in place by A1111's "Zero Terminal SNR" option (sd_models.rescale_zero_terminal_snr_abar);
    the register_schedule buffers, which that option leaves alone; `apply_model`; and A1111's
    CompVisTimesteps(V)Denoiser, the noise at a whole timestep for DDIM, PLMS and UniPC."""

    def __init__(self, model):
        config = model.scheduler_config
        if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise ValueError("the reference builds the LDM 'linear' (diffusers 'scaled_linear') schedule only")
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5,
                               config["num_train_timesteps"], dtype=torch.float64) ** 2
        original = np.cumprod(1.0 - betas.numpy(), axis=0)
        self.sqrt_alphas_cumprod = torch.tensor(np.sqrt(original), dtype=torch.float32)
        self.sqrt_one_minus_alphas_cumprod = torch.tensor(np.sqrt(1.0 - original), dtype=torch.float32)
        self.alphas_cumprod = torch.tensor(original, dtype=torch.float32)
        if config.get("rescale_betas_zero_snr"):
            root = self.alphas_cumprod.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            root -= last
            root *= first / (first - last)
            self.alphas_cumprod = root**2
            self.alphas_cumprod[-1] = 4.8973451890853435e-08
        self.v = config.get("prediction_type") == "v_prediction"
        self.unet = model.unet

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=torch.cat(cond["c_crossattn"], 1)).sample

    def timestep_eps(self, x, t, cond):
        out = self.apply_model(x, t, cond)
        if not self.v:
            return out
        index = t.to(torch.int)
        return (self.sqrt_alphas_cumprod[index, None, None, None] * out
                + self.sqrt_one_minus_alphas_cumprod[index, None, None, None] * x)


class CFGDenoiser:
    """A1111's CFGDenoiser for one subprompt per image: cond rows then uncond rows in one call when the
    token lengths match; else the cond rows (two batches' worth per call), then the uncond rows."""

    def __init__(self, inner, cond: torch.Tensor, uncond: torch.Tensor, cond_scale: float):
        self.inner, self.cond, self.uncond, self.cond_scale = inner, cond, uncond, cond_scale
        self.multiplier = 1.0  # DDIM CFG++: 1 / 12.5
        self.last_uncond = None

    def __call__(self, x, sigma, **_):
        n = x.shape[0]
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        if self.cond.shape[1] == self.uncond.shape[1]:
            x_out = self.inner(x_in, sigma_in, cond={"c_crossattn": [torch.cat([self.cond, self.uncond])]})
        else:
            x_out = torch.zeros_like(x_in)
            for a in range(0, n, 2 * n):
                b = min(a + 2 * n, n)
                x_out[a:b] = self.inner(x_in[a:b], sigma_in[a:b], cond={"c_crossattn": [self.cond[a:b]]})
            x_out[-n:] = self.inner(x_in[-n:], sigma_in[-n:], cond={"c_crossattn": [self.uncond]})
        self.last_uncond = x_out[-n:].clone()
        denoised = x_out[-n:].clone()
        for i in range(n):
            denoised[i] += (x_out[i] - x_out[-n:][i]) * (1.0 * (self.cond_scale * self.multiplier))
        return denoised


def lcm_denoiser_class(kx, ks):
    """A1111's LCMCompVisDenoiser: k-diffusion's eps wrapper over every 20th entry of alphas_cumprod,
    whole timesteps, LCM's boundary scalings (the model output is taken as eps, whatever the model)."""

    class LCMCompVisDenoiser(kx.DiscreteEpsDDPMDenoiser):
        def __init__(self, ldm, timesteps=1000, original_timesteps=50):
            self.skip_steps = timesteps // original_timesteps
            valid = torch.zeros(original_timesteps, dtype=torch.float32)
            for x in range(original_timesteps):
                valid[original_timesteps - 1 - x] = ldm.alphas_cumprod[timesteps - 1 - x * self.skip_steps]
            super().__init__(ldm, valid, quantize=None)

        def get_sigmas(self, n=None):
            start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
            return ks.append_zero(self.t_to_sigma(torch.linspace(start, end, n)))

        def sigma_to_t(self, sigma, quantize=None):
            dists = sigma.log() - self.log_sigmas[:, None]
            return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip_steps + (self.skip_steps - 1)

        def t_to_sigma(self, timestep):
            t = torch.clamp(((timestep - (self.skip_steps - 1)) / self.skip_steps).float(), min=0,
                            max=len(self.sigmas) - 1)
            return super().t_to_sigma(t)

        def forward(self, input, sigma, **kwargs):
            c_out, c_in = [kx.utils.append_dims(v, input.ndim) for v in self.get_scalings(sigma)]
            eps = self.inner_model.apply_model(input * c_in, self.sigma_to_t(sigma), **kwargs)
            scaled = kx.utils.append_dims(self.sigma_to_t(sigma), input.ndim) * 10.0
            c_skip, c_scale = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
            return c_scale * (input + eps * c_out) + c_skip * input

    return LCMCompVisDenoiser


# -- A1111's schedules (sd_schedulers) ------------------------------------------------------------------


def align_your_steps(n: int, family: str) -> torch.Tensor:
    sigmas = list(AYS_SIGMAS["sdxl" if family == "sdxl" else "sd1"])
    if n == len(sigmas):
        return torch.FloatTensor([*sigmas, 0.0])
    log_interp = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(sigmas)), np.log(sigmas[::-1]))
    return torch.FloatTensor(np.append(np.exp(log_interp)[::-1].copy(), [0.0]))


def get_sigmas(ks, wrap, automatic: str | None, discard: bool, schedule: str, steps: int, family: str):
    """A1111's KDiffusionSampler.get_sigmas and sd_schedulers: "Automatic" is the sampler's schedule or the
    model's own spacing (uniform); schedules get the model's range as Python floats and its table through
    the k-diffusion wrapper; the penultimate sigma may be dropped."""
    n = steps + (1 if discard else 0)
    label = automatic if schedule == "Automatic" else schedule
    low, high, table = wrap.sigmas[0].item(), wrap.sigmas[-1].item(), wrap.sigmas
    if label in (None, "Uniform"):
        sigmas = wrap.get_sigmas(n)
    elif label in ("Karras", "Exponential", "Polyexponential"):
        sigmas = getattr(ks, f"get_sigmas_{label.lower()}")(n=n, sigma_min=low, sigma_max=high)
    elif label in ("Normal", "SGM Uniform"):
        start, end = wrap.sigma_to_t(torch.tensor(high)), wrap.sigma_to_t(torch.tensor(low))
        ts = torch.linspace(start, end, n + 1)[:-1] if label == "SGM Uniform" else torch.linspace(start, end, n)
        sigmas = torch.FloatTensor([wrap.t_to_sigma(t) for t in ts] + [0.0])
    elif label == "KL Optimal":  # no 0 appended: it ends at sigma_min
        angle_min, angle_max = torch.arctan(torch.tensor(low)), torch.arctan(torch.tensor(high))
        indices = torch.arange(n + 1)
        sigmas = torch.tan(indices / n * angle_min + (1.0 - indices / n) * angle_max)
    elif label == "Align Your Steps":
        sigmas = align_your_steps(n, family)
    elif label == "Simple":
        stride = len(table) / n
        sigmas = torch.FloatTensor([float(table[-(1 + int(x * stride))]) for x in range(n)] + [0.0])
    elif label == "DDIM":
        sigmas = torch.FloatTensor([float(s) for s in table[1 :: max(len(table) // n, 1)]][::-1] + [0.0])
    else:  # Beta, with A1111's default alpha = beta = 0.6
        from scipy import stats

        quantiles = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        sigmas = torch.FloatTensor([low + x * (high - low) for x in quantiles] + [0.0])
    return (torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas).cpu()


# -- samplers k-diffusion does not have (sd_samplers_extra, sd_samplers_lcm, sd_samplers_timesteps_impl) --


def sample_restart(ks, model, x, sigmas, extra_args=None, disable=None, s_noise=1.0):
    """A1111's Restart: Heun steps; from 20 steps a shorter Karras schedule makes room for restarts
    around sigma 0.1, each re-noised from the images' generators."""
    s_in, steps, restarts = x.new_ones([x.shape[0]]), sigmas.shape[0] - 1, {}
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = ks.get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
        restarts = {0.1: [restart_steps + 1, restart_times, 2]}
    restarts = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restarts.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts:
            restart_steps, restart_times, restart_max = restarts[i + 1]
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < i + 1:
                again = ks.get_sigmas_karras(restart_steps, sigmas[i + 1].item(), sigmas[max_idx].item())[:-1]
                step_list.extend(list(zip(again[:-1], again[1:])) * restart_times)
    last_sigma = None
    for old, new in step_list:
        if last_sigma is not None and last_sigma < old:
            x = x + ks.torch.randn_like(x) * s_noise * (old**2 - last_sigma**2) ** 0.5
        d = ks.to_d(x, old, model(x, old * s_in))
        if new == 0:
            x = x + d * (new - old)
        else:
            x_2 = x + d * (new - old)
            x = x + (d + ks.to_d(x_2, new, model(x_2, new * s_in))) / 2 * (new - old)
        last_sigma = new
    return x


def sample_lcm(ks, model, x, sigmas, extra_args=None, disable=None, noise_sampler=None):
    noise_sampler = ks.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


def sample_timesteps(sampler: str, cfg: CFGDenoiser, x, timesteps, alphas_cumprod, rng: ImageRNG):
    """A1111's ddim, ddim_cfgpp and plms, down the timesteps from the last: CFG++ guides at CFG / 12.5 and
    points x_t along the negative prompt's noise; PLMS starts with a pseudo improved Euler step, then
    Adams-Bashforth of orders 2, 3, 4 over the past noises."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    a, a_prev = alphas.double().numpy(), alphas_prev.numpy()
    sigmas = ETA_DDIM * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    cfg.multiplier = 1 / 12.5 if sampler == "DDIM CFG++" else 1.0
    s_in, s_x = x.new_ones(x.shape[0]), x.new_ones((x.shape[0], 1, 1, 1))

    def step(x, e_t, index, direction):
        a_t, a_prev, sigma_t = (v[index].item() * s_x for v in (alphas, alphas_prev, sigmas))
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * s_x * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma_t**2).sqrt() * direction

    old_eps = []
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = cfg(x, timesteps[index].item() * s_in)
        if sampler != "PLMS":
            noise = sigmas[index].item() * s_x * rng.next()
            x = step(x, e_t, index, cfg.last_uncond if sampler == "DDIM CFG++" else e_t) + noise
            continue
        if not old_eps:
            e_next = cfg(step(x, e_t, index, e_t), timesteps[max(index - 1, 0)].item() * s_in)
            e_prime = (e_t + e_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = step(x, e_prime, index, e_prime)
        old_eps = [*old_eps, e_t][-3:]
    return x


def sample_unipc(cfg: CFGDenoiser, x, timesteps, alphas_cumprod):
    """A1111's defaults (bh1, time_uniform, order 3, lower order final), one model time per timestep."""
    from tests.test_unipc import reference_unipc

    def eps(x64: np.ndarray, t_input: float) -> np.ndarray:
        x32 = torch.from_numpy(x64).float()
        return cfg(x32, torch.full((x32.shape[0],), float(np.float32(t_input)))).double().numpy()

    return torch.from_numpy(reference_unipc(x, alphas_cumprod, len(timesteps), eps=eps)).float()


# -- the two pipelines -------------------------------------------------------------------------------


class Reference:
    """A1111's txt2img on Easel's loaded modules: noise, sampling, decoding, 8 bits."""

    def __init__(self, model, ks, kx):
        self.model, self.ks, self.kx, self.ldm = model, ks, kx, LdmModel(model)
        self.lcm_class = lcm_denoiser_class(kx, ks)

    def images(self, case: Case, steps: int, size: int, seed: int) -> list[np.ndarray]:
        model, seeds = self.model, [seed + i for i in range(case.batch)]
        encoded = conditioning.encode_for_generation(model, case.prompt, NEGATIVE, steps)
        cond = conditioning.Conditioning.at(encoded.positive[0][1], 0).context[None].repeat(case.batch, 1, 1)
        uncond = conditioning.Conditioning.at(encoded.negative, 0).context[None].repeat(case.batch, 1, 1)
        f = model.vae_scale_factor
        rng = ImageRNG((model.vae.config.latent_channels, size // f, size // f), seeds)
        noise = rng.next()
        with torch.no_grad(), a1111_patches(self.ks, rng):
            if case.sampler in TIMESTEP_SAMPLERS:
                latents = self._timesteps(case.sampler, cond, uncond, noise, steps, rng)
            else:
                latents = self._k(case, noise, seeds, cond, uncond, steps)
            return [self._decode(latents[i : i + 1]) for i in range(len(latents))]  # one at a time, as A1111

    def _k(self, case: Case, noise, seeds, cond, uncond, steps):
        """A1111's KDiffusionSampler.sample: x = noise * sigmas[0], then the function with what its
        signature asks for (eta, n, the model's sigma range, sigmas), a Brownian tree seeded by the seeds."""
        ks, kx, ldm = self.ks, self.kx, self.ldm
        name, automatic, options = K_SAMPLERS[case.sampler]
        if case.sampler == "LCM":
            wrap = self.lcm_class(ldm)
        else:
            wrap = (kx.CompVisVDenoiser if ldm.v else kx.CompVisDenoiser)(ldm, quantize=False)
        func = {"restart": functools.partial(sample_restart, ks),
                "lcm": functools.partial(sample_lcm, ks)}.get(name) or getattr(ks, name)
        sigmas = get_sigmas(ks, wrap, automatic, "discard" in options, case.schedule, steps, self.model.family)
        x = noise * sigmas[0]
        parameters, kwargs = inspect.signature(func).parameters, {}
        if "eta" in parameters:
            kwargs["eta"] = ETA_ANCESTRAL
        if "n" in parameters:
            kwargs["n"] = steps
        if "sigma_min" in parameters:
            kwargs.update(sigma_min=wrap.sigmas[0].item(), sigma_max=wrap.sigmas[-1].item())
        if "sigmas" in parameters:
            kwargs["sigmas"] = sigmas
        if "brownian" in options:
            kwargs["noise_sampler"] = ks.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
        if "heun" in options:
            kwargs["solver_type"] = "heun"
        return func(CFGDenoiser(wrap, cond, uncond, CFG_SCALE), x, extra_args={}, disable=True, **kwargs)

    def _timesteps(self, sampler: str, cond, uncond, noise, steps: int, rng: ImageRNG):
        """A1111's CompVisSampler.sample: unit noise, timesteps 1, 1 + 1000 // steps, ..."""
        timesteps = torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)
        cfg = CFGDenoiser(self.ldm.timestep_eps, cond, uncond, CFG_SCALE)
        if sampler == "UniPC":
            return sample_unipc(cfg, noise, timesteps, self.ldm.alphas_cumprod)
        return sample_timesteps(sampler, cfg, noise, timesteps, self.ldm.alphas_cumprod, rng)

    def _decode(self, latents) -> np.ndarray:
        vae = self.model.vae
        pixels = vae.decode((1.0 / vae.config.scaling_factor) * latents.to(vae.dtype)).sample.float()
        unit = torch.clamp((pixels + 1.0) / 2.0, min=0.0, max=1.0)[0]
        return (255.0 * np.moveaxis(unit.cpu().numpy(), 0, 2)).astype(np.uint8)


def easel_images(manager: ModelManager, case: Case, steps: int, size: int, seed: int) -> list[np.ndarray]:
    request = GenerationRequest(prompt=case.prompt, negative_prompt=NEGATIVE, steps=steps, sampler=case.sampler,
                                schedule_type=case.schedule, cfg_scale=CFG_SCALE, width=size, height=size,
                                seed=seed, batch_size=case.batch, randn_source="CPU", save_images=False)
    return [np.array(image.image) for image in generate(manager, request).images]


def difference(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, int]:
    diff = np.abs(np.stack(a).astype(np.int16) - np.stack(b).astype(np.int16))
    return float(diff.mean()), int(diff.max())


def open_model(kind: str):
    """(manager, loaded model): the embedded default model, or a tiny epsilon SD 1.x file made here."""
    if kind == "default":
        manager = ModelManager(Settings(data_dir=Path(__file__).resolve().parents[1]))
        return manager, manager.activate(CHECKPOINT)
    import tempfile

    from backend import random_models
    from backend.clip_tokenizer import ensure_vocabulary_files

    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="easel-parity-")))
    ensure_vocabulary_files(settings.cache_dir)
    folder = settings.model_dir("checkpoints")
    folder.mkdir(parents=True)
    random_models.save_original(random_models.build("sd1", seed=1), folder / "tiny-epsilon.safetensors")
    manager = ModelManager(settings)
    return manager, manager.activate("tiny-epsilon")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", metavar="NAME", help="run one case, by its label (e.g. 'Euler / Beta')")
    parser.add_argument("--model", choices=("default", "tiny-epsilon"), default="default",
                        help="default: the embedded model (v-prediction, zero terminal SNR); tiny-epsilon: an SD "
                             "1.x-layout epsilon model with random weights, written to a temporary folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = all_cases()
    if args.only:
        cases = [c for c in cases if c.label.lower() == args.only.strip().lower()]
        if not cases:
            sys.exit(f"no case named {args.only!r}; cases: {', '.join(c.label for c in all_cases())}")
    ks, kx = load_k_diffusion()
    start = time.perf_counter()
    manager, model = open_model(args.model)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # after its import: the long prompt's token count
    reference, calls = Reference(model, ks, kx), [0]
    model.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    print(f"{model.name} ({model.prediction_type}), {args.size}x{args.size}, {args.steps} steps, CFG {CFG_SCALE}, "
          f"seed {args.seed}, CPU noise, k-diffusion {importlib.metadata.version('k-diffusion')}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print(f"{'case':34}{'mean':>8}{'max':>6}   UNet calls (Easel / reference)")
    within = 0
    for case in cases:
        counts = [calls[0]]
        ours = easel_images(manager, case, args.steps, args.size, args.seed)
        counts.append(calls[0])
        theirs = reference.images(case, args.steps, args.size, args.seed)
        our_calls, their_calls = counts[1] - counts[0], calls[0] - counts[1]
        mean, top = difference(ours, theirs)
        ok = mean <= MEAN_BAR and top <= MAX_BAR
        within += ok
        print(f"{case.label:34}{mean:>8.3f}{top:>6}   {our_calls:>4} / {their_calls:<4}{'' if ok else '  over'}",
              flush=True)
    seeds = [easel_images(manager, Case("", "DPM++ 2M"), args.steps, args.size, args.seed + i)[0] for i in (0, 1)]
    print("\ntwo different seeds differ by {:.3f} / {} (mean / max, DPM++ 2M, seeds {} and {})".format(
        *difference([seeds[0]], [seeds[1]]), args.seed, args.seed + 1))
    print(f"{within} of {len(cases)} cases within mean <= {MEAN_BAR} and max <= {MAX_BAR}; "
          f"{time.perf_counter() - start:.0f} s")
    if model.prediction_type == "v_prediction":
        print(V_PREDICTION_NOTE)


if __name__ == "__main__":
    main()
