"""sd-webui-controlnet's `tile_colorfix` and `tile_colorfix+sharp` colour fix, applied to each UNet noise
prediction during sampling: the predicted clean latent keeps its detail but takes its low frequencies (its
colours) from the control image's latent."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def box_blur(latent: torch.Tensor, radius: int) -> torch.Tensor:
    """The mean over a (2 * radius + 1)-square window, edges replicated (sd-webui-controlnet's `blur`)."""
    padded = F.pad(latent, (radius, radius, radius, radius), mode="replicate")
    return F.avg_pool2d(padded, 2 * radius + 1, stride=1)


def color_fixed_noise(noise: torch.Tensor, sample: torch.Tensor, alpha_cumprod: float | torch.Tensor,
                      control_latent: torch.Tensor, variation: int, weight: float,
                      sharpness: float | None = None, conditional: torch.Tensor | None = None) -> torch.Tensor:
    """The noise prediction with the colour fix: the clean latent it implies, x0, becomes
    x0 - blur(x0) + blur(control_latent), and the noise is re-derived from it and mixed in by `weight`
    (clamped to 0-1).

    noise, sample: the UNet's epsilon prediction and its input x_t (B, 4, h, w); alpha_cumprod: the
    timestep's cumulative alpha (sd-webui-controlnet rounds the timestep first). control_latent: the control
    image encoded by the VAE and scaled as the latents are. variation: the module's threshold_a as an int,
    doubled in the hires pass. sharpness (`tile_colorfix+sharp`'s threshold_b): rows whose `conditional`
    mark (B, 1, 1, 1) is 0 (the negative prompt's) get x0 blurred by sharpness / 100, which CFG turns into
    sharpening; `conditional` None marks every row conditional."""
    alpha = torch.as_tensor(alpha_cumprod, dtype=noise.dtype, device=noise.device)
    radius = int(variation)
    # 1. The clean latent the prediction implies, with the control image's low frequencies
    x0 = (sample - (1 - alpha).sqrt() * noise) / alpha.sqrt()
    x0 = x0 - box_blur(x0, radius) + box_blur(control_latent.to(x0), radius)
    # 2. +sharp: a slightly blurred x0 for the negative prompt's rows
    if sharpness is not None:
        detail = float(sharpness) * 0.01
        blurred = detail * box_blur(x0, radius) + (1 - detail) * x0
        mark = torch.ones_like(x0[:, :1, :1, :1]) if conditional is None else conditional.to(x0)
        x0 = mark * x0 + (1 - mark) * blurred
    # 3. Back to a noise prediction, mixed in by the unit's weight
    fixed = (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt()
    mix = max(0.0, min(1.0, float(weight)))
    return fixed * mix + noise * (1 - mix)
