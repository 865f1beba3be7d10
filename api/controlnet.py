"""sd-webui-controlnet's API: `alwayson_scripts.controlnet` units in txt2img/img2img bodies, with its field
names, aliases and defaults, and its `/controlnet/*` routes."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api import convert
from api.context import ApiContext, api_context, caller
from api.errors import A1111Route
from backend import annotators, control_preprocessors
from backend.control_units import CONTROL_MODES, HR_OPTIONS, RESIZE_MODES, ControlError, ControlUnit
from backend.errors import InputError

SCRIPT_NAME = "controlnet"
API_VERSION = 2  # sd-webui-controlnet's /controlnet/version
# sd-webui-controlnet's alternative keys (external_code's ext_compat_keys)
_ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "guessmode": "guess_mode"}
# Its older names of the resize modes
_RESIZE_NAMES = {"just resize": 0, "crop and resize": 1, "resize and fill": 2, "inner fit (scale to fit)": 1,
                 "scale to fit (inner fit)": 1, "outer fit (shrink to fit)": 2, "envelope (outer fit)": 2}


def units_from_script(value: Any) -> list[ControlUnit]:
    """The enabled units of `alwayson_scripts.controlnet` (`{"args": [unit, ...]}` or the list itself)."""
    args = value.get("args", []) if isinstance(value, dict) else value
    if not isinstance(args, list):
        raise InputError("alwayson_scripts.controlnet.args must be a list of ControlNet units")
    units = []
    for index, raw in enumerate(args):
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise ControlError(f"ControlNet unit {index} must be an object with sd-webui-controlnet's fields")
        unit = unit_from_dict(raw, index)
        if unit is not None:
            units.append(unit)
    return units


def unit_from_dict(raw: dict, index: int) -> ControlUnit | None:
    """One unit from a client's dict, or None when it is disabled (or has no model, as an unused unit of
    sd-webui-controlnet's UI sends it)."""
    values = {_ALIASES.get(key, key): item for key, item in raw.items()}
    if not values.get("enabled", True):
        return None
    model = str(values.get("model") or "None")
    if model == "None":
        return None
    image, mask = _image_and_mask(values, index)
    return ControlUnit(
        model=model, module=str(values.get("module") or "none"), image=image, mask=mask,
        weight=_number(values, "weight", 1.0, index), guidance_start=_number(values, "guidance_start", 0.0, index),
        guidance_end=_number(values, "guidance_end", 1.0, index),
        control_mode=_choice(values.get("control_mode", 0), CONTROL_MODES, "control_mode", index),
        resize_mode=_resize_mode(values.get("resize_mode", 1), index),
        processor_res=int(_number(values, "processor_res", -1, index)),
        threshold_a=_number(values, "threshold_a", -1.0, index), threshold_b=_number(values, "threshold_b", -1.0, index),
        pixel_perfect=bool(values.get("pixel_perfect", False)),
        hr_option=_choice(values.get("hr_option", "Both"), HR_OPTIONS, "hr_option", index),
        union_control_type=str(values.get("union_control_type") or "Unknown"), position=index,
    )


def _image_and_mask(values: dict, index: int):
    image, mask = values.get("image"), values.get("mask", values.get("mask_image"))
    if isinstance(image, dict):  # {"image": b64, "mask": b64}, as the A1111 UI's sketch sends it
        image, mask = image.get("image"), image.get("mask") or mask
    decoded_image = convert.decode_image(image, f"ControlNet unit {index}'s image") if image else None
    decoded_mask = convert.decode_image(mask, f"ControlNet unit {index}'s mask") if mask else None
    return decoded_image, decoded_mask


def _number(values: dict, key: str, default: float, index: int) -> float:
    value = values.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ControlError(f"ControlNet unit {index}: {key} must be a number, not {value!r}")
    return float(value)


def _choice(value: Any, choices: tuple[str, ...], key: str, index: int) -> str:
    """A name (any case) or its index, as sd-webui-controlnet accepts both."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str):
        for choice in choices:
            if value.strip().lower() == choice.lower():
                return choice
    raise ControlError(f"ControlNet unit {index}: {key} must be one of {', '.join(choices)} (or 0-"
                       f"{len(choices) - 1}), not {value!r}")


def _resize_mode(value: Any, index: int) -> str:
    if isinstance(value, str) and value.strip().lower() in _RESIZE_NAMES:
        return RESIZE_MODES[_RESIZE_NAMES[value.strip().lower()]]
    return _choice(value, RESIZE_MODES, "resize_mode", index)


# -- routes ----------------------------------------------------------------------------------------------
router = APIRouter(dependencies=[Depends(caller)], route_class=A1111Route)


@router.get("/controlnet/version", tags=["controlnet"])
def version():
    return {"version": API_VERSION}


@router.get("/controlnet/model_list", tags=["controlnet"])
def model_list(update: bool = True, api: ApiContext = Depends(api_context)):
    """The ControlNets' titles, "name [hash]" as sd-webui-controlnet lists them."""
    library = api.runtime.manager.controlnets.library
    if update:
        library.refresh()
    return {"model_list": library.titles()}


