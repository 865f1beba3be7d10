"""The payloads of the extension events (see `backend.extensions`): one small dataclass per event,
whose documented fields a callback reads and may replace. Extensions import them from `backend.extensions`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass
class BeforeGeneration:
    request: Any  # backend.request.GenerationRequest; replace it to change the generation
    args: dict[str, Any]  # this extension's panel values for the request


@dataclass
class Step:
    step: int  # 1-based, within the current pass
    steps: int
    timestep: float
    latents: Any  # torch.Tensor (batch, channels, h, w); replace it to change sampling
    request: Any
    args: dict[str, Any]
    stop: bool = False  # set to end this pass's sampling after this step


@dataclass
class Guidance:
    step: int  # 0-based step index
    steps: int
    timestep: float
    cond: Any  # torch.Tensor: the prediction with the (weighted sum of) prompt(s)
    uncond: Any  # torch.Tensor: the prediction with the negative prompt
    prediction: Any  # torch.Tensor: uncond + cfg_scale * (cond - uncond); replace it to change guidance
    cfg_scale: float
    # "epsilon" or "v_prediction"; "flow" for FLUX.1 / SD 3.x: the prediction is the velocity noise - image and
    # the latents are (1 - sigma) * image + sigma * noise
    prediction_type: str
    # the squared weight of the image in the latents: the cumulative alpha; (1 - sigma)^2 for a flow
    alpha_bar: float
    latents: Any  # the model input latents of this step (unscaled)
    args: dict[str, Any]


@dataclass
class AfterImage:
    image: Image.Image  # replace it to change the saved image
    index: int  # position in the whole job
    seed: int
    prompt: str
    request: Any
    parameters: dict[str, Any]  # add infotext entries here ({"My key": value})
    args: dict[str, Any]

