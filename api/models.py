"""Request and response bodies of A1111's `/sdapi/v1` API (field names, types and defaults as A1111's
API, so a payload gives there what it gives here), and of Easel's job API.

Unknown fields are accepted and ignored, as A1111 does: clients send fields for features (refiner,
ControlNet units, ...) that a server may not have.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

# Integers a client may send: 64-bit (a larger one is a 422, not a 500 when it is echoed back).
Int = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # NaN and inf are refused (422)


class Txt2ImgRequest(_Body):
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: Int = -1
    subseed: Int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: Int = -1
    seed_resize_from_w: Int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # A1111's older field; used when sampler_name is not given
    scheduler: str | None = None  # "Automatic", "Karras", ... or A1111's names "karras", "sgm_uniform", ...
    batch_size: Int = 1
    n_iter: Int = 1
    steps: Int = 50
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = 3.5  # Forge's, for FLUX.1 dev
    shift: float = 0.0  # a flow model's schedule shift; 0: the model's own
    width: Int = 512
    height: Int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    denoising_strength: float | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: Int = 0
    hr_resize_x: Int = 0
    hr_resize_y: Int = 0
    hr_sampler_name: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    # A1111's sampler parameters; None: the server's settings (eta_ancestral / eta_ddim, s_churn, ...)
    eta: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    script_name: str | None = None  # a script (X/Y/Z plot, ...) that makes the images; see /sdapi/v1/scripts
    script_args: list[Any] = Field(default_factory=list)  # its control values, in order
    infotext: str | None = None  # A1111 >= 1.7: fills the fields the request does not set


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list)  # base64 images (a data: prefix is allowed)
    resize_mode: Int = 0  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale (as 0)
    denoising_strength: float | None = 0.75
    mask: str | None = None
    mask_blur: Int = 4
    inpainting_fill: Int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True  # "Only masked"
    inpaint_full_res_padding: Int = 0
    inpainting_mask_invert: Int = 0
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str] | None = Field(description="base64 PNGs (no data: prefix), carrying their infotext")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string: seeds, prompts, infotexts, ... as A1111's")


class ExtrasOptions(_Body):
    resize_mode: Int = 0  # 0 scale by upscaling_resize, 1 scale to upscaling_resize_w x _h
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: Int = 512
    upscaling_resize_h: Int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleRequest(ExtrasOptions):
    image: str = ""


class ExtrasSingleResponse(BaseModel):
    html_info: str
    image: str | None = None


class FileData(_Body):
    data: str
    name: str = ""


class ExtrasBatchRequest(ExtrasOptions):
    imageList: list[FileData] = Field(default_factory=list)  # noqa: N815 - A1111's field name


class ExtrasBatchResponse(BaseModel):
    html_info: str
    images: list[str]


class PngInfoRequest(_Body):
    image: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None
    queue_length: Int = Field(0, description="jobs waiting for the device (Easel)")


class JobStatus(BaseModel):
    id: str
    kind: str
    status: str = Field(description="queued, running, done, failed or cancelled")
    position: Int = Field(description="jobs to run before this one (0 once it runs)")
    queue_length: Int
    progress: float
    eta_relative: float | None
    step: int | None = None
    steps: int | None = None
    error: str | None = None
    images: int | None = Field(None, description="images made, once finished")
    warnings: list[str] = Field(default_factory=list, description="what went differently than asked, once finished")
    worker: str | None = Field(None, description="the worker replica that runs or ran it (--workers); else null")


class WorkerStatus(BaseModel):
    id: str = Field(description="the replica's id (\"local\" without --workers)")
    pid: int | None
    node: str | None = Field(description="host name (and address) of the machine it runs on")
    device: str | None
    loaded: list[str] = Field(description="A1111 titles of the checkpoints it holds")
    loads: int | None = Field(description="checkpoint loads since it started")
    running: str | None = Field(description="the id of the job it runs, or null")
    queued: int = Field(description="waiting jobs for a checkpoint it holds")


class ClusterStatus(BaseModel):
    replicas: list[WorkerStatus]
    queued: int = Field(description="jobs waiting for a free worker")
