"""Request and response conversion: A1111 API bodies -> `GenerationRequest` / `ExtrasRequest`, and
results -> A1111's response fields (`info`, base64 PNGs, job status)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from api import models as m
from backend import infotext, outputs, sampler_settings, samplers
from backend.errors import InputError
from backend.hires import SAME_SAMPLER
from backend.images import MASKED_CONTENT, RESIZE_MODES
from backend.job_queue import FAILED, DeviceQueue, Job
from backend.postprocess import ExtrasRequest
from backend.request import GenerationRequest, GenerationResult
from backend.samplers import SCHEDULE_TYPES
from backend.version import INFOTEXT_VERSION

# A1111's scheduler names (the API's `scheduler` field) -> Easel's schedule type labels.
SCHEDULER_NAMES = {label.lower().replace(" ", "_"): label for label in SCHEDULE_TYPES}
# override_settings keys applied to the request itself -> (GenerationRequest field, type).
REQUEST_OVERRIDES = {"sd_model_checkpoint": ("checkpoint", str), "sd_vae": ("vae", str),
                     "CLIP_stop_at_last_layers": ("clip_skip", int)}
# infotext field -> API body field, for A1111's `infotext` request field
_INFOTEXT_FIELDS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler_name",
    "schedule_type": "scheduler", "cfg_scale": "cfg_scale", "distilled_cfg_scale": "distilled_cfg_scale",
    "shift": "shift", "seed": "seed", "width": "width", "height": "height",
    "subseed": "subseed", "subseed_strength": "subseed_strength", "denoising_strength": "denoising_strength",
    "enable_hr": "enable_hr", "hr_scale": "hr_scale", "hr_upscaler": "hr_upscaler",
    "hr_second_pass_steps": "hr_second_pass_steps", "hr_resize_x": "hr_resize_x", "hr_resize_y": "hr_resize_y",
    "hr_sampler": "hr_sampler_name", "hr_prompt": "hr_prompt", "hr_negative_prompt": "hr_negative_prompt",
    "restore_faces": "restore_faces",
}


def decode_image(data: str, what: str) -> Image.Image:
    """A base64 image (with or without a `data:image/...;base64,` prefix)."""
    if not isinstance(data, str) or not data:
        raise InputError(f"{what} is empty: send a base64-encoded PNG or JPEG")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{what} is not an image Easel can read ({error})") from None
    return image


def encode_png(image: Image.Image, text: str | None, chunks: dict[str, str] | None = None) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=outputs.png_info(text, chunks))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def schedule_label(name: str | None) -> str:
    if not name:
        return samplers.AUTOMATIC
    return SCHEDULER_NAMES.get(name.strip().lower(), name)


def fill_from_infotext(values: dict, body: m.Txt2ImgRequest, device: str = "cpu") -> None:
    """A1111's `infotext` field: parameters of a PNG fill the fields this request did not set (the
    noise source, as A1111 does, through `override_settings`)."""
    parameters = infotext.parse_infotext(body.infotext or "")
    parsed = infotext.request_fields(parameters, device)
    for field_name, api_name in _INFOTEXT_FIELDS.items():
        if field_name in parsed and api_name not in body.model_fields_set:
            values[api_name] = parsed[field_name]
    settings = {option: parsed[field_name] for field_name, option in (
        ("clip_skip", "CLIP_stop_at_last_layers"), ("randn_source", "randn_source"),
        ("eta_noise_seed_delta", "eta_noise_seed_delta"), ("use_old_scheduling", "use_old_scheduling"))
        if field_name in parsed}
    settings.update(sampler_settings.from_infotext(parameters))  # Eta, Sigma churn, Schedule rho, UniPC...
    values["override_settings"] = {**settings, **values["override_settings"]}


def sampler_fields(values: dict) -> dict[str, Any]:
    """A1111's body fields s_churn, s_tmax, s_tmin, s_noise: settings for this request, under the
    `override_settings` that name them."""
    return {name: values[name] for name in ("s_churn", "s_tmax", "s_tmin", "s_noise")
            if values[name] is not None and name not in values["override_settings"]}


def body_fields(values: dict, mode: str) -> dict[str, Any]:
    """`GenerationRequest` fields from a txt2img/img2img body's values (after `infotext` filled them)."""
    fields: dict[str, Any] = dict(
        prompt=values["prompt"], negative_prompt=values["negative_prompt"], styles=tuple(values["styles"]),
        seed=values["seed"], subseed=values["subseed"], subseed_strength=values["subseed_strength"],
        seed_resize_from_w=max(0, values["seed_resize_from_w"]), seed_resize_from_h=max(0, values["seed_resize_from_h"]),
        sampler=values["sampler_name"] or values["sampler_index"], schedule_type=schedule_label(values["scheduler"]),
        batch_size=values["batch_size"], batch_count=values["n_iter"], steps=values["steps"],
        cfg_scale=values["cfg_scale"], distilled_cfg_scale=values["distilled_cfg_scale"], shift=values["shift"],
        width=values["width"], height=values["height"],
        restore_faces=bool(values["restore_faces"]), save_images=values["save_images"], eta=values["eta"],
    )
    if values["denoising_strength"] is not None:
        fields["denoising_strength"] = values["denoising_strength"]
    if mode == "txt2img" and values["enable_hr"]:
        fields.update(enable_hr=True, hr_scale=values["hr_scale"], hr_upscaler=values["hr_upscaler"] or "Latent",
                      hr_second_pass_steps=values["hr_second_pass_steps"], hr_resize_x=values["hr_resize_x"],
                      hr_resize_y=values["hr_resize_y"], hr_prompt=values["hr_prompt"],
                      hr_negative_prompt=values["hr_negative_prompt"],
                      hr_sampler=values["hr_sampler_name"] or SAME_SAMPLER)
    return fields


