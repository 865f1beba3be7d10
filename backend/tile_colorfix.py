"""sd-webui-controlnet's `tile_colorfix` and `tile_colorfix+sharp` colour fix, applied to each UNet prediction
during sampling: the predicted clean latent keeps its detail but takes its low frequencies (its colours) from
the control image's latent. `ColorFix` is one unit's fix for a pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def box_blur(latent: torch.Tensor, radius: int) -> torch.Tensor:
    """The mean over a (2 * radius + 1)-square window, edges replicated (sd-webui-controlnet's `blur`)."""
    padded = F.pad(latent, (radius, radius, radius, radius), mode="replicate")
    return F.avg_pool2d(padded, 2 * radius + 1, stride=1)


def clean_from_prediction(prediction: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                          prediction_type: str) -> torch.Tensor:
    """The clean latent x0 a UNet output implies for its input x_t = sqrt(a) x0 + sqrt(1 - a) eps:
    (x_t - sqrt(1 - a) eps) / sqrt(a) for an epsilon model, sqrt(a) x_t - sqrt(1 - a) v for a v model (no
    division: defined at zero terminal SNR's a = 0 too)."""
    if prediction_type == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * prediction
    return (sample - (1 - alpha).sqrt() * prediction) / alpha.sqrt()


def prediction_from_clean(x0: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                          prediction_type: str) -> torch.Tensor:
    """The inverse of `clean_from_prediction`: eps = (x_t - sqrt(a) x0) / sqrt(1 - a),
    v = (sqrt(a) x_t - x0) / sqrt(1 - a)."""
    if prediction_type == "v_prediction":
        return (alpha.sqrt() * sample - x0) / (1 - alpha).sqrt()
    return (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt()


def color_fixed_clean(x0: torch.Tensor, control_latent: torch.Tensor, variation: int, sharpness: float | None = None,
                      conditional: torch.Tensor | None = None) -> torch.Tensor:
    """x0 - blur(x0) + blur(control_latent); with `sharpness`, rows whose `conditional` mark (B, 1, 1, 1) is 0
    (the negative prompt's) then get x0 blurred by sharpness / 100, which CFG turns into sharpening."""
    radius = int(variation)
    x0 = x0 - box_blur(x0, radius) + box_blur(control_latent.to(x0), radius)
    if sharpness is not None:
        detail = float(sharpness) * 0.01
        blurred = detail * box_blur(x0, radius) + (1 - detail) * x0
        mark = torch.ones_like(x0[:, :1, :1, :1]) if conditional is None else conditional.to(x0)
        x0 = mark * x0 + (1 - mark) * blurred
    return x0


def color_fixed_prediction(prediction: torch.Tensor, sample: torch.Tensor, alpha_cumprod: float | torch.Tensor,
                           control_latent: torch.Tensor, variation: int, weight: float, sharpness: float | None = None,
                           conditional: torch.Tensor | None = None, prediction_type: str = "epsilon") -> torch.Tensor:
    """The UNet's prediction (epsilon or v) with the colour fix on the clean latent it implies, mixed in by
    `weight` (clamped to 0-1), computed in float32 and returned in the prediction's dtype.

    sample: the UNet's input x_t (B, 4, h, w); alpha_cumprod: the timestep's cumulative alpha (sd-webui-controlnet
    rounds the timestep first). control_latent: the control image encoded by the VAE and scaled as the latents
    are. variation: the module's threshold_a as an int, doubled in the hires pass. sharpness and conditional:
    `color_fixed_clean`'s. Mixing either parameterization by weight mixes x0 by weight (both are affine in x0
    for a given x_t), so a v model gets exactly what sd-webui-controlnet's eps-space mix gives an eps model."""
    mix = max(0.0, min(1.0, float(weight)))
    if mix == 0:
        return prediction
    out, x_t = prediction.float(), sample.float()
    alpha = torch.as_tensor(alpha_cumprod, dtype=torch.float32, device=out.device)
    x0 = clean_from_prediction(out, x_t, alpha, prediction_type)
    x0 = color_fixed_clean(x0, control_latent.float(), variation, sharpness, conditional)
    fixed = prediction_from_clean(x0, x_t, alpha, prediction_type)
    return (fixed * mix + out * (1 - mix)).to(prediction.dtype)


def color_fixed_noise(noise: torch.Tensor, sample: torch.Tensor, alpha_cumprod: float | torch.Tensor,
                      control_latent: torch.Tensor, variation: int, weight: float,
                      sharpness: float | None = None, conditional: torch.Tensor | None = None) -> torch.Tensor:
    """`color_fixed_prediction` for an epsilon prediction, as sd-webui-controlnet writes it."""
    return color_fixed_prediction(noise, sample, alpha_cumprod, control_latent, variation, weight, sharpness,
                                  conditional)


@dataclass(frozen=True)
class ColorFix:
    """One tile_colorfix unit's fix for a pass: the control image's latent (1, 4, h, w) at the pass's latent
    size, the blur radius (threshold_a, doubled in the hires pass), the unit's weight, +sharp's sharpness
    (threshold_b; None for plain tile_colorfix), and the model's noise schedule and parameterization."""

    control_latent: torch.Tensor
    variation: int
    weight: float
    sharpness: float | None
    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    def alpha_at(self, t) -> float:
        """The cumulative alpha at the UNet's timestep rounded to a whole one, as sd-webui-controlnet takes it
        (k-diffusion samplers call the UNet at fractional timesteps)."""
        step = int(torch.as_tensor(t).detach().float().flatten()[0].round().item())
        return float(self.alphas_cumprod[min(len(self.alphas_cumprod) - 1, max(0, step))])

    def apply(self, prediction: torch.Tensor, sample: torch.Tensor, t, uncond_rows: slice | None) -> torch.Tensor:
        """One UNet call's prediction with the fix (`sample`: its input, an inpainting model's extra channels
        ignored; `uncond_rows`: the negative prompt's rows, which +sharp blurs). Where the conversion is
        undefined (a cumulative alpha of 0 or 1, which no schedule Easel builds has) the prediction is kept."""
        alpha = self.alpha_at(t)
        if not 0.0 < alpha < 1.0:
            return prediction
        conditional = None
        if self.sharpness is not None and uncond_rows is not None:
            conditional = torch.ones(prediction.shape[0], 1, 1, 1, device=prediction.device)
            conditional[uncond_rows] = 0
        return color_fixed_prediction(prediction, sample[:, : prediction.shape[1]], alpha, self.control_latent,
                                      self.variation, self.weight, self.sharpness, conditional,
                                      self.prediction_type)
