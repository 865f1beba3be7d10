"""A1111's `/sdapi/v1` routes (generation, postprocessing, settings, model lists), as module-level
functions. Job control (`progress`, `interrupt`, `skip`) is in `api.jobs`."""

from __future__ import annotations

import dataclasses
import html
from typing import Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from api import controlnet, convert, generation
from api import models as m
from api.access import Caller, require_admin
from api.context import ApiContext, api_context, caller
from api.errors import A1111Route
from backend import devices, infotext, outputs, samplers
from backend.errors import InputError
from backend.faces import RESTORERS
from backend.hires import HIRES_LATENT_MODES
from backend.postprocess import run_extras
from backend.runtime import option_name

router = APIRouter(dependencies=[Depends(caller)], route_class=A1111Route)
# options that act on the model manager (Forge's `forge_additional_modules`: its VAE / text encoder picks)
SPECIAL_OPTIONS = ("sd_model_checkpoint", "sd_vae")
MODULES_OPTION = "forge_additional_modules"


# -- generation --------------------------------------------------------------------------------------
@router.post("/sdapi/v1/txt2img", response_model=m.GenerationResponse, tags=["generation"])
async def txt2img(body: m.Txt2ImgRequest, who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    return await _generate(api, body, "txt2img", who)


@router.post("/sdapi/v1/img2img", response_model=m.GenerationResponse, tags=["generation"])
async def img2img(body: m.Img2ImgRequest, who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    return await _generate(api, body, "img2img", who)


async def _generate(api: ApiContext, body: m.Txt2ImgRequest, mode: str, who: Caller) -> dict:
    """Waiting for the device holds no server thread, so control routes answer at once under load."""
    job = await run_in_threadpool(generation.submit, api, body, mode, who)
    await job.wait_async()
    return await run_in_threadpool(generation.response, job, body)


# -- postprocessing ----------------------------------------------------------------------------------
@router.post("/sdapi/v1/extra-single-image", response_model=m.ExtrasSingleResponse, tags=["postprocessing"])
async def extra_single_image(body: m.ExtrasSingleRequest, who: Caller = Depends(caller),
                             api: ApiContext = Depends(api_context)):
    image = convert.decode_image(body.image, "image")
    encoded, text = await _extras(api, body, [image], who)
    return {"html_info": text, "image": encoded[0] if body.show_extras_results else None}


@router.post("/sdapi/v1/extra-batch-images", response_model=m.ExtrasBatchResponse, tags=["postprocessing"])
async def extra_batch_images(body: m.ExtrasBatchRequest, who: Caller = Depends(caller),
                             api: ApiContext = Depends(api_context)):
    images = [convert.decode_image(f.data, f"imageList[{i}]") for i, f in enumerate(body.imageList)]
    encoded, text = await _extras(api, body, images, who)
    return {"html_info": text, "images": encoded if body.show_extras_results else []}


async def _extras(api: ApiContext, body: m.ExtrasOptions, images: list, who: Caller) -> tuple[list[str], str]:
    request, runtime = convert.extras_request(body), api.runtime
    manager = runtime.manager
    job = runtime.device.submit(
        lambda control: run_extras(manager.upscalers, images, request, runtime.settings.output_root,
                                   should_stop=lambda: control.interrupted, faces=manager.faces),
        who.name, "extras")
    results = await job.wait_async()

    def encode():
        return [convert.encode_png(r.image, outputs.read_infotext(src),
                                   {"postprocessing": r.postprocessing} if r.postprocessing else None)
                for r, src in zip(results, images)]

    text = results[0].postprocessing if results else ""
    return await run_in_threadpool(encode), f"<p>{html.escape(text)}</p>"


@router.post("/sdapi/v1/png-info", response_model=m.PngInfoResponse, tags=["postprocessing"])
def png_info(body: m.PngInfoRequest):
    """The parameters of a PNG (its `parameters` chunk) or of a JPEG/WebP (EXIF UserComment)."""
    image = convert.decode_image(body.image, "image")
    items = {k: v for k, v in image.info.items() if isinstance(v, (str, int, float))}
    items.pop("parameters", None)
    text = outputs.read_infotext(image) or ""
    return {"info": text, "items": items, "parameters": infotext.parse_infotext(text) if text else {}}


# -- settings ----------------------------------------------------------------------------------------
@router.get("/sdapi/v1/options", tags=["settings"])
def get_options(api: ApiContext = Depends(api_context)):
    runtime = api.runtime
    manager = runtime.manager
    values = dataclasses.asdict(runtime.options)
    title, sha = None, None
    if manager.selected:
        try:
            file = manager.index.resolve_checkpoint(manager.selected)
            title = manager.index.title(file)
            sha = None if file.is_diffusers_folder else manager.index.hashes.sha256(file.path)
        except Exception:  # a removed file: report the name only
            title = manager.selected
    values.update(sd_model_checkpoint=title, sd_checkpoint_hash=sha, sd_vae=manager.vae_choice,
                  **{MODULES_OPTION: _module_paths(manager)},
                  CLIP_stop_at_last_layers=1, samples_save=runtime.options.save_images,
                  sd_checkpoint_cache=runtime.options.checkpoint_cache)
    return values


@router.post("/sdapi/v1/options", tags=["settings"])
async def set_options(body: dict[str, Any], who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    """Server-wide settings: admins only. Options are checked, saved and applied together; keys that
    are not options of Easel's are ignored, as A1111 ignores them."""
    require_admin(who, "change the server's settings")
    runtime = api.runtime
    manager = runtime.manager
    changes = {key: value for key, value in body.items() if option_name(key)}
    for key in SPECIAL_OPTIONS:
        if key in body and not isinstance(body[key], str):
            raise InputError(f"option {key} takes a str, not {body[key]!r}")
    if changes:
        runtime.apply(changes)
    if MODULES_OPTION in body:
        encoders, vae = _modules(manager, body[MODULES_OPTION])
        body = {"sd_vae": vae, **body}
        await runtime.device.submit(lambda control: manager.set_text_encoders(encoders), who.name, "load").wait_async()
    if "sd_vae" in body:
        await runtime.device.submit(lambda control: manager.set_vae(body["sd_vae"]), who.name, "load").wait_async()
    if "sd_model_checkpoint" in body:
        name = manager.index.resolve_checkpoint(body["sd_model_checkpoint"]).filename
        await runtime.device.submit(lambda control: runtime.select_checkpoint(name), who.name, "load").wait_async()
    return None


def _module_paths(manager) -> list[str]:
    """Forge's `forge_additional_modules`: the full paths of the picked text encoders and VAE."""
    paths = [str(manager.index.resolve_text_encoder(name).path) for name in manager.text_encoder_choice]
    if manager.vae_choice not in ("Automatic", "None"):
        paths.append(str(manager.index.resolve_vae(manager.vae_choice).path))
    return paths


def _modules(manager, names) -> tuple[list[str], str]:
    """(text encoder names, VAE choice) of a `forge_additional_modules` list (paths or file names)."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"option {MODULES_OPTION} takes a list of file names or paths, not {names!r}")
    encoders, vaes = [], []
    for name in names:
        bare = name.replace("\\", "/").rsplit("/", 1)[-1]
        if any(bare in (f.filename, f.path.name) for f in manager.index.text_encoders):
            encoders.append(bare)
        elif any(bare in (f.filename, f.path.name) for f in manager.index.vaes):
            vaes.append(bare)
        else:
            raise InputError(f"module '{name}' is in neither models/text_encoder nor models/VAE; available: "
                             f"{', '.join(manager.text_encoder_options() + manager.vae_options()[2:]) or 'none'}")
    if len(vaes) > 1:
        raise InputError(f"{MODULES_OPTION} names {len(vaes)} VAEs ({', '.join(vaes)}); pick one")
    return encoders, vaes[0] if vaes else "Automatic"


@router.get("/sdapi/v1/cmd-flags", tags=["settings"])
def cmd_flags(api: ApiContext = Depends(api_context)):
    return api.flags


@router.get("/sdapi/v1/memory", tags=["settings"])
def memory():
    return devices.memory_report()


# -- models and lists --------------------------------------------------------------------------------
@router.get("/sdapi/v1/sd-models", tags=["models"])
def sd_models(api: ApiContext = Depends(api_context)):
    """Hashes already known only: hashing every file of a large collection would take minutes."""
    index, listed = api.runtime.manager.index, []
    for f in index.checkpoints:
        sha = None if f.is_diffusers_folder else index.hashes.cached(f.path)
        listed.append({"title": index.title(f, compute=False), "model_name": f.name, "hash": sha[:10] if sha else None,
                       "sha256": sha, "filename": str(f.path), "config": None})
    return listed


@router.get("/sdapi/v1/sd-vae", tags=["models"])
def sd_vae(api: ApiContext = Depends(api_context)):
    return [{"model_name": f.name, "filename": str(f.path)} for f in api.runtime.manager.index.vaes]


@router.get("/sdapi/v1/sd-modules", tags=["models"])
def sd_modules(api: ApiContext = Depends(api_context)):
    """Forge's list of the VAEs and text encoders a FLUX.1 or SD 3.5 file may take."""
    index = api.runtime.manager.index
    return [{"model_name": f.name, "filename": str(f.path)} for f in [*index.vaes, *index.text_encoders]]


@router.get("/sdapi/v1/loras", tags=["models"])
def loras(api: ApiContext = Depends(api_context)):
    return [{"name": f.name, "alias": f.name, "path": str(f.path), "metadata": {}}
            for f in api.runtime.manager.loras.files]


@router.get("/sdapi/v1/embeddings", tags=["models"])
def embeddings(api: ApiContext = Depends(api_context)):
    manager = api.runtime.manager
    if manager.active is None:
        return {"loaded": {}, "skipped": {}}
    found = manager.embeddings.for_model(manager.active)
    empty = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    loaded = {e.name: {**empty, "shape": int(next(iter(e.vectors.values())).shape[-1]), "vectors": e.count}
              for e in found.embeddings.values()}
    return {"loaded": loaded, "skipped": {name: {**empty, "shape": None, "vectors": None} for name in found.skipped}}


@router.get("/sdapi/v1/samplers", tags=["models"])
def sampler_list():
    return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in samplers.SAMPLERS]


@router.get("/sdapi/v1/schedulers", tags=["models"])
def schedulers():
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in convert.SCHEDULER_NAMES.items()]


@router.get("/sdapi/v1/upscalers", tags=["models"])
def upscalers(api: ApiContext = Depends(api_context)):
    library = api.runtime.manager.upscalers
    found = {u.name: u.file for u in library.upscalers if u.file}
    return [{"name": name, "model_name": name if name in found else None,
             "model_path": str(found[name].path) if name in found else None, "model_url": None, "scale": 4}
            for name in library.names]


@router.get("/sdapi/v1/latent-upscale-modes", tags=["models"])
def latent_upscale_modes():
    return [{"name": name} for name in HIRES_LATENT_MODES]


@router.get("/sdapi/v1/face-restorers", tags=["models"])
def face_restorers(api: ApiContext = Depends(api_context)):
    return [{"name": name, "cmd_dir": str(api.runtime.manager.faces.folders[name])} for name in RESTORERS]


@router.get("/sdapi/v1/prompt-styles", tags=["models"])
def prompt_styles(api: ApiContext = Depends(api_context)):
    styles = api.runtime.styles
    styles.reload()
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles.styles.values()]


