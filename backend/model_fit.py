"""Fitting a request to the loaded model: the sizes its family takes (the native size where the request leaves it
0) and the schedule type the family runs the sampler with, checked before any denoising."""

from __future__ import annotations

from backend import hires, schedules
from backend.request import GenerationRequest, RequestError, check_dimension


def check_sizes(model, request: GenerationRequest, hires_plan) -> tuple[int, int]:
    """The first pass's size (the checkpoint's native size where the request leaves it 0), checked,
    and the hires fix's target size, checked too."""
    width = request.width or model.native_size
    height = request.height or model.native_size
    multiple, label = model.engine.size_multiple, model.label
    check_dimension("width", width, multiple, label)
    check_dimension("height", height, multiple, label)
    model.engine.check_size(model, width, height)
    if hires_plan is not None:
        hires_plan.size = hires.target_size(request.with_changes(width=width, height=height))
        check_dimension("hires width", hires_plan.size[0], multiple, label)
        check_dimension("hires height", hires_plan.size[1], multiple, label)
        model.engine.check_size(model, *hires_plan.size)
    return width, height


def fit_plan(model, plan, request: GenerationRequest):
    """The plan's schedule type as the model's family runs the sampler (flows: "Automatic" is "Simple", and
    only the samplers sound on a flow)."""
    if model.engine.prediction == "flow" and request.control_units:  # the enabled units
        raise RequestError(f"ControlNet, T2I-Adapter and IP-Adapter units work with SD 1.x, SD 2.x and SDXL "
                           f"checkpoints; Easel has none for {model.label} yet: turn the units off")
    requested = schedules.schedule_label(request.schedule_type)
    plan.schedule = model.engine.schedule_for(plan.sampler.name, requested, plan.schedule)
    if plan.hires is not None:
        model.engine.schedule_for(plan.hires.sampler.name, requested, plan.schedule)
    return plan
