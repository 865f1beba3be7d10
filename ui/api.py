"""A1111's REST API (`/sdapi/v1/...`) and Easel's job API (`/easel/v1/jobs`), on the UI's server.

Clients written for A1111 (Krita plugins, SillyTavern, bots, the `webuiapi` package) work unchanged.
Beyond A1111:
- every generation goes through the device queue shared with the UI, in arrival order, so concurrent
  clients each get their own, correct result;
- `override_settings.sd_model_checkpoint` switches the checkpoint for that request only (through the
  model manager's cache) unless `override_settings_restore_afterwards` is false;
- jobs: submit returns an id at once; status (position, progress, ETA), result and cancel by id;
- with `--api-auth`, HTTP Basic users own their jobs: a client can interrupt or cancel only its own
  jobs, unless it is an admin (`--api-admin`). Without `--api-auth` the server is local and every
  client is the admin.

Bad input is a 4xx with A1111's error body (`error`, `detail`, `body`, `errors`), never a 500.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import html
import io
import json
import logging
import re
import secrets
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend import devices, infotext, outputs, samplers
from backend.faces import RESTORERS
from backend.generation import generate
from backend.hires import HIRES_LATENT_MODES, SAME_SAMPLER
from backend.images import MASKED_CONTENT, RESIZE_MODES
from backend.job_queue import CANCELLED, FAILED, Job, JobCancelled
from backend.postprocess import ExtrasRequest, run_extras
from backend.request import GenerationRequest, GenerationResult
from backend.version import INFOTEXT_VERSION
from ui import api_models as m
from ui.options import save_options

logger = logging.getLogger(__name__)

ADMIN = "admin"  # the owner name of every client when the API has no users
INPUT_ERRORS = ("RequestError", "SamplerError", "UpscalerError", "FaceRestorationError", "WildcardError",
                "CheckpointFormatError", "CheckpointLoadError", "NonFiniteOutputError", "StyleError",
                "EmbeddingError", "LoraError", "ApiInputError")
NOT_FOUND_ERRORS = ("ModelNotFoundError", "NoCheckpointError")
# A1111's scheduler names (the API's `scheduler` field) -> Easel's schedule type labels.
SCHEDULER_NAMES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras",
                   "exponential": "Exponential", "sgm_uniform": "SGM Uniform"}
# override_settings keys applied per request -> GenerationRequest fields.
PER_REQUEST_SETTINGS = {"sd_model_checkpoint": "checkpoint", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip",
                        "face_restoration_model": "face_restorer", "code_former_weight": "codeformer_weight",
                        "emphasis": "emphasis"}


class ApiInputError(ValueError):
    """A field the API could not read (bad base64, not an image, ...)."""


@dataclass(frozen=True)
class Caller:
    name: str
    admin: bool


@dataclass
class ApiAccess:
    """HTTP Basic users (empty: no authentication, every client is the admin) and the admins."""

    users: dict[str, str] = field(default_factory=dict)
    admins: set[str] = field(default_factory=set)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]], admins: list[str] | None = None) -> ApiAccess:
        users = dict(pairs)
        unknown = [name for name in admins or [] if name not in users]
        if unknown:
            raise ValueError(f"--api-admin names {', '.join(unknown)}, who are not in --api-auth")
        return cls(users, set(admins or []))


# -- small conversions -----------------------------------------------------------------------------
def decode_image(data: str, what: str) -> Image.Image:
    """A base64 image (with or without a `data:image/...;base64,` prefix)."""
    if not isinstance(data, str) or not data:
        raise ApiInputError(f"{what} is empty: send a base64-encoded PNG or JPEG")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiInputError(f"{what} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ApiInputError(f"{what} is not an image Easel can read ({error})") from None
    return image


def encode_png(image: Image.Image, text: str | None, chunks: dict[str, str] | None = None) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=outputs.png_info(text, chunks))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def schedule_label(name: str | None) -> str:
    if not name:
        return samplers.AUTOMATIC
    return SCHEDULER_NAMES.get(name.strip().lower(), name)


def error_body(status: int, error: str, detail: Any, body: Any = "", errors: str = "") -> JSONResponse:
    return JSONResponse(status_code=status, content=jsonable_encoder(
        {"error": error, "detail": detail, "body": body, "errors": errors or str(detail)}))


class A1111Route(APIRoute):
    """Errors of these routes (validation, auth, input, bugs) answer with A1111's error body, whatever
    exception handlers the app they are mounted on has."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as error:
                problems = error.errors()
                return error_body(422, "RequestValidationError", problems, getattr(error, "body", ""),
                                  "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems))
            except StarletteHTTPException as error:  # FastAPI's HTTPException, and Starlette's (bad bodies)
                response = error_body(error.status_code, "HTTPException", error.detail)
                for key, value in (error.headers or {}).items():
                    response.headers[key] = value
                return response
            except Exception as error:  # a bug: logged, answered, and the server goes on
                logger.error("API error on %s", request.url.path, exc_info=error)
                return error_body(500, type(error).__name__, "", "", str(error))

        return answer


# -- the API ---------------------------------------------------------------------------------------
class EaselApi:
    def __init__(self, ctx, access: ApiAccess | None = None, flags: dict[str, Any] | None = None):
        self.ctx = ctx  # ui.webui.UIContext: manager, options, styles, device queue
        self.access = access or ApiAccess()
        self.flags = flags or {}
        self.router = APIRouter(dependencies=[Depends(self.caller)], route_class=A1111Route)
        self._basic = HTTPBasic(auto_error=False)
        self._routes()
        self.router.add_api_route("/openapi.json", self._openapi_route, include_in_schema=False)
        self.router.add_api_route("/docs", self._docs_route, include_in_schema=False, response_class=HTMLResponse)

    # -- identity --------------------------------------------------------------------------------
    async def caller(self, request: Request) -> Caller:
        if not self.access.users:
            return Caller(ADMIN, True)
        credentials: HTTPBasicCredentials | None = await self._basic(request)
        if credentials is not None:
            expected = self.access.users.get(credentials.username)
            if expected is not None and secrets.compare_digest(credentials.password.encode(), expected.encode()):
                return Caller(credentials.username, credentials.username in self.access.admins)
        raise HTTPException(401, "wrong or missing credentials: this API needs HTTP Basic auth (--api-auth)",
                            headers={"WWW-Authenticate": "Basic"})

    def _job_for(self, job_id: str, caller: Caller) -> Job:
        job = self.ctx.device.get(job_id)
        if job is None or not (caller.admin or job.owner == caller.name):
            raise HTTPException(404, f"no job {job_id} (finished jobs are kept for a while, then forgotten)")
        return job

    # -- mounting ----------------------------------------------------------------------------------
    def mount(self, app: FastAPI) -> None:
        """Add the routes, ahead of the UI's own (`/docs` and `/openapi.json` describe the API), and
        the extensions' routes under `/easel/v1/ext/<name>`."""
        before = len(app.router.routes)
        app.include_router(self.router)
        for extension in self.ctx.manager.extensions.active:
            if extension.routes is not None:
                app.include_router(extension.routes, prefix=f"/easel/v1/ext/{extension.name}",
                                   dependencies=[Depends(self.caller)], tags=[f"extension {extension.name}"])
        ours = app.router.routes[before:]
        del app.router.routes[before:]
        app.router.routes[:0] = ours

    def openapi(self) -> dict:
        return get_openapi(title="Easel API (A1111-compatible)", version=INFOTEXT_VERSION,
                           routes=[r for r in self.router.routes if getattr(r, "include_in_schema", True)])

    async def _openapi_route(self):
        return JSONResponse(self.openapi())

    async def _docs_route(self):
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Easel API")

    @staticmethod
    def _raise_for(error: BaseException):
        """A job's or handler's error as the HTTP error a client can act on (anything else is a bug: 500)."""
        name = type(error).__name__
        if name in NOT_FOUND_ERRORS:
            raise HTTPException(404, str(error)) from error
        if name in INPUT_ERRORS:
            raise HTTPException(422, str(error)) from error
        if isinstance(error, JobCancelled):
            raise HTTPException(409, str(error)) from error
        raise error

    # -- requests -> engine --------------------------------------------------------------------------
    def generation_request(self, body: m.Txt2ImgRequest, mode: str) -> tuple[GenerationRequest, dict, list[str]]:
        """(request, settings to keep after it, warnings) for a txt2img or img2img body."""
        values = body.model_dump()
        if body.infotext:
            self._fill_from_infotext(values, body)
        scripts = self.scripts()
        unknown_scripts = [name for name in body.alwayson_scripts if name.lower() not in scripts]
        if unknown_scripts:
            raise ApiInputError(f"script not found: {', '.join(unknown_scripts)}; alwayson scripts here: "
                                f"{', '.join(scripts) or 'none'}")
        script_args = {scripts[name.lower()].name: value for name, value in body.alwayson_scripts.items()}
        script_name = None
        if body.script_name and body.script_name != "None":
            script = self.ctx.manager.extensions.script(body.script_name)
            if script is None or mode not in script.modes:
                titles = [s.title for s in self.ctx.manager.extensions.scripts(mode)]
                raise ApiInputError(f"script not found: {body.script_name}; {mode} scripts here: "
                                    f"{', '.join(titles) or 'none'}")
            script_name, script_args[script.title] = script.title, list(body.script_args)
        options = self.ctx.options
        fields: dict[str, Any] = dict(
            prompt=values["prompt"], negative_prompt=values["negative_prompt"], styles=tuple(values["styles"]),
            seed=values["seed"], subseed=values["subseed"], subseed_strength=values["subseed_strength"],
            seed_resize_from_w=max(0, values["seed_resize_from_w"]),
            seed_resize_from_h=max(0, values["seed_resize_from_h"]),
            sampler=values["sampler_name"] or values["sampler_index"], schedule_type=schedule_label(values["scheduler"]),
            batch_size=values["batch_size"], batch_count=values["n_iter"], steps=values["steps"],
            cfg_scale=values["cfg_scale"], width=values["width"], height=values["height"],
            restore_faces=bool(values["restore_faces"]), face_restorer=options.face_restoration_model,
            codeformer_weight=options.code_former_weight, emphasis=options.emphasis,
            save_images=values["save_images"], save_before_face_restoration=options.save_images_before_face_restoration,
            checkpoint=self.ctx.manager.selected, output_dir=options.output_dir(mode),
            filename_pattern=options.filename_pattern, script_args=script_args, script_name=script_name,
        )
        if values["denoising_strength"] is not None:
            fields["denoising_strength"] = values["denoising_strength"]
        if mode == "txt2img" and values["enable_hr"]:
            fields.update(enable_hr=True, hr_scale=values["hr_scale"], hr_upscaler=values["hr_upscaler"] or "Latent",
                          hr_second_pass_steps=values["hr_second_pass_steps"], hr_resize_x=values["hr_resize_x"],
                          hr_resize_y=values["hr_resize_y"], hr_prompt=values["hr_prompt"],
                          hr_negative_prompt=values["hr_negative_prompt"],
                          hr_sampler=values["hr_sampler_name"] or SAME_SAMPLER)
        if mode == "img2img":
            fields.update(self._img2img_fields(body))
        keep, warnings = {}, []
        for key, value in values["override_settings"].items():
            if key in PER_REQUEST_SETTINGS:
                fields[PER_REQUEST_SETTINGS[key]] = value
                if not values["override_settings_restore_afterwards"]:
                    keep[key] = value
            else:
                warnings.append(f"override setting '{key}' is not applied per request by Easel; ignored")
        if "sd_model_checkpoint" in values["override_settings"]:
            fields["checkpoint"] = self._checkpoint_name(str(values["override_settings"]["sd_model_checkpoint"]))
        try:
            request = GenerationRequest(**fields)
        except TypeError as error:  # a wrong type slipped through override_settings
            raise ApiInputError(str(error)) from None
        request.validate()
        return request, keep, warnings

    def _fill_from_infotext(self, values: dict, body: m.Txt2ImgRequest) -> None:
        """A1111's `infotext` field: parameters of a PNG fill the fields this request did not set."""
        parsed = infotext.request_fields(infotext.parse_infotext(body.infotext))
        names = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler_name",
                 "schedule_type": "scheduler", "cfg_scale": "cfg_scale", "seed": "seed", "width": "width",
                 "height": "height", "subseed": "subseed", "subseed_strength": "subseed_strength",
                 "denoising_strength": "denoising_strength", "enable_hr": "enable_hr", "hr_scale": "hr_scale",
                 "hr_upscaler": "hr_upscaler", "hr_second_pass_steps": "hr_second_pass_steps",
                 "hr_resize_x": "hr_resize_x", "hr_resize_y": "hr_resize_y", "hr_sampler": "hr_sampler_name",
                 "hr_prompt": "hr_prompt", "hr_negative_prompt": "hr_negative_prompt",
                 "restore_faces": "restore_faces"}
        for field_name, api_name in names.items():
            if field_name in parsed and api_name not in body.model_fields_set:
                values[api_name] = parsed[field_name]
        if "clip_skip" in parsed and "CLIP_stop_at_last_layers" not in values["override_settings"]:
            values["override_settings"] = {**values["override_settings"], "CLIP_stop_at_last_layers": parsed["clip_skip"]}

    def _img2img_fields(self, body: m.Img2ImgRequest) -> dict:
        if not body.init_images:
            raise ApiInputError("init_images is empty: img2img needs one base64 image")
        if not 0 <= body.resize_mode <= 3:
            raise ApiInputError(f"resize_mode must be 0-3, not {body.resize_mode}")
        if not 0 <= body.inpainting_fill < len(MASKED_CONTENT):
            raise ApiInputError(f"inpainting_fill must be 0-3, not {body.inpainting_fill}")
        fields = dict(init_image=decode_image(body.init_images[0], "init_images[0]").convert("RGB"),
                      resize_mode=RESIZE_MODES[body.resize_mode if body.resize_mode < 3 else 0])
        if body.mask:
            fields.update(mask=decode_image(body.mask, "mask"), mask_blur=body.mask_blur,
                          masked_content=MASKED_CONTENT[body.inpainting_fill],
                          inpaint_area="Only masked" if body.inpaint_full_res else "Whole picture",
                          only_masked_padding=body.inpaint_full_res_padding,
                          invert_mask=bool(body.inpainting_mask_invert))
        return fields

    def _checkpoint_name(self, name: str) -> str:
        try:
            return self.ctx.manager.index.resolve_checkpoint(name).filename
        except Exception as error:
            self._raise_for(error)

    def scripts(self) -> dict[str, Any]:
        """alwayson_scripts names (lowercased panel titles and extension names) -> extension."""
        found = {}
        for extension in self.ctx.manager.extensions.active:
            if extension.panel is not None:
                found[extension.panel.title.lower()] = extension
                found[extension.name.lower()] = extension
        return found

    # -- running -------------------------------------------------------------------------------------
    def submit_generation(self, body: m.Txt2ImgRequest, mode: str, caller: Caller) -> Job:
        try:
            request, keep, warnings = self.generation_request(body, mode)
        except Exception as error:
            self._raise_for(error)
        manager = self.ctx.manager

        def work(control):
            result = generate(manager, request, control)
            if "sd_model_checkpoint" in keep:
                manager.selected = request.checkpoint
            if "sd_vae" in keep:
                manager.set_vae(str(keep["sd_vae"]))
            result.warnings.extend(warnings)
            return result

        return self.ctx.device.submit(work, caller.name, mode, preview_every=0)

    def generation_response(self, job: Job, body: m.Txt2ImgRequest) -> dict:
        try:
            result: GenerationResult = job.wait()
        except Exception as error:
            self._raise_for(error)
        images = [encode_png(i.image, i.infotext) for i in result.images] if body.send_images else []
        if isinstance(body, m.Img2ImgRequest) and body.include_init_images and body.send_images:
            images += body.init_images
        parameters = body.model_dump()
        if isinstance(body, m.Img2ImgRequest):
            parameters["init_images"] = None if not body.include_init_images else parameters["init_images"]
            parameters["mask"] = None
        return {"images": images, "parameters": parameters, "info": json.dumps(self.info(result, job))}

    @staticmethod
    def info(result: GenerationResult, job: Job) -> dict:
        run, images = result.request, result.images
        first = infotext.parse_infotext(images[0].infotext) if images else {}
        return {
            "prompt": images[0].prompt if images else run.prompt,
            "all_prompts": [i.prompt for i in images],
            "negative_prompt": images[0].negative_prompt if images else run.negative_prompt,
            "all_negative_prompts": [i.negative_prompt for i in images],
            "seed": images[0].seed if images else run.seed,
            "all_seeds": [i.seed for i in images],
            "subseed": images[0].subseed if images else run.subseed,
            "all_subseeds": [i.subseed for i in images],
            "subseed_strength": run.subseed_strength,
            "width": run.width, "height": run.height,
            "sampler_name": first.get("Sampler", run.sampler), "scheduler": first.get("Schedule type"),
            "cfg_scale": run.cfg_scale, "steps": run.steps, "batch_size": run.batch_size,
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

    def job_status(self, job: Job) -> dict:
        progress = job.progress
        return {"id": job.id, "kind": job.kind, "status": job.status, "position": self.ctx.device.position(job),
                "queue_length": self.ctx.device.queue_length, "progress": job.fraction, "eta_relative": job.eta,
                "step": progress.step if progress else None, "steps": progress.steps if progress else None,
                "error": str(job.error) if job.status == FAILED else None}

    def extras(self, body: m.ExtrasOptions, images: list[Image.Image], caller: Caller):
        request = ExtrasRequest(
            upscaler=body.upscaler_1, scale=body.upscaling_resize,
            resize_to=(body.upscaling_resize_w, body.upscaling_resize_h) if body.resize_mode == 1 else None,
            crop=body.upscaling_crop, upscaler_2=body.upscaler_2,
            upscaler_2_visibility=body.extras_upscaler_2_visibility, gfpgan_visibility=body.gfpgan_visibility,
            codeformer_visibility=body.codeformer_visibility, codeformer_weight=body.codeformer_weight, save=False)
        manager, settings = self.ctx.manager, self.ctx.settings
        job = self.ctx.device.submit(
            lambda control: run_extras(manager.upscalers, images, request, settings.output_root,
                                       should_stop=lambda: control.interrupted, faces=manager.faces),
            caller.name, "extras")
        try:
            results = job.wait()
        except Exception as error:
            self._raise_for(error)
        encoded = [encode_png(r.image, outputs.read_infotext(src), {"postprocessing": r.postprocessing}
                              if r.postprocessing else None) for r, src in zip(results, images)]
        text = results[0].postprocessing if results else ""
        return encoded, f"<p>{html.escape(text)}</p>"

    # -- routes --------------------------------------------------------------------------------------
    def _routes(self) -> None:  # noqa: C901 - one place lists every route
        r, ctx = self.router, self.ctx

        @r.post("/sdapi/v1/txt2img", response_model=m.GenerationResponse, tags=["generation"])
        def txt2img(body: m.Txt2ImgRequest, caller: Caller = Depends(self.caller)):
            job = self.submit_generation(body, "txt2img", caller)
            return self.generation_response(job, body)

        @r.post("/sdapi/v1/img2img", response_model=m.GenerationResponse, tags=["generation"])
        def img2img(body: m.Img2ImgRequest, caller: Caller = Depends(self.caller)):
            job = self.submit_generation(body, "img2img", caller)
            return self.generation_response(job, body)

        @r.post("/sdapi/v1/extra-single-image", response_model=m.ExtrasSingleResponse, tags=["postprocessing"])
        def extra_single_image(body: m.ExtrasSingleRequest, caller: Caller = Depends(self.caller)):
            try:
                image = decode_image(body.image, "image")
            except ApiInputError as error:
                self._raise_for(error)
            encoded, text = self.extras(body, [image], caller)
            return {"html_info": text, "image": encoded[0] if body.show_extras_results else None}

        @r.post("/sdapi/v1/extra-batch-images", response_model=m.ExtrasBatchResponse, tags=["postprocessing"])
        def extra_batch_images(body: m.ExtrasBatchRequest, caller: Caller = Depends(self.caller)):
            try:
                images = [decode_image(f.data, f"imageList[{i}]") for i, f in enumerate(body.imageList)]
            except ApiInputError as error:
                self._raise_for(error)
            encoded, text = self.extras(body, images, caller)
            return {"html_info": text, "images": encoded if body.show_extras_results else []}

        @r.post("/sdapi/v1/png-info", response_model=m.PngInfoResponse, tags=["postprocessing"])
        def png_info(body: m.PngInfoRequest):
            try:
                image = decode_image(body.image, "image")
            except ApiInputError as error:
                self._raise_for(error)
            items = {k: v for k, v in image.info.items() if isinstance(v, (str, int, float))}
            text = str(items.pop("parameters", "") or "")
            return {"info": text, "items": items, "parameters": infotext.parse_infotext(text) if text else {}}

        @r.get("/sdapi/v1/progress", response_model=m.ProgressResponse, tags=["jobs"])
        def progress(skip_current_image: bool = False, id_task: str | None = None,
                     job_id: str | None = Query(None, description="an Easel job id (default: your current job)"),
                     caller: Caller = Depends(self.caller)):
            return self.progress(job_id or id_task, skip_current_image, caller)

        @r.post("/sdapi/v1/interrupt", tags=["jobs"])
        def interrupt(job_id: str | None = None, caller: Caller = Depends(self.caller)):
            for job in self._targets(job_id, caller):
                job.control.interrupt()
            return {}

        @r.post("/sdapi/v1/skip", tags=["jobs"])
        def skip(job_id: str | None = None, caller: Caller = Depends(self.caller)):
            for job in self._targets(job_id, caller):
                job.control.skip()
            return {}

        @r.get("/sdapi/v1/options", tags=["settings"])
        def get_options():
            return self.options()

        @r.post("/sdapi/v1/options", tags=["settings"])
        def set_options(body: dict[str, Any], caller: Caller = Depends(self.caller)):
            self.set_options(body, caller)
            return None

        @r.get("/sdapi/v1/cmd-flags", tags=["settings"])
        def cmd_flags():
            return self.flags

        @r.get("/sdapi/v1/sd-models", tags=["models"])
        def sd_models():
            # Hashes already known only: hashing every file of a large collection would take minutes.
            index, listed = ctx.manager.index, []
            for f in index.checkpoints:
                sha = None if f.is_diffusers_folder else index.hashes.cached(f.path)
                listed.append({"title": index.title(f, compute=False), "model_name": f.name,
                               "hash": sha[:10] if sha else None, "sha256": sha, "filename": str(f.path),
                               "config": None})
            return listed

        @r.get("/sdapi/v1/sd-vae", tags=["models"])
        def sd_vae():
            return [{"model_name": f.name, "filename": str(f.path)} for f in ctx.manager.index.vaes]

        @r.get("/sdapi/v1/loras", tags=["models"])
        def loras():
            return [{"name": f.name, "alias": f.name, "path": str(f.path), "metadata": {}}
                    for f in ctx.manager.loras.files]

        @r.get("/sdapi/v1/embeddings", tags=["models"])
        def embeddings():
            return self.embeddings()

        @r.get("/sdapi/v1/samplers", tags=["models"])
        def sampler_list():
            return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in samplers.SAMPLERS]

        @r.get("/sdapi/v1/schedulers", tags=["models"])
        def schedulers():
            return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                    for name, label in SCHEDULER_NAMES.items()]

        @r.get("/sdapi/v1/upscalers", tags=["models"])
        def upscalers():
            library = ctx.manager.upscalers
            found = {u.name: u for u in library.upscalers}
            return [{"name": name, "model_name": name if name in found and found[name].file else None,
                     "model_path": str(found[name].file.path) if name in found and found[name].file else None,
                     "model_url": None, "scale": 4} for name in library.names]

        @r.get("/sdapi/v1/latent-upscale-modes", tags=["models"])
        def latent_upscale_modes():
            return [{"name": name} for name in HIRES_LATENT_MODES]

        @r.get("/sdapi/v1/face-restorers", tags=["models"])
        def face_restorers():
            return [{"name": name, "cmd_dir": str(ctx.manager.faces.folders[name])} for name in RESTORERS]

        @r.get("/sdapi/v1/prompt-styles", tags=["models"])
        def prompt_styles():
            ctx.styles.reload()
            return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                    for s in ctx.styles.styles.values()]

        @r.get("/sdapi/v1/scripts", tags=["models"])
        def scripts():
            registry = ctx.manager.extensions
            return {mode: [e.panel.title.lower() for e in registry.panels(mode)]
                    + [s.title.lower() for s in registry.scripts(mode)] for mode in ("txt2img", "img2img")}

        @r.get("/sdapi/v1/script-info", tags=["models"])
        def script_info():
            return [{"name": e.panel.title.lower(), "is_alwayson": True, "is_img2img": mode == "img2img",
                     "args": [{"label": c.label, "value": c.default, "minimum": c.minimum, "maximum": c.maximum,
                               "step": c.step, "choices": list(c.choices) or None} for c in e.panel.controls]}
                    for e in ctx.manager.extensions.active if e.panel is not None
                    for mode in e.panel.modes]

        @r.get("/sdapi/v1/memory", tags=["settings"])
        def memory():
            return self.memory()

        for name in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings"):
            r.add_api_route(f"/sdapi/v1/{name}", self.refresh, methods=["POST"], tags=["models"])

        @r.post("/sdapi/v1/unload-checkpoint", tags=["models"])
        def unload_checkpoint(caller: Caller = Depends(self.caller)):
            self._require_admin(caller)
            ctx.device.submit(lambda control: ctx.manager.unload(), caller.name, "unload").wait()
            return {}

        @r.post("/sdapi/v1/reload-checkpoint", tags=["models"])
        def reload_checkpoint(caller: Caller = Depends(self.caller)):
            self._require_admin(caller)
            job = ctx.device.submit(lambda control: ctx.manager.select(ctx.manager.selected), caller.name, "load")
            try:
                job.wait()
            except Exception as error:
                self._raise_for(error)
            return {}

        # -- Easel's job API --
        @r.post("/easel/v1/jobs/txt2img", response_model=m.JobStatus, status_code=202, tags=["jobs"])
        def submit_txt2img(body: m.Txt2ImgRequest, caller: Caller = Depends(self.caller)):
            return self.job_status(self._remember(self.submit_generation(body, "txt2img", caller), body))

        @r.post("/easel/v1/jobs/img2img", response_model=m.JobStatus, status_code=202, tags=["jobs"])
        def submit_img2img(body: m.Img2ImgRequest, caller: Caller = Depends(self.caller)):
            return self.job_status(self._remember(self.submit_generation(body, "img2img", caller), body))

        @r.get("/easel/v1/jobs", response_model=list[m.JobStatus], tags=["jobs"])
        def list_jobs(caller: Caller = Depends(self.caller)):
            jobs = ctx.device.jobs_of(None if caller.admin else caller.name)
            return [self.job_status(job) for job in jobs]

        @r.get("/easel/v1/jobs/{job_id}", response_model=m.JobStatus, tags=["jobs"])
        def job_status(job_id: str, caller: Caller = Depends(self.caller)):
            return self.job_status(self._job_for(job_id, caller))

        @r.get("/easel/v1/jobs/{job_id}/result", response_model=m.GenerationResponse, tags=["jobs"])
        def job_result(job_id: str, caller: Caller = Depends(self.caller)):
            job = self._job_for(job_id, caller)
            if not job.done:
                raise HTTPException(409, f"job {job_id} is {job.status}; poll /easel/v1/jobs/{job_id}")
            if job.status == CANCELLED:
                raise HTTPException(409, f"job {job_id} was cancelled before it started")
            if not isinstance(job.request, m.Txt2ImgRequest):
                raise HTTPException(409, f"job {job_id} is not a generation submitted through this API")
            return self.generation_response(job, job.request)

        @r.delete("/easel/v1/jobs/{job_id}", response_model=m.JobStatus, tags=["jobs"])
        def cancel_job(job_id: str, caller: Caller = Depends(self.caller)):
            job = ctx.device.get(job_id)
            if job is None:
                raise HTTPException(404, f"no job {job_id}")
            if not (caller.admin or job.owner == caller.name):
                raise HTTPException(403, f"job {job_id} belongs to another client; only it or an admin may cancel it")
            ctx.device.cancel(job)
            return self.job_status(job)

    # -- route helpers -----------------------------------------------------------------------------
    @staticmethod
    def _remember(job: Job, body) -> Job:
        job.request = body  # the result endpoint answers in the shape of the request that made it
        return job

    def _require_admin(self, caller: Caller) -> None:
        if not caller.admin:
            raise HTTPException(403, "only an admin (--api-admin) may do this")

    def _targets(self, job_id: str | None, caller: Caller) -> list[Job]:
        """The jobs an interrupt or skip reaches: the given one (if the caller may), else the caller's
        running job, else (for an admin) whatever is running."""
        device = self.ctx.device
        if job_id:
            job = device.get(job_id)
            if job is None:
                raise HTTPException(404, f"no job {job_id}")
            if not (caller.admin or job.owner == caller.name):
                raise HTTPException(403, f"job {job_id} belongs to another client; only it or an admin may stop it")
            return [job]
        current = device.current
        if current is not None and (caller.admin or current.owner == caller.name):
            return [current]
        return []

    def progress(self, job_id: str | None, skip_image: bool, caller: Caller) -> dict:
        device = self.ctx.device
        job = self._job_for(job_id, caller) if job_id else None
        if job is None:
            mine = [j for j in device.jobs_of(caller.name) if not j.done]
            current = device.current
            job = mine[0] if mine else current if current is not None and caller.admin else None
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                 "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        body = {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                "current_task": None, "queue_length": device.queue_length}
        if job is None:
            return body
        progress = job.progress
        state.update(job=job.kind, job_count=device.queue_length + (device.current is not None),
                     job_timestamp=dt.datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
                     interrupted=job.control.interrupted, job_no=progress.batch if progress else 0,
                     sampling_step=progress.step if progress else 0, sampling_steps=progress.steps if progress else 0)
        body.update(progress=job.fraction, eta_relative=job.eta or 0.0, current_task=job.id,
                    textinfo=f"{job.status}, position {device.position(job)}" if not job.done else job.status)
        if not skip_image and progress is not None and progress.preview is not None:
            body["current_image"] = encode_png(progress.preview, None)
        return body

    def options(self) -> dict:
        manager = self.ctx.manager
        values = asdict(self.ctx.options)
        selected = manager.selected
        title, sha = None, None
        if selected:
            try:
                file = manager.index.resolve_checkpoint(selected)
                title = manager.index.title(file)
                sha = None if file.is_diffusers_folder else manager.index.hashes.sha256(file.path)
            except Exception:  # a removed file: report the name only
                title = selected
        values.update(sd_model_checkpoint=title, sd_checkpoint_hash=sha, sd_vae=manager.vae_choice,
                      CLIP_stop_at_last_layers=1, samples_save=self.ctx.options.save_images,
                      sd_checkpoint_cache=manager.settings.checkpoint_cache_size)
        return values

    def set_options(self, body: dict[str, Any], caller: Caller) -> None:
        manager, ctx = self.ctx.manager, self.ctx
        known = {f.name for f in dataclass_fields(ctx.options)}
        changes = {k: v for k, v in body.items() if k in known}
        if "samples_save" in body:
            changes["save_images"] = body["samples_save"]
        for key, value in changes.items():
            current = getattr(ctx.options, key)
            if not isinstance(value, type(current)) and not (isinstance(current, float) and isinstance(value, int)) \
                    or isinstance(value, bool) and not isinstance(current, bool):
                raise HTTPException(422, f"option {key} takes a {type(current).__name__}, not {value!r}")
        if changes:
            try:
                candidate = replace(ctx.options, **changes)
                save_options(candidate, ctx.options_path)
            except (ValueError, TypeError) as error:
                raise HTTPException(422, f"options not saved: {error}") from None
            ctx.options = candidate
        if "sd_vae" in body:
            try:
                manager.set_vae(str(body["sd_vae"]))
            except Exception as error:
                self._raise_for(error)
        if "sd_model_checkpoint" in body:
            name = self._checkpoint_name(str(body["sd_model_checkpoint"]))
            job = ctx.device.submit(lambda control: manager.select(name), caller.name, "load")
            try:
                job.wait()
            except Exception as error:
                self._raise_for(error)

    def refresh(self) -> dict:
        self.ctx.manager.refresh()
        return {}

    def embeddings(self) -> dict:
        manager = self.ctx.manager
        model = manager.active
        if model is None:
            return {"loaded": {}, "skipped": {}}
        found = manager.embeddings.for_model(model)
        loaded = {e.name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                           "shape": int(next(iter(e.vectors.values())).shape[-1]), "vectors": e.count}
                  for e in found.embeddings.values()}
        skipped = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                          "vectors": None} for name in found.skipped}
        return {"loaded": loaded, "skipped": skipped}

    @staticmethod
    def memory() -> dict:
        return devices.memory_report()


_ADMIN_NAMES = re.compile(r"[^,\s]+")


def parse_admins(text: str | None) -> list[str]:
    return _ADMIN_NAMES.findall(text or "")
