"""CFG rescale (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
section 3.4): rescale the guided prediction to the standard deviation of the conditional one, mixed
by phi, so that high CFG scales do not over-expose (most useful with v-prediction and zero-terminal-SNR
models such as Easel's default). Written on Easel's extension API (`guidance` and `after_image`).
"""

from __future__ import annotations

from backend.extensions import Control

TITLE = "CFG rescale"


def register(easel) -> None:
    easel.add_panel(TITLE, [Control("phi", "CFG rescale phi (0: off)", "slider", 0.0, 0.0, 1.0, 0.05)])
    easel.on("guidance", rescale)
    easel.on("after_image", record)


def rescale(event) -> None:
    phi = float(event.args["phi"])
    if phi <= 0:
        return
    dims = tuple(range(1, event.prediction.ndim))
    guided = event.prediction.float()
    wanted = event.cond.float().std(dim=dims, keepdim=True)
    rescaled = guided * (wanted / guided.std(dim=dims, keepdim=True).clamp_min(1e-8))
    event.prediction = (phi * rescaled + (1 - phi) * guided).to(event.prediction.dtype)


def record(event) -> None:
    if float(event.args["phi"]) > 0:
        event.parameters["CFG Rescale phi"] = float(event.args["phi"])
