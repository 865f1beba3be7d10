"""Dynamic thresholding: high CFG scales without burnt, over-saturated images.

Imagen (Saharia et al., 2022) clamps the predicted clean image at each step to a percentile of its
own values and rescales it, instead of letting high guidance push values out of range. In latent
space there is no fixed [-1, 1] range, so the reference comes from the same step guided at a lower
"mimic" CFG scale: per image and channel, the high-CFG prediction of the clean latents is centred,
clamped at its top percentile and rescaled to the mimic prediction's range. Written on Easel's
extension API (the `guidance` and `after_image` events).
"""

from __future__ import annotations

import torch

from backend.extensions import Control

TITLE = "Dynamic thresholding (CFG scale fix)"


def register(easel) -> None:
    easel.add_panel(TITLE, [
        Control("enabled", "Enable dynamic thresholding", "checkbox", False),
        Control("mimic_scale", "Mimic CFG scale (the range to keep)", "slider", 7.0, 1.0, 30.0, 0.5),
        Control("percentile", "Top percentile kept before rescaling", "slider", 0.995, 0.9, 1.0, 0.001),
    ])
    easel.on("guidance", threshold)
    easel.on("after_image", record)


def to_clean(prediction: torch.Tensor, latents: torch.Tensor, alpha_bar: float, kind: str) -> torch.Tensor:
    a, s = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    if kind == "flow":  # latents = a * image + (1 - a) * noise; the prediction is noise - image
        return latents - (1 - a) * prediction
        return a * latents - s * prediction
    return (latents - s * prediction) / a


def from_clean(clean: torch.Tensor, latents: torch.Tensor, alpha_bar: float, kind: str) -> torch.Tensor:
    a, s = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    if kind == "flow":
        return (latents - clean) / (1 - a)
        return (a * latents - clean) / s
    return (latents - a * clean) / s


def threshold(event) -> None:
    args = event.args
    mimic = float(args["mimic_scale"])
    if not args["enabled"] or event.cfg_scale <= mimic:
        return
    kind, alpha_bar = event.prediction_type, event.alpha_bar
    if alpha_bar < 1e-4 and kind not in ("v_prediction", "flow") or alpha_bar > 1 - 1e-6:
        return  # the clean image is not recoverable from an epsilon prediction here
    latents = event.latents.float()
    high = to_clean(event.prediction.float(), latents, alpha_bar, kind)
    reference = to_clean((event.uncond + mimic * (event.cond - event.uncond)).float(), latents, alpha_bar, kind)
    flat_high = high.flatten(2)
    mean = flat_high.mean(dim=2, keepdim=True)
    centred = flat_high - mean
    reference_range = (reference.flatten(2) - reference.flatten(2).mean(dim=2, keepdim=True)).abs().amax(2, True)
    limit = torch.quantile(centred.abs(), float(args["percentile"]), dim=2, keepdim=True)
    limit = torch.maximum(limit, reference_range)
    clamped = centred.clamp(-limit, limit) / limit * reference_range + mean
    clean = clamped.reshape(high.shape)
    event.prediction = from_clean(clean, latents, alpha_bar, kind).to(event.prediction.dtype)


def record(event) -> None:
    if event.args["enabled"]:
        event.parameters["Dynamic thresholding mimic scale"] = float(event.args["mimic_scale"])
        event.parameters["Dynamic thresholding percentile"] = float(event.args["percentile"])
