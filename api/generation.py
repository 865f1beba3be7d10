"""txt2img and img2img through the API: a body becomes a `GenerationRequest` (A1111's API defaults,
the options' defaults, per-request `override_settings`, scripts), runs as a job on the device queue,
and its result becomes A1111's response."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from api import controlnet, convert
from api import models as m
from api.access import Caller
from api.context import ApiContext
from backend.errors import InputError, PermissionDeniedError
from backend.job_queue import Job
from backend.options import FOLDER_OPTIONS
from backend.request import GenerationRequest, GenerationResult
from backend.runtime import Runtime, option_name


@dataclass
class Plan:
    """A request and what its `override_settings` keep after it (when not restored afterwards)."""

    request: GenerationRequest
    keep_checkpoint: bool = False
    keep_vae: str | None = None
    keep_options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def plan(api: ApiContext, body: m.Txt2ImgRequest, mode: str, caller: Caller) -> Plan:
    runtime = api.runtime
    values = body.model_dump()
    if body.infotext:
        convert.fill_from_infotext(values, body, str(runtime.manager.placement.device))
    overrides: dict[str, Any] = values["override_settings"]
    option_changes = {key: value for key, value in overrides.items() if option_name(key)}
    if any(option_name(key) in FOLDER_OPTIONS for key in option_changes) and not caller.admin:
        raise PermissionDeniedError("only an admin (--api-admin) may choose output folders")
    this_request = {**convert.sampler_fields(values), **option_changes}  # the body's s_churn... for this one only
    options = runtime.checked(this_request) if this_request else runtime.options
    fields = {**runtime.request_defaults(mode, options=options), **convert.body_fields(values, mode),
              "checkpoint": runtime.manager.selected, **convert.request_overrides(overrides)}
    if "sd_model_checkpoint" in overrides:
        fields["checkpoint"] = runtime.manager.index.resolve_checkpoint(fields["checkpoint"]).filename
    fields.update(scripts(runtime, body, mode))
    if mode == "img2img":
        fields.update(convert.img2img_fields(body))
    result = Plan(convert.build_request(fields))
    runtime.extensions.check_script(result.request)  # an X/Y/Z plot too large is refused before queueing
    result.warnings += [f"override setting '{key}' is not an option Easel knows; ignored" for key in overrides
                        if not option_name(key) and key not in convert.REQUEST_OVERRIDES]
    if not values["override_settings_restore_afterwards"] and overrides:
        if caller.admin:
            result.keep_checkpoint = "sd_model_checkpoint" in overrides
            result.keep_vae = overrides.get("sd_vae")
            result.keep_options = option_changes
        else:
            result.warnings.append("override_settings applied to this request only: only an admin may change "
                                   "the server's settings")
    return result


def scripts(runtime: Runtime, body: m.Txt2ImgRequest, mode: str) -> dict[str, Any]:
    """`script_args` and `script_name` for the request, from `alwayson_scripts` and `script_name`."""
    panels = alwayson_scripts(runtime)
    requested = {name: value for name, value in body.alwayson_scripts.items()
                 if name.lower() != controlnet.SCRIPT_NAME}
    units = [unit for name, value in body.alwayson_scripts.items() if name.lower() == controlnet.SCRIPT_NAME
             for unit in controlnet.units_from_script(value)]
    unknown = [name for name in requested if name.lower() not in panels]
    if unknown:
        raise InputError(f"script not found: {', '.join(unknown)}; alwayson scripts here: "
                         f"{', '.join([*panels, controlnet.SCRIPT_NAME])}")
    script_args = {panels[name.lower()].name: value for name, value in requested.items()}
    script_name = None
    if body.script_name and body.script_name != "None":
        script = runtime.extensions.script(body.script_name)
        if script is None or mode not in script.modes:
            titles = [s.title for s in runtime.extensions.scripts(mode)]
            raise InputError(f"script not found: {body.script_name}; {mode} scripts here: {', '.join(titles) or 'none'}")
        script_name, script_args[script.title] = script.title, list(body.script_args)
    return {"script_args": script_args, "script_name": script_name, "control_units": tuple(units)}


def alwayson_scripts(runtime: Runtime) -> dict[str, Any]:
    """alwayson_scripts names (lowercased panel titles and extension names) -> extension."""
    found = {}
    for extension in runtime.extensions.active:
        if extension.panel is not None:
            found[extension.panel.title.lower()] = extension
            found[extension.name.lower()] = extension
    return found


def submit(api: ApiContext, body: m.Txt2ImgRequest, mode: str, caller: Caller) -> Job:
    """Check the body, then queue its generation; a bad body never reaches the queue."""
    runtime = api.runtime
    planned = plan(api, body, mode, caller)

    def work(control):
        result = runtime.generate(planned.request, control)
        if planned.keep_checkpoint:
            runtime.manager.selected = planned.request.checkpoint
        if planned.keep_vae is not None:
            runtime.manager.set_vae(str(planned.keep_vae))
        if planned.keep_options:
            runtime.apply(planned.keep_options)
        result.warnings.extend(planned.warnings)
        return result

    job = runtime.device.submit(work, caller.name, mode, preview_every=0, checkpoint=planned.request.checkpoint)
    job.request = body  # the result endpoint answers in the shape of the request that made it
    return job


def response(job: Job, body: m.Txt2ImgRequest) -> dict:
    """A finished job's A1111 response (re-raises its error)."""
    result: GenerationResult = job.wait(0)
    images = [convert.encode_png(i.image, i.infotext) for i in result.images] if body.send_images else []
    if isinstance(body, m.Img2ImgRequest) and body.include_init_images and body.send_images:
        images += body.init_images
    parameters = body.model_dump()
    if isinstance(body, m.Img2ImgRequest):
        parameters["init_images"] = None if not body.include_init_images else parameters["init_images"]
        parameters["mask"] = None
    return {"images": images, "parameters": parameters, "info": json.dumps(convert.info(result, job))}