@router.get("/sdapi/v1/scripts", tags=["models"])
def scripts(api: ApiContext = Depends(api_context)):
    registry = api.runtime.extensions
    return {mode: [e.panel.title.lower() for e in registry.panels(mode)] + [controlnet.SCRIPT_NAME]
            + [s.title.lower() for s in registry.scripts(mode)] for mode in ("txt2img", "img2img")}


@router.get("/sdapi/v1/script-info", tags=["models"])
def script_info(api: ApiContext = Depends(api_context)):
    return [{"name": e.panel.title.lower(), "is_alwayson": True, "is_img2img": mode == "img2img",
             "args": [{"label": c.label, "value": c.default, "minimum": c.minimum, "maximum": c.maximum,
                       "step": c.step, "choices": list(c.choices) or None} for c in e.panel.controls]}
            for e in api.runtime.extensions.active if e.panel is not None for mode in e.panel.modes]


@router.post("/sdapi/v1/refresh-checkpoints", tags=["models"])
@router.post("/sdapi/v1/refresh-vae", tags=["models"])
@router.post("/sdapi/v1/refresh-loras", tags=["models"])
@router.post("/sdapi/v1/refresh-embeddings", tags=["models"])
def refresh(api: ApiContext = Depends(api_context)):
    api.runtime.manager.refresh()
    return {}


@router.post("/sdapi/v1/unload-checkpoint", tags=["models"])
async def unload_checkpoint(who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    require_admin(who)
    runtime = api.runtime
    await runtime.device.submit(lambda control: runtime.unload_checkpoints(), who.name, "unload").wait_async()
    return {}


@router.post("/sdapi/v1/reload-checkpoint", tags=["models"])
async def reload_checkpoint(who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    require_admin(who)
    runtime = api.runtime
    await runtime.device.submit(lambda control: runtime.select_checkpoint(runtime.manager.selected), who.name,
                                "load").wait_async()
    return {}