def request_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The `override_settings` that set request fields directly, type-checked."""
    fields = {}
    for key, (name, kind) in REQUEST_OVERRIDES.items():
        if key in overrides:
            value = overrides[key]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)) or \
                    kind is str and not isinstance(value, str):
                raise InputError(f"override_settings.{key} takes a {kind.__name__}, not {value!r}")
            fields[name] = value
    return fields


def img2img_fields(body: m.Img2ImgRequest) -> dict:
    if not body.init_images:
        raise InputError("init_images is empty: img2img needs one base64 image")
    if not 0 <= body.resize_mode <= 3:
        raise InputError(f"resize_mode must be 0-3, not {body.resize_mode}")
    if not 0 <= body.inpainting_fill < len(MASKED_CONTENT):
        raise InputError(f"inpainting_fill must be 0-3, not {body.inpainting_fill}")
    fields = dict(init_image=decode_image(body.init_images[0], "init_images[0]").convert("RGB"),
                  resize_mode=RESIZE_MODES[body.resize_mode if body.resize_mode < 3 else 0])
    if body.mask:
        fields.update(mask=decode_image(body.mask, "mask"), mask_blur=body.mask_blur,
                      masked_content=MASKED_CONTENT[body.inpainting_fill],
                      inpaint_area="Only masked" if body.inpaint_full_res else "Whole picture",
                      only_masked_padding=body.inpaint_full_res_padding,
                      invert_mask=bool(body.inpainting_mask_invert))
    return fields


def build_request(fields: dict[str, Any]) -> GenerationRequest:
    try:
        request = GenerationRequest(**fields)
    except TypeError as error:
        raise InputError(str(error)) from None
    request.validate()
    return request


def info(result: GenerationResult, job: Job) -> dict:
    """A1111's `info` object of a generation response, plus Easel's `job_id`, `warnings` and `notes`."""
    run, images = result.request, result.images
    first = infotext.parse_infotext(images[0].infotext) if images else {}
    return {
        "prompt": images[0].prompt if images else run.prompt, "all_prompts": [i.prompt for i in images],
        "negative_prompt": images[0].negative_prompt if images else run.negative_prompt,
        "all_negative_prompts": [i.negative_prompt for i in images],
        "seed": images[0].seed if images else run.seed, "all_seeds": [i.seed for i in images],
        "subseed": images[0].subseed if images else run.subseed, "all_subseeds": [i.subseed for i in images],
        "subseed_strength": run.subseed_strength, "width": run.width, "height": run.height,
        "sampler_name": first.get("Sampler", run.sampler), "scheduler": first.get("Schedule type"),
        "cfg_scale": run.cfg_scale, "distilled_cfg_scale": run.distilled_cfg_scale, "steps": run.steps, "batch_size": run.batch_size,
        "restore_faces": run.restore_faces, "face_restoration_model": run.face_restorer if run.restore_faces else None,
        "sd_model_name": first.get("Model"), "sd_model_hash": first.get("Model hash"),
        "sd_vae_name": first.get("VAE"), "sd_vae_hash": first.get("VAE hash"),
        "seed_resize_from_w": run.seed_resize_from_w or -1, "seed_resize_from_h": run.seed_resize_from_h or -1,
        "denoising_strength": run.denoising_strength if run.init_image is not None or run.enable_hr else None,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [i.infotext for i in images], "styles": list(run.styles),
        "job_timestamp": dt.datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
        "clip_skip": run.clip_skip, "is_using_inpainting_conditioning": False,
        "version": INFOTEXT_VERSION, "job_id": job.id, "interrupted": result.interrupted,
        "warnings": result.warnings, "notes": result.notes,
    }


def job_status(job: Job, device: DeviceQueue) -> dict:
    progress = job.progress
    result = job.result if isinstance(job.result, GenerationResult) else None
    return {"id": job.id, "kind": job.kind, "status": job.status, "position": device.position(job),
            "queue_length": device.queue_length, "progress": job.fraction, "eta_relative": job.eta,
            "step": progress.step if progress else None, "steps": progress.steps if progress else None,
            "error": str(job.error) if job.status == FAILED else None,
            "images": len(result.images) if result else None, "warnings": list(result.warnings) if result else [],
            "worker": job.control.worker}


def extras_request(body: m.ExtrasOptions) -> ExtrasRequest:
    return ExtrasRequest(
        upscaler=body.upscaler_1, scale=body.upscaling_resize,
        resize_to=(body.upscaling_resize_w, body.upscaling_resize_h) if body.resize_mode == 1 else None,
        crop=body.upscaling_crop, upscaler_2=body.upscaler_2, upscaler_2_visibility=body.extras_upscaler_2_visibility,
        gfpgan_visibility=body.gfpgan_visibility, codeformer_visibility=body.codeformer_visibility,
        codeformer_weight=body.codeformer_weight, save=False)