@router.get("/controlnet/module_list", tags=["controlnet"])
def module_list(alias_names: bool = False):
    return {"module_list": control_preprocessors.module_list(alias_names),
            "module_detail": control_preprocessors.module_detail(alias_names)}


# sd-webui-controlnet's control types (its UI's filter row) that Easel has preprocessors for: the modules
# each lists (first: its default), and the words that pick its models out of the model list by title.
CONTROL_TYPES = {
    "Canny": (("canny", "invert"), ("canny",)),
    "Depth": (("depth_anything_v2",), ("depth",)),
    "Lineart": (("lineart_standard", "invert"), ("lineart",)),
    "Scribble/Sketch": (("scribble_xdog", "threshold", "invert"), ("scribble", "sketch")),
    "Tile/Blur": (("tile_resample", "tile_colorfix", "tile_colorfix+sharp", "blur_gaussian"), ("tile", "blur")),
    "Inpaint": (("inpaint_only", "inpaint"), ("inpaint",)),
    "Shuffle": (("shuffle",), ("shuffle",)),
    "T2I-Adapter": (("none", "color"), ("t2i", "t2iadapter", "t2i-adapter", "t2i_adapter")),
    "IP-Adapter": (("ip-adapter-auto", "ip-adapter_clip_h", "ip-adapter_clip_g"), ("ip-adapter", "ip_adapter",
                                                                                  "ipadapter")),
}


@router.get("/controlnet/control_types", tags=["controlnet"])
def control_types(api: ApiContext = Depends(api_context)):
    """sd-webui-controlnet's control types: per type, its preprocessors (labels), the models whose titles name
    it, and the defaults its UI picks (a model with "11" in its name first, as there)."""
    titles = ["None", *api.runtime.manager.controlnets.library.titles()]
    label = {name: control_preprocessors.get_module(name).display_name for name in control_preprocessors.module_list()}
    found = {"All": {"module_list": control_preprocessors.module_list(alias_names=True), "model_list": titles,
                     "default_option": "none", "default_model": "None"}}
    for name, (modules, words) in CONTROL_TYPES.items():
        models = ["None", *(t for t in titles[1:] if any(w in t.lower() for w in words))]
        default_model = next((m for m in models[1:] if "11" in m.split("[")[0]), models[1] if len(models) > 1 else "None")
        listed = ["none", *(label[m] for m in modules if m != "none")]
        found[name] = {"module_list": listed, "model_list": models, "default_option": label[modules[0]],
                       "default_model": default_model}
    return {"control_types": found}


@router.get("/controlnet/settings", tags=["controlnet"])
def settings(api: ApiContext = Depends(api_context)):
    return {"control_net_unit_count": api.runtime.options.control_net_unit_count}


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)
    low_vram: bool = False


@router.post("/controlnet/detect", tags=["controlnet"])
async def detect(body: DetectRequest, api: ApiContext = Depends(api_context)):
    """The detected maps of the images, as the unit's preview shows them (base64 PNGs). A model-based
    module's model is downloaded on first use (when allowed) and stays loaded."""
    control_preprocessors.get_module(body.controlnet_module)  # an unknown module: 422 listing the known ones
    if not body.controlnet_input_images:
        raise InputError("No image selected: send controlnet_input_images")
    images = [convert.decode_image(data, f"controlnet_input_images[{i}]")
              for i, data in enumerate(body.controlnet_input_images)]
    masks = [convert.decode_image(data, f"controlnet_masks[{i}]") for i, data in enumerate(body.controlnet_masks)]

    def run() -> list[str]:
        weights = annotators.weights_for(body.controlnet_module, api.runtime.settings)
        return [convert.encode_png(control_preprocessors.run_preprocessor(
            body.controlnet_module, image, body.controlnet_processor_res, body.controlnet_threshold_a,
            body.controlnet_threshold_b, masks[i] if i < len(masks) else None, strict=False, weights=weights), None)
            for i, image in enumerate(images)]

    return {"images": await run_in_threadpool(run), "info": "Success"}
