"""DPM++ 2S a (k-diffusion's `sample_dpmpp_2s_ancestral`) as a diffusers scheduler.

Diffusers has no ancestral single-step DPM-Solver++. It shares everything with DPM2 a except the
second-order update: DPM2 a's midpoint sigma (the log-mean of sigma and sigma_down), its noise
(sigma_up) and its two-evaluation state machine, so it is written as a subclass of diffusers'
`KDPM2AncestralDiscreteScheduler` that replaces that one update.
"""

from __future__ import annotations

import torch
from diffusers import KDPM2AncestralDiscreteScheduler
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class DPMSolverSinglestepAncestralScheduler(KDPM2AncestralDiscreteScheduler):
    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.state_in_first_order:
            # From sigma to the midpoint: the DPM-Solver++ first-order step equals DPM2's Euler step.
            return super().step(model_output, timestep, sample, generator, return_dict)
        index = self.step_index - 1
        sigma, sigma_mid = self.sigmas[index], self.sigmas_interpol[index]
        sigma_up, sigma_down = self.sigmas_up[index], self.sigmas_down[index]
        if self.config.prediction_type == "epsilon":
            denoised = sample - sigma_mid * model_output
        elif self.config.prediction_type == "v_prediction":
            denoised = model_output * (-sigma_mid / (sigma_mid**2 + 1) ** 0.5) + sample / (sigma_mid**2 + 1)
        else:
            raise ValueError(f"prediction_type {self.config.prediction_type} is not supported by DPM++ 2S a")
        # x_next = (sigma_down / sigma) * x - expm1(-h) * denoised(midpoint), h = log(sigma / sigma_down)
        ratio = sigma_down / sigma
        prev_sample = ratio * self.sample + (1 - ratio) * denoised
        self.sample = None
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return KDPM2AncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
