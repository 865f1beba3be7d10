"""The Gradio app: top bar, txt2img, img2img (img2img, sketch, inpaint, inpaint upload), PNG Info and
Settings, all on one `ModelManager`.

Every generation control is registered under the name of the `GenerationRequest` field it sets, and
handlers receive `{component: value}` dicts, so nothing depends on the order of a positional list.
Generation and Extras jobs go through the device queue shared with the REST API (arrival order, one
at a time); per-browser state lives in `gr.State` and the session hash keys each browser's own job.
"""

from __future__ import annotations

import html
import json
import logging
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from backend import clip_tokenizer, conditioning, infotext, outputs
from backend.embeddings import NO_EMBEDDINGS, EncoderVocabulary
from backend.extra_networks import parse_tags
from backend.errors import InputError, describe
from backend.faces import FaceRestorationError
from backend.generation import generate
from backend.hires import HIRES_LATENT_MODES, SAME_SAMPLER
from backend.images import INPAINT_AREAS, MASKED_CONTENT, RESIZE_MODES
from backend.job_queue import DeviceQueue
from backend.model_manager import ModelManager
from backend.postprocess import ExtrasRequest, run_extras
from backend.request import EMPHASIS_MODES, MIN_SIZE, GenerationRequest
from backend.samplers import SAMPLER_NAMES, SCHEDULE_TYPES
from backend.styles import Style, StyleDatabase
from backend.upscalers import UpscalerError
from backend.wildcards import Wildcards
from ui import extra_networks, jobs
from backend.options import Options
from backend.runtime import Runtime

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 75
EXTRA_NETWORK_KINDS = {"Lora": "lora", "Textual Inversion": "embedding"}
IMG2IMG_MODES = ("img2img", "sketch", "inpaint", "inpaint upload")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
UI_IMAGES = "ui-images"  # cache subfolder of the images the UI serves from outside the outputs folder
CSS = """
#easel-topbar {align-items: end}
.easel-tokens {text-align: right; font-size: 0.8em; opacity: 0.7; min-height: 1em}
.easel-infotext {font-family: monospace; font-size: 0.85em; white-space: pre-wrap; word-break: break-word}
.easel-status {min-height: 1.5em}
.easel-error {color: #d33}
.easel-bar {height: 6px; background: var(--neutral-200); border-radius: 3px; overflow: hidden}
.easel-bar > div {height: 100%; background: var(--color-accent); transition: width 0.2s}
.easel-cards .grid-container {grid-template-columns: repeat(auto-fill, minmax(110px, 140px)) !important;
                              grid-auto-rows: 140px !important}
.easel-cards .thumbnail-item {aspect-ratio: 1 / 1; height: auto !important}
"""


@dataclass
class UIContext:
    """What the handlers share: the runtime, how the server is reached, and the per-session jobs."""

    runtime: Runtime
    public: bool = False  # served beyond this machine: no server-side folder opening
    authenticated: bool = False  # the UI asks for a login (--gradio-auth)
    allow_extension_install: bool = True  # local, or --enable-insecure-extension-access
    jobs: jobs.JobRegistry = field(default_factory=jobs.JobRegistry)
    _tokenizer: Any = None

    @property
    def manager(self) -> ModelManager:
        return self.runtime.manager

    @property
    def options(self) -> Options:
        return self.runtime.options

    @property
    def settings(self):
        return self.runtime.settings

    @property
    def device(self) -> DeviceQueue:
        return self.runtime.device

    @property
    def styles(self) -> StyleDatabase:
        return self.runtime.styles

    def tokenizer(self):
        if self._tokenizer is None:  # every SD family uses CLIP's BPE vocabulary: one counts for all
            self._tokenizer = clip_tokenizer.load_clip_tokenizer(str(self.settings.cache_dir))
        return self._tokenizer

    def wildcards(self) -> Wildcards:
        return Wildcards(self.settings.wildcards_folder)

    def checkpoint_choices(self) -> list[str]:
        return [file.filename for file in self.manager.index.checkpoints]

    def active_checkpoint(self) -> str | None:
        active = self.manager.active
        return active.file.filename if active is not None else None

    def native_size(self) -> int:
        active = self.manager.active
        return active.native_size if active is not None else 512


# -- small pure helpers (tested without a browser) ---------------------------------------------------
def token_counter(tokenizer, text: str, vocabulary: EncoderVocabulary = NO_EMBEDDINGS) -> str:
    """A1111's counter: tokens used / the capacity of the 75-token chunks they take. Extra network
    tags do not count; an embedding counts as its vectors."""
    count = conditioning.count_tokens(tokenizer, parse_tags(text)[0], vocabulary)
    capacity = max(1, -(-count // CHUNK_TOKENS)) * CHUNK_TOKENS
    return f"{count}/{capacity}"


def mask_from_editor(value: dict | None) -> Image.Image | None:
    """The painted strokes of an ImageEditor value as an L mask (white = repaint), or None."""
    if not value or not value.get("layers"):
        return None
    background = value.get("background")
    size = background.size if background is not None else value["layers"][0].size
    mask = Image.new("L", size, 0)
    for layer in value["layers"]:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A").resize(size)
        mask.paste(255, (0, 0), alpha.point(lambda a: 255 if a > 0 else 0))
    return mask if mask.getbbox() else None


def init_from_img2img_inputs(mode: str, image, sketch, editor, upload_image, upload_mask):
    """(init image, mask) for the chosen img2img mode, with a message naming what is missing."""
    if mode == "img2img":
        return _need(image, "img2img needs an image: drop one in the img2img tab"), None
    if mode == "sketch":
        composite = (sketch or {}).get("composite") or (sketch or {}).get("background")
        return _need(composite, "sketch needs an image to draw on"), None
    if mode == "inpaint":
        background = _need((editor or {}).get("background"), "inpaint needs an image to paint a mask on")
        mask = mask_from_editor(editor)
        if mask is None:
            raise gr.Error("inpaint needs a mask: paint over the part of the image to repaint")
        return background, mask
    base = _need(upload_image, "inpaint upload needs an image")
    mask = _need(upload_mask, "inpaint upload needs a mask image (white = repaint)")
    return base, mask


def _need(value, message: str):
    if value is None:
        raise gr.Error(message)
    return value


def fields_from_infotext(text: str) -> dict[str, Any]:
    """Parsed infotext -> GenerationRequest field values (prompt, seed, size... all of them)."""
    return infotext.request_fields(infotext.parse_infotext(text))


def format_infotext_html(text: str) -> str:
    return f"<div class='easel-infotext'>{html.escape(text)}</div>" if text else ""


def progress_html(event: jobs.Running) -> str:
    fraction = event.progress.fraction if event.progress is not None else 0.0
    return (f"<div class='easel-bar'><div style='width:{fraction * 100:.1f}%'></div></div>"
            f"<div>{html.escape(event.describe())}</div>")


def describe_error(exc: BaseException) -> str:
    """One line for the status area: Easel's errors and gradio's as they are, a bug with its class."""
    return str(exc.message) if isinstance(exc, gr.Error) else describe(exc)


def open_folder(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    system = platform.system()
    if system == "Windows":
        os.startfile(path)  # noqa: S606 - opening a local folder for the local user
    else:
        subprocess.Popen(["open" if system == "Darwin" else "xdg-open", str(path)])


# -- the app ---------------------------------------------------------------------------------------
class EaselUI:
    def __init__(self, context: UIContext):
        self.ctx = context
        self.tabs: gr.Tabs | None = None
        self.pages: dict[str, dict[str, gr.components.Component]] = {}

    # Each generation page's controls, keyed by GenerationRequest field name.
    def _generation_controls(self, mode: str) -> dict[str, Any]:
        c: dict[str, Any] = {}
        options, size = self.ctx.options, self.ctx.native_size()
        with gr.Row():
            with gr.Column(scale=6):
                c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{mode}_prompt",
                                         placeholder="a large red star on a blue background, top left")
                c["_prompt_tokens"] = gr.HTML("<div class='easel-tokens'>0/75</div>")
                c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{mode}_neg_prompt")
                c["_negative_tokens"] = gr.HTML("<div class='easel-tokens'>0/75</div>")
                self._extra_networks_panel(c, mode)
            with gr.Column(scale=1, min_width=200):
                c["_generate"] = gr.Button("Generate", variant="primary", elem_id=f"{mode}_generate", size="lg")
                with gr.Row():
                    c["_interrupt"] = gr.Button("Interrupt", visible=False, elem_id=f"{mode}_interrupt")
                    c["_skip"] = gr.Button("Skip", visible=False, elem_id=f"{mode}_skip")
                c["_styles"] = gr.Dropdown(self.ctx.styles.names, multiselect=True, label="Styles",
                                           elem_id=f"{mode}_styles")
                with gr.Row():
                    c["_apply_styles"] = gr.Button("Apply styles", size="sm")
                    c["_style_name"] = gr.Textbox(show_label=False, placeholder="new style name", scale=2)
                    c["_save_style"] = gr.Button("Save style", size="sm")
        with gr.Row():
            with gr.Column(scale=1):
                if mode == "img2img":
                    self._img2img_inputs(c)
                with gr.Row():
                    c["sampler"] = gr.Dropdown(list(SAMPLER_NAMES), value=options.default_sampler, label="Sampling method",
                                               elem_id=f"{mode}_sampler")
                    c["schedule_type"] = gr.Dropdown(list(SCHEDULE_TYPES), value="Automatic", label="Schedule type")
                c["steps"] = gr.Slider(1, 150, value=options.default_steps, step=1, label="Sampling steps",
                                       elem_id=f"{mode}_steps")
                with gr.Row():
                    with gr.Column(scale=4):
                        c["width"] = gr.Slider(MIN_SIZE, 2048, value=size, step=8, label="Width", elem_id=f"{mode}_width")
                        c["height"] = gr.Slider(MIN_SIZE, 2048, value=size, step=8, label="Height",
                                                elem_id=f"{mode}_height")
                    c["_swap"] = gr.Button("⇅", elem_id=f"{mode}_swap", scale=0, min_width=40)
                    with gr.Column(scale=2):
                        c["batch_count"] = gr.Slider(1, 100, value=1, step=1, label="Batch count",
                                                     elem_id=f"{mode}_batch_count")
                        c["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{mode}_batch_size")
                c["cfg_scale"] = gr.Slider(1, 30, value=options.default_cfg_scale, step=0.5, label="CFG Scale",
                                           elem_id=f"{mode}_cfg_scale")
                if mode == "img2img":
                    c["denoising_strength"] = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                                                        elem_id="img2img_denoising_strength")
                c["restore_faces"] = gr.Checkbox(False, label="Restore faces (the model is chosen in Settings)",
                                                 elem_id=f"{mode}_restore_faces")
                with gr.Row():
                    c["seed"] = gr.Number(-1, label="Seed", precision=0, elem_id=f"{mode}_seed", scale=4)
                    c["_random_seed"] = gr.Button("🎲", scale=0, min_width=40, elem_id=f"{mode}_random_seed")
                    c["_reuse_seed"] = gr.Button("♻", scale=0, min_width=40, elem_id=f"{mode}_reuse_seed")
                with gr.Accordion("Variation seed", open=False):
                    with gr.Row():
                        c["subseed"] = gr.Number(-1, label="Variation seed", precision=0)
                        c["subseed_strength"] = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength")
                    with gr.Row():
                        c["seed_resize_from_w"] = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width")
                        c["seed_resize_from_h"] = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height")
                if mode == "txt2img":
                    self._hires_controls(c)
                self._extension_panels(c, mode)
                with gr.Accordion("Wildcards", open=False):
                    c["_wildcards"] = gr.Dataset(
                        components=[gr.Textbox(visible=False), gr.Textbox(visible=False)], headers=["wildcard", "lines"],
                        samples=self._wildcard_samples(), label="Click one to add it to the prompt", type="values",
                        elem_id=f"{mode}_wildcards", samples_per_page=20)
                    c["_refresh_wildcards"] = gr.Button("🔄 Rescan wildcards", size="sm")
            with gr.Column(scale=1):
                c["_progress"] = gr.HTML("", elem_classes="easel-status", elem_id=f"{mode}_progress")
                c["_preview"] = gr.Image(label="Live preview", visible=False, interactive=False, type="pil",
                                         format="png", elem_id=f"{mode}_preview")
                c["_gallery"] = gr.Gallery(label="Output", columns=2, height=420, format="png",
                                           elem_id=f"{mode}_gallery", buttons=["download", "fullscreen"],
                                           interactive=False)
                with gr.Row():
                    c["_open_folder"] = gr.Button("📂 Open folder", size="sm")
                    c["_to_img2img"] = gr.Button("Send to img2img", size="sm", elem_id=f"{mode}_send_to_img2img")
                    c["_to_inpaint"] = gr.Button("Send to inpaint", size="sm", elem_id=f"{mode}_send_to_inpaint")
                    c["_to_extras"] = gr.Button("Send to extras", size="sm", elem_id=f"{mode}_send_to_extras")
                c["_infotext"] = gr.HTML("", elem_id=f"{mode}_infotext")
        # Per-browser state
        c["_infotexts"] = gr.State([])
        c["_paths"] = gr.State([])
        c["_selected"] = gr.State(0)
        c["_last_seed"] = gr.State(-1)
        return c

    def _extension_panels(self, c: dict[str, Any], mode: str) -> None:
        """Each extension's panel (values reach it as `event.args`, keys `_ext:<name>:<control>`), and
        the Script dropdown with each script's controls (keys `_ext:<script title>:<control>`)."""
        registry = self.ctx.manager.extensions
        for extension in registry.panels(mode):
            with gr.Accordion(extension.panel.title, open=False, elem_id=f"{mode}_ext_{extension.name}"):
                self._controls(c, mode, extension.name, extension.panel.controls)
        scripts = registry.scripts(mode)
        if not scripts:
            return
        c["script_name"] = gr.Dropdown(["None", *(s.title for s in scripts)], value="None", label="Script",
                                       elem_id=f"{mode}_script")
        for script in scripts:
            slug = _slug(script.title)
            with gr.Accordion(f"{script.title} settings", open=False, elem_id=f"{mode}_script_{slug}"):
                self._controls(c, mode, script.title, script.controls, slug)

    @staticmethod
    def _controls(c: dict[str, Any], mode: str, owner: str, controls, slug: str | None = None) -> None:
        for control in controls:
            key, elem_id = f"_ext:{owner}:{control.name}", f"{mode}_ext_{slug or owner}_{control.name}"
            label, default = control.label, control.default
            if control.kind == "checkbox":
                c[key] = gr.Checkbox(bool(default), label=label, elem_id=elem_id)
            elif control.kind == "slider":
                c[key] = gr.Slider(control.minimum, control.maximum, value=default, step=control.step, label=label,
                                   elem_id=elem_id)
            elif control.kind == "number":
                c[key] = gr.Number(default, label=label, elem_id=elem_id)
            elif control.kind == "dropdown":
                c[key] = gr.Dropdown(list(control.choices), value=default, label=label, elem_id=elem_id)
            else:  # "text", "textarea"
                c[key] = gr.Textbox(str(default or ""), label=label, lines=6 if control.kind == "textarea" else 1,
                                    elem_id=elem_id)

    def _hires_controls(self, c: dict[str, Any]) -> None:
        upscalers = [*HIRES_LATENT_MODES, *(n for n in self.ctx.manager.upscalers.names if n != "None")]
        with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hires"):
            c["enable_hr"] = gr.Checkbox(False, label="Hires. fix: upscale, then a second pass at the large size",
                                         elem_id="txt2img_enable_hr")
            with gr.Row():
                c["hr_upscaler"] = gr.Dropdown(upscalers, value="Latent", label="Upscaler", elem_id="txt2img_hr_upscaler")
                c["hr_second_pass_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: same as sampling)",
                                                      elem_id="txt2img_hires_steps")
                c["denoising_strength"] = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                                    elem_id="txt2img_denoising_strength")
            with gr.Row():
                c["hr_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
                c["hr_resize_x"] = gr.Slider(0, 2048, value=0, step=8, label="Resize width to", elem_id="txt2img_hr_resize_x")
                c["hr_resize_y"] = gr.Slider(0, 2048, value=0, step=8, label="Resize height to",
                                             elem_id="txt2img_hr_resize_y")
            c["hr_sampler"] = gr.Dropdown([SAME_SAMPLER, *SAMPLER_NAMES], value=SAME_SAMPLER, label="Hires sampling method",
                                          elem_id="txt2img_hr_sampler")
            with gr.Row():
                c["hr_prompt"] = gr.Textbox(label="Hires prompt (empty: the prompt)", lines=2, elem_id="txt2img_hr_prompt")
                c["hr_negative_prompt"] = gr.Textbox(label="Hires negative prompt (empty: the negative prompt)", lines=2,
                                                     elem_id="txt2img_hr_neg_prompt")

    def _extra_networks_panel(self, c: dict[str, Any], mode: str) -> None:
        with gr.Accordion("Extra networks", open=False, elem_id=f"{mode}_extra_networks"):
            with gr.Row():
                c["_en_kind"] = gr.Radio(list(EXTRA_NETWORK_KINDS), value="Lora", show_label=False,
                                         elem_id=f"{mode}_extra_kind")
                c["_en_search"] = gr.Textbox(show_label=False, placeholder="Search", elem_id=f"{mode}_extra_search")
                c["_en_folder"] = gr.Dropdown([extra_networks.ALL_FOLDERS], value=extra_networks.ALL_FOLDERS,
                                              label="Subfolder", elem_id=f"{mode}_extra_folder")
            with gr.Row():
                c["_en_negative"] = gr.Checkbox(False, label="Click adds to the negative prompt",
                                                elem_id=f"{mode}_extra_negative")
                c["_en_refresh"] = gr.Button("🔄 Refresh", size="sm", elem_id=f"{mode}_extra_refresh")
            images, shown, _ = self._extra_cards("Lora", "", extra_networks.ALL_FOLDERS)
            c["_en_cards"] = gr.Gallery(images, columns=6, height=320, allow_preview=False, show_label=False,
                                        elem_id=f"{mode}_extra_cards", elem_classes="easel-cards", interactive=False)
            c["_en_shown"] = gr.State(shown)
            c["_en_details"] = gr.JSON(label="Card details", visible=False, elem_id=f"{mode}_extra_details")

    def _extra_cards(self, kind: str, search: str, folder: str) -> tuple[list, list[str], list[str]]:
        """(gallery items, the shown cards' names in order, subfolder choices) for one kind."""
        manager = self.ctx.manager
        library = manager.loras if kind == "Lora" else manager.embeddings
        all_cards = extra_networks.cards(EXTRA_NETWORK_KINDS[kind], library.files)
        shown = extra_networks.filter_cards(all_cards, search, folder)
        images = [(str(extra_networks.card_image(card, self.ctx.settings.cache_dir)), card.name) for card in shown]
        return images, [card.file.name for card in shown], extra_networks.folders(all_cards)

    def _wildcard_samples(self) -> list[list[str]]:
        return [[f"__{f.name}__", str(f.lines)] for f in self.ctx.wildcards().files()] or [["(no wildcard files)", ""]]

    def _img2img_inputs(self, c: dict[str, Any]) -> None:
        c["_mode"] = gr.State("img2img")
        with gr.Tabs(elem_id="img2img_modes") as modes:
            self.img2img_modes = modes
            with gr.Tab("img2img", id="img2img") as tab:
                c["_image"] = gr.Image(label="Image", type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                                       elem_id="img2img_image", format="png")
                tab.select(lambda: "img2img", outputs=c["_mode"], queue=False)
            with gr.Tab("Sketch", id="sketch") as tab:
                c["_sketch"] = gr.ImageEditor(label="Sketch", type="pil", image_mode="RGB", elem_id="img2img_sketch",
                                              format="png", brush=gr.Brush(colors=["#000000", "#ffffff", "#d82828"]))
                tab.select(lambda: "sketch", outputs=c["_mode"], queue=False)
            with gr.Tab("Inpaint", id="inpaint") as tab:
                c["_inpaint"] = gr.ImageEditor(label="Image (paint the mask)", type="pil", image_mode="RGBA",
                                               elem_id="img2img_inpaint", format="png",
                                               brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
                tab.select(lambda: "inpaint", outputs=c["_mode"], queue=False)
            with gr.Tab("Inpaint upload", id="inpaint upload") as tab:
                with gr.Row():
                    c["_upload_image"] = gr.Image(label="Image", type="pil", image_mode="RGB", format="png",
                                                  elem_id="img2img_upload_image")
                    c["_upload_mask"] = gr.Image(label="Mask (white = repaint)", type="pil", image_mode="L",
                                                 format="png", elem_id="img2img_upload_mask")
                tab.select(lambda: "inpaint upload", outputs=c["_mode"], queue=False)
        c["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode")
        with gr.Accordion("Inpaint settings", open=False):
            c["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="img2img_mask_blur")
            c["invert_mask"] = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask mode", type="index")
            c["masked_content"] = gr.Radio(list(MASKED_CONTENT), value="original", label="Masked content")
            c["inpaint_area"] = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="Inpaint area")
            c["only_masked_padding"] = gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels")

    # -- building the request ----------------------------------------------------------------------
    def build_request(self, mode: str, values: dict[str, Any], top: dict[str, Any]) -> GenerationRequest:
        page = self.pages[mode]
        fields = {name: values[component] for name, component in page.items()
                  if not name.startswith("_") and component in values}
        for name in ("steps", "width", "height", "batch_count", "batch_size", "seed", "subseed",
                     "seed_resize_from_w", "seed_resize_from_h", "mask_blur", "only_masked_padding",
                     "hr_second_pass_steps", "hr_resize_x", "hr_resize_y"):
            if fields.get(name) is not None:
                fields[name] = int(fields[name])
        if "invert_mask" in fields:
            fields["invert_mask"] = fields["invert_mask"] == 1
        if mode == "img2img":
            image, mask = init_from_img2img_inputs(
                values[page["_mode"]], values[page["_image"]], values[page["_sketch"]], values[page["_inpaint"]],
                values[page["_upload_image"]], values[page["_upload_mask"]],
            )
            fields["init_image"], fields["mask"] = image.convert("RGB"), mask
        return GenerationRequest(
            **{**self.ctx.runtime.request_defaults(mode), **fields},
            checkpoint=top["checkpoint"] or None,
            vae=top["vae"] or None,
            clip_skip=int(top["clip_skip"]),
            styles=tuple(values.get(page["_styles"]) or ()),
            script_args=self._script_args(page, values),
        )

    @staticmethod
    def _script_args(page: dict[str, Any], values: dict[str, Any]) -> dict[str, dict[str, Any]]:
        script_args: dict[str, dict[str, Any]] = {}
        for key, component in page.items():
            if key.startswith("_ext:") and component in values:
                name, _, control = key[len("_ext:"):].rpartition(":")
                script_args.setdefault(name, {})[control] = values[component]
        return script_args

    # -- events ------------------------------------------------------------------------------------
    def _wire_generation(self, mode: str, top: dict[str, Any]) -> None:
        c = self.pages[mode]
        ctx = self.ctx
        inputs = {comp for name, comp in c.items() if not name.startswith("_") or name.startswith("_ext:")}
        inputs |= {c["_styles"]}
        if mode == "img2img":
            inputs |= {c["_mode"], c["_image"], c["_sketch"], c["_inpaint"], c["_upload_image"], c["_upload_mask"]}
        inputs |= set(top.values())
        buttons = [c["_generate"], c["_interrupt"], c["_skip"]]

        def prepare(request: gr.Request):
            ctx.jobs.prepare(request.session_hash, ctx.options.live_preview_every)
            return gr.update(visible=False), gr.update(visible=True), gr.update(visible=True)

        def run(values: dict, request: gr.Request):
            session = request.session_hash
            job = ctx.jobs.job(session) or ctx.jobs.prepare(session, ctx.options.live_preview_every)
            try:
                generation = self.build_request(mode, values, {k: values[v] for k, v in top.items()})
            except (gr.Error, ValueError) as exc:
                ctx.jobs.finish(session, job)
                message = exc.message if isinstance(exc, gr.Error) else str(exc)
                yield {c["_progress"]: _error_html(message)}
                return
            try:
                for event in jobs.run(lambda control: generate(ctx.manager, generation, control), job, ctx.device,
                                      owner=f"ui:{session}", kind=mode):
                    if isinstance(event, jobs.Running):
                        update = {c["_progress"]: progress_html(event)}
                        if event.progress is not None and event.progress.preview is not None:
                            update[c["_preview"]] = gr.update(value=event.progress.preview, visible=True)
                        yield update
                        continue
                    yield self._finished(mode, event)
            finally:
                ctx.jobs.finish(session, job)

        def restore():
            return gr.update(visible=True), gr.update(visible=False), gr.update(visible=False)

        outputs = [c["_progress"], c["_preview"], c["_gallery"], c["_infotext"], c["_infotexts"], c["_paths"],
                   c["_selected"], c["_last_seed"]]
        c["_generate"].click(prepare, outputs=buttons, queue=False).then(
            run, inputs=inputs, outputs=outputs, concurrency_limit=None,  # the device queue orders the jobs
            show_progress="hidden", api_visibility="private",
        ).then(restore, outputs=buttons, queue=False)
        def interrupt(request: gr.Request) -> None:  # only this browser's job
            ctx.jobs.interrupt(request.session_hash)

        def skip(request: gr.Request) -> None:
            ctx.jobs.skip(request.session_hash)

        c["_interrupt"].click(interrupt, queue=False, api_visibility="private")
        c["_skip"].click(skip, queue=False, api_visibility="private")

    def _finished(self, mode: str, event: jobs.Finished) -> dict:
        c = self.pages[mode]
        if event.error is not None:
            logger.error("Generation failed", exc_info=event.error)
            return {c["_progress"]: _error_html(describe_error(event.error)), c["_preview"]: gr.update(visible=False)}
        result = event.result
        paths = [self._servable_path(image) for image in result.images]
        texts = [image.infotext for image in result.images]
        status = f"{len(result.images)} image{'s' * (len(result.images) != 1)} in {event.elapsed:.1f}s"
        if result.interrupted:
            status = "Interrupted · " + status
        status += "".join(f"<br>{html.escape(n)}" for n in result.notes)
        if result.warnings:
            status += "".join(f"<br>⚠ {w}" for w in result.warnings)
        return {
            c["_progress"]: f"<div>{status}</div>",
            c["_preview"]: gr.update(visible=False),
            c["_gallery"]: gr.update(value=[(str(p), None) for p in paths], selected_index=0 if paths else None),
            c["_infotext"]: format_infotext_html(texts[0] if texts else ""),
            c["_infotexts"]: texts,
            c["_paths"]: [str(p) for p in paths],
            c["_selected"]: 0,
            c["_last_seed"]: result.images[0].seed if result.images else result.request.seed,
        }

    def _servable_path(self, image) -> Path:
        """A file the UI may serve with the image and its infotext: the saved PNG when it is under the
        outputs folder, else a PNG in the cache (saving off, or a folder of the user's choosing)."""
        root = self.ctx.settings.output_root.resolve()
        if image.path is not None and root in Path(image.path).resolve().parents:
            return image.path
        folder = self.ctx.settings.cache_dir / UI_IMAGES
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, suffix=".png")
        with os.fdopen(fd, "wb") as handle:
            image.image.save(handle, format="PNG", pnginfo=outputs.png_info(image.infotext))
        return Path(name)

    def _wire_page_helpers(self, mode: str) -> None:
        c, ctx = self.pages[mode], self.ctx
        def count(value: str) -> str:
            model = ctx.manager.active
            vocabulary = ctx.manager.embeddings.for_model(model).per_encoder[0] if model else NO_EMBEDDINGS
            return f"<div class='easel-tokens'>{token_counter(ctx.tokenizer(), value, vocabulary)}</div>"

        for text, counter in (("prompt", "_prompt_tokens"), ("negative_prompt", "_negative_tokens")):
            c[text].change(count, inputs=c[text], outputs=c[counter], queue=False, trigger_mode="always_last",
                           show_progress="hidden", api_visibility="private")
        c["_swap"].click(lambda w, h: (h, w), inputs=[c["width"], c["height"]], outputs=[c["width"], c["height"]],
                         queue=False, api_visibility="private")
        c["_random_seed"].click(lambda: -1, outputs=c["seed"], queue=False, api_visibility="private")
        c["_reuse_seed"].click(lambda seed: seed, inputs=c["_last_seed"], outputs=c["seed"], queue=False,
                               api_visibility="private")

        def apply_styles(names, prompt, negative):
            prompt, negative = ctx.styles.apply(names or [], prompt, negative)
            return prompt, negative, []

        c["_apply_styles"].click(apply_styles, inputs=[c["_styles"], c["prompt"], c["negative_prompt"]],
                                 outputs=[c["prompt"], c["negative_prompt"], c["_styles"]], queue=False,
                                 api_visibility="private")

        def save_style(name, prompt, negative):
            try:
                ctx.styles.save(Style(name or "", prompt, negative))
            except (ValueError, OSError) as exc:
                raise gr.Error(f"cannot save the style: {exc}") from exc
            gr.Info(f"Saved style '{name.strip()}' to {ctx.styles.path}")
            return gr.update(choices=ctx.styles.names), ""

        c["_save_style"].click(save_style, inputs=[c["_style_name"], c["prompt"], c["negative_prompt"]],
                               outputs=[c["_styles"], c["_style_name"]], queue=False, api_visibility="private")

        def select(infotexts, evt: gr.SelectData):
            index = evt.index if isinstance(evt.index, int) else 0
            text = infotexts[index] if 0 <= index < len(infotexts) else ""
            return format_infotext_html(text), index

        def insert_wildcard(sample, prompt):
            name = sample[0] if sample else ""
            if not name.startswith("__"):
                return prompt
            return f"{prompt.rstrip()} {name}".strip() if prompt.strip() else name

        c["_wildcards"].click(insert_wildcard, inputs=[c["_wildcards"], c["prompt"]], outputs=c["prompt"], queue=False,
                              api_visibility="private")
        c["_refresh_wildcards"].click(lambda: gr.Dataset(samples=self._wildcard_samples()), outputs=c["_wildcards"],
                                      queue=False, api_visibility="private")

        c["_gallery"].select(select, inputs=c["_infotexts"], outputs=[c["_infotext"], c["_selected"]], queue=False,
                             api_visibility="private")
        self._wire_extra_networks(mode)

        def open_outputs():
            folder = ctx.runtime.output_dir(mode)
            if ctx.public:
                gr.Info(f"Images are saved on the server in {folder}")
                return
            try:
                open_folder(folder)
            except OSError as exc:
                gr.Warning(f"Cannot open {folder}: {exc}")

        c["_open_folder"].click(open_outputs, queue=False, api_visibility="private")

    def _wire_extra_networks(self, mode: str) -> None:
        c, ctx = self.pages[mode], self.ctx

        def show(kind, search, folder):
            images, shown, folders = self._extra_cards(kind, search or "", folder or extra_networks.ALL_FOLDERS)
            folder = folder if folder in folders else extra_networks.ALL_FOLDERS
            return images, shown, gr.Dropdown(choices=folders, value=folder)

        filters = [c["_en_kind"], c["_en_search"], c["_en_folder"]]
        shown_outputs = [c["_en_cards"], c["_en_shown"], c["_en_folder"]]
        for component in filters:
            component.change(show, inputs=filters, outputs=shown_outputs, queue=False, show_progress="hidden",
                             trigger_mode="always_last", api_visibility="private")

        def refresh(kind, search, folder):
            ctx.manager.loras.refresh()
            ctx.manager.embeddings.refresh()
            return show(kind, search, folder)

        c["_en_refresh"].click(refresh, inputs=filters, outputs=shown_outputs, queue=False, api_visibility="private")

        def pick(kind, shown, prompt, negative, into_negative, evt: gr.SelectData):
            library = ctx.manager.loras if kind == "Lora" else ctx.manager.embeddings
            name = shown[evt.index] if isinstance(evt.index, int) and 0 <= evt.index < len(shown) else None
            file = next((f for f in library.files if f.name == name), None)
            if file is None:
                raise gr.Error("That file is gone: press Refresh")
            card = extra_networks.cards(EXTRA_NETWORK_KINDS[kind], [file])[0]
            if into_negative:
                negative = extra_networks.toggle_tag(negative, card.tag)
            else:
                prompt = extra_networks.toggle_tag(prompt, card.tag)
            details = (extra_networks.lora_details(file, ctx.manager.loras.metadata(file)) if kind == "Lora"
                       else extra_networks.embedding_details(file))
            # Clear the selection, so that a second click on the same card is an event too.
            return prompt, negative, gr.JSON(details, visible=True), gr.Gallery(selected_index=None)

        c["_en_cards"].select(pick, inputs=[c["_en_kind"], c["_en_shown"], c["prompt"], c["negative_prompt"],
                                            c["_en_negative"]],
                              outputs=[c["prompt"], c["negative_prompt"], c["_en_details"], c["_en_cards"]],
                              queue=False, api_visibility="private")

    def _wire_send_to(self, source: str) -> None:
        """Send the selected image and its parameters to img2img or its inpaint tab."""
        c, target = self.pages[source], self.pages["img2img"]
        shared = [name for name in target if not name.startswith("_") and name in c]

        def send(paths, infotexts, selected, *current, inpaint: bool):
            if not paths:
                raise gr.Error("generate an image first")
            index = selected if 0 <= selected < len(paths) else 0
            image = Image.open(paths[index])
            image.load()
            values = dict(zip(shared, current))
            values.update({k: v for k, v in fields_from_infotext(infotexts[index]).items() if k in values})
            image_update = image.convert("RGB")
            editor_update = {"background": image.convert("RGBA"), "layers": [], "composite": None}
            return (
                gr.Tabs(selected="img2img"),
                gr.Tabs(selected="inpaint" if inpaint else "img2img"),
                "inpaint" if inpaint else "img2img",
                editor_update if inpaint else gr.skip(),
                gr.skip() if inpaint else image_update,
                *[values[name] for name in shared],
            )

        outputs = [self.tabs, self.img2img_modes, target["_mode"], target["_inpaint"], target["_image"]]
        outputs += [target[name] for name in shared]
        inputs = [c["_paths"], c["_infotexts"], c["_selected"], *[c[name] for name in shared]]
        c["_to_img2img"].click(lambda *a: send(*a, inpaint=False), inputs=inputs, outputs=outputs, queue=False,
                               api_visibility="private")
        c["_to_inpaint"].click(lambda *a: send(*a, inpaint=True), inputs=inputs, outputs=outputs, queue=False,
                               api_visibility="private")

        def to_extras(paths, selected):
            if not paths:
                raise gr.Error("generate an image first")
            # The saved PNG itself, so its parameters reach Extras' result.
            path = paths[selected if 0 <= selected < len(paths) else 0]
            return gr.Tabs(selected="extras"), gr.Tabs(selected="single"), "single", str(path)

        extras = self.extras
        c["_to_extras"].click(to_extras, inputs=[c["_paths"], c["_selected"]],
                              outputs=[self.tabs, extras["sources"], extras["source"], extras["image"]], queue=False,
                              api_visibility="private")

    # -- tabs ------------------------------------------------------------------------------------------
    def _top_bar(self) -> dict[str, Any]:
        ctx = self.ctx
        with gr.Row(elem_id="easel-topbar"):
            checkpoint = gr.Dropdown(ctx.checkpoint_choices(), value=ctx.active_checkpoint(), label="Stable Diffusion checkpoint",
                                     elem_id="setting_sd_model_checkpoint", scale=4)
            refresh = gr.Button("🔄", scale=0, min_width=40, elem_id="refresh_checkpoints")
            vae = gr.Dropdown(ctx.manager.vae_options(), value=ctx.manager.vae_choice, label="SD VAE",
                              elem_id="setting_sd_vae", scale=2)
            clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip", scale=2, elem_id="setting_clip_skip")
        status = gr.HTML("", elem_classes="easel-status", elem_id="model_status")  # filled on page load
        self.model_status = status
        top = {"checkpoint": checkpoint, "vae": vae, "clip_skip": clip_skip}

        def refresh_lists(current_checkpoint, current_vae):
            ctx.manager.refresh()
            checkpoints, vaes = ctx.checkpoint_choices(), ctx.manager.vae_options()
            return (gr.update(choices=checkpoints, value=current_checkpoint if current_checkpoint in checkpoints else None),
                    gr.update(choices=vaes, value=current_vae if current_vae in vaes else vaes[0]))

        refresh.click(refresh_lists, inputs=[checkpoint, vae], outputs=[checkpoint, vae], queue=False,
                      api_visibility="private")
        self._top = top
        return top

    def _model_status(self, error: str | None = None) -> str:
        active = self.ctx.manager.active
        text = (f"Model: {active.name} · {active.label} · {active.native_size}px native" if active is not None
                else "No model loaded")
        if error:
            return _error_html(error) + f"<div>{text}</div>"
        return f"<div>{text}</div>"

    def _wire_top_bar(self) -> None:
        ctx, top = self.ctx, self._top
        size_outputs = [self.pages[m][n] for m in ("txt2img", "img2img") for n in ("width", "height")]

        def switch(name, *sizes):
            previous = ctx.manager.active
            old_size = previous.native_size if previous is not None else None
            yield {self.model_status: f"<div>Loading {name}...</div>"}
            try:
                model = ctx.manager.select(name)
            except Exception as exc:  # a broken file must not take the app down
                logger.error("Loading %s failed", name, exc_info=exc)
                yield {self.model_status: self._model_status(f"Cannot load {name}: {describe_error(exc)}"),
                       top["checkpoint"]: gr.update(choices=ctx.checkpoint_choices(), value=ctx.active_checkpoint())}
                return
            update: dict = {self.model_status: self._model_status()}
            # Follow the new model's native size where the user had not changed it
            for component, value in zip(size_outputs, sizes):
                if value == old_size and model.native_size != old_size:
                    update[component] = model.native_size
            yield update

        top["checkpoint"].input(switch, inputs=[top["checkpoint"], *size_outputs],
                                outputs=[self.model_status, top["checkpoint"], *size_outputs],
                                concurrency_id="device", concurrency_limit=1, show_progress="hidden",
                                trigger_mode="always_last", api_visibility="private")

        def switch_vae(choice):
            try:
                with ctx.manager.lock:
                    ctx.manager.set_vae(choice)
            except Exception as exc:
                return self._model_status(f"Cannot use VAE {choice}: {describe_error(exc)}"), ctx.manager.vae_choice
            return self._model_status(), choice

        top["vae"].input(switch_vae, inputs=top["vae"], outputs=[self.model_status, top["vae"]],
                         concurrency_id="device", concurrency_limit=1, api_visibility="private")

    def _extras_tab(self) -> None:
        """A1111's Extras: upscale one image, uploaded files, or a folder of images."""
        ctx = self.ctx
        names = ctx.manager.upscalers.names
        with gr.Row():
            with gr.Column():
                with gr.Tabs() as source_tabs:
                    with gr.Tab("Single image", id="single") as single_tab:
                        # A file path, not a decoded image: the PNG's parameters must reach the result.
                        single = gr.Image(type="filepath", label="Source", elem_id="extras_image")
                    with gr.Tab("Batch process", id="batch") as batch_tab:
                        files = gr.File(file_count="multiple", label="Images", elem_id="extras_files")
                    with gr.Tab("Batch from directory", id="folder") as folder_tab:
                        input_dir = gr.Textbox(label="Input directory (on the server)", elem_id="extras_input_dir")
                        output_dir = gr.Textbox(label="Output directory (empty: outputs/extras-images)",
                                                elem_id="extras_output_dir")
                source = gr.State("single")
                self.extras = {"sources": source_tabs, "source": source, "image": single}
                for tab, name in ((single_tab, "single"), (batch_tab, "batch"), (folder_tab, "folder")):
                    tab.select(lambda name=name: name, outputs=source, queue=False, api_visibility="private")
                with gr.Tabs():
                    with gr.Tab("Scale by") as by_tab:
                        scale = gr.Slider(1, 8, value=4, step=0.05, label="Resize", elem_id="extras_scale")
                    with gr.Tab("Scale to") as to_tab:
                        with gr.Row():
                            width = gr.Number(512, label="Width", precision=0, elem_id="extras_width")
                            height = gr.Number(512, label="Height", precision=0, elem_id="extras_height")
                            crop = gr.Checkbox(True, label="Crop to fit")
                resize_mode = gr.State("by")
                by_tab.select(lambda: "by", outputs=resize_mode, queue=False, api_visibility="private")
                to_tab.select(lambda: "to", outputs=resize_mode, queue=False, api_visibility="private")
                with gr.Row():
                    upscaler = gr.Dropdown(names, value=names[1] if len(names) > 1 else names[0], label="Upscaler 1",
                                           elem_id="extras_upscaler_1")
                    upscaler_2 = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id="extras_upscaler_2")
                    visibility = gr.Slider(0, 1, value=0, step=0.01, label="Upscaler 2 visibility")
                with gr.Row():
                    gfpgan = gr.Slider(0, 1, value=0, step=0.001, label="GFPGAN visibility", elem_id="extras_gfpgan")
                    codeformer = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer visibility",
                                           elem_id="extras_codeformer")
                    codeformer_weight = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer weight (0 = strongest)",
                                                  elem_id="extras_codeformer_weight")
                refresh = gr.Button("🔄 Rescan upscaler folders", size="sm")
                run_button = gr.Button("Generate", variant="primary", elem_id="extras_generate")
            with gr.Column():
                gallery = gr.Gallery(label="Result", columns=2, height=420, format="png", elem_id="extras_gallery",
                                     buttons=["download", "fullscreen"], interactive=False)
                info = gr.HTML("", elem_id="extras_info")

        def rescan():
            ctx.manager.upscalers.refresh()
            choices = ctx.manager.upscalers.names
            return gr.Dropdown(choices=choices), gr.Dropdown(choices=choices)

        refresh.click(rescan, outputs=[upscaler, upscaler_2], queue=False, api_visibility="private")

        def run(source, image, uploads, folder_in, folder_out, mode, scale, width, height, crop, first, second,
                visibility, gfpgan_visibility, codeformer_visibility, weight):
            images = self._extras_inputs(source, image, uploads, folder_in)
            request = ExtrasRequest(
                upscaler=first, scale=float(scale), resize_to=(int(width), int(height)) if mode == "to" else None,
                crop=bool(crop), upscaler_2=second, upscaler_2_visibility=float(visibility),
                gfpgan_visibility=float(gfpgan_visibility), codeformer_visibility=float(codeformer_visibility),
                codeformer_weight=float(weight), output_dir=Path(folder_out) if source == "folder" and folder_out.strip() else None)
            try:
                results = ctx.device.submit(
                    lambda control: run_extras(ctx.manager.upscalers, images, request, ctx.settings.output_root,
                                               should_stop=lambda: control.interrupted, faces=ctx.manager.faces),
                    owner="ui:extras", kind="extras").wait()
            except (UpscalerError, FaceRestorationError) as exc:
                raise gr.Error(str(exc)) from exc
            text = results[0].postprocessing if results else ""
            notes = "".join(f"<br>{html.escape(n)}" for n in (results[0].notes if results else []))
            return [str(r.path) for r in results], f"<div class='easel-infotext'>{html.escape(text)}{notes}</div>"

        run_button.click(run, inputs=[source, single, files, input_dir, output_dir, resize_mode, scale, width, height,
                                      crop, upscaler, upscaler_2, visibility, gfpgan, codeformer, codeformer_weight],
                         outputs=[gallery, info], concurrency_limit=None, api_visibility="private")

    def _extras_inputs(self, source: str, image, uploads, folder: str) -> list[Image.Image]:
        """The images of the chosen source; a file that is not an image names itself in the error."""
        if source == "single":
            paths = [Path(_need(image, "Drop an image into Source first"))]
        elif source == "batch":
            paths = [Path(getattr(f, "name", f)) for f in (uploads or [])]
            if not paths:
                raise gr.Error("Add image files first")
        else:
            folder_path = Path(folder.strip())
            if not folder.strip() or not folder_path.is_dir():
                raise gr.Error(f"Input directory '{folder}' does not exist on the server")
            paths = sorted(p for p in folder_path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
            if not paths:
                raise gr.Error(f"No images in {folder_path}")
        images = []
        for path in paths:
            try:
                loaded = Image.open(path)
                loaded.load()
            except OSError as exc:
                raise gr.Error(f"{path.name} is not an image Easel can read: {exc}") from exc
            images.append(loaded)
        return images

    def _png_info_tab(self) -> None:
        with gr.Row():
            with gr.Column():
                upload = gr.Image(label="Source", type="filepath", sources=["upload", "clipboard"],
                                  elem_id="pnginfo_image")
            with gr.Column():
                shown = gr.HTML(elem_id="pnginfo_html")
                raw = gr.State("")
                with gr.Row():
                    to_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_send_to_txt2img")
                    to_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_to_img2img")

        def read(path):
            if not path:
                return "", ""
            try:
                with Image.open(path) as image:
                    text = outputs.read_infotext(image)
            except OSError as exc:
                return _error_html(f"Cannot read the image: {exc}"), ""
            if not text:
                return "<div>No generation parameters found in this image.</div>", ""
            parsed = infotext.parse_infotext(text)
            rows = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(str(v))}</td></tr>"
                           for k, v in parsed.items())
            return format_infotext_html(text) + f"<table>{rows}</table>", text

        upload.change(read, inputs=upload, outputs=[shown, raw], queue=False, api_visibility="private")
        for button, mode in ((to_txt2img, "txt2img"), (to_img2img, "img2img")):
            page = self.pages[mode]
            names = [n for n in page if not n.startswith("_")]

            def send(text, path, *current, names=names, mode=mode):
                if not text:
                    raise gr.Error("drop a PNG with generation parameters first")
                values = dict(zip(names, current))
                values.update({k: v for k, v in fields_from_infotext(text).items() if k in values})
                styles = self._styles_from_infotext(text, values)
                image = gr.skip()
                if mode == "img2img" and path:
                    image = Image.open(path).convert("RGB")
                return (gr.Tabs(selected=mode), image, styles, *[values[n] for n in names])

            image_output = self.pages["img2img"]["_image"]
            button.click(send, inputs=[raw, upload, *[page[n] for n in names]],
                         outputs=[self.tabs, image_output, page["_styles"], *[page[n] for n in names]], queue=False,
                         api_visibility="private")

    def _styles_from_infotext(self, text: str, values: dict) -> list[str]:
        """A1111's paste: with a `Styles array`, take the styles' text back out of the prompts and
        select the styles instead (left as they are when the prompts do not unwind)."""
        try:
            names = json.loads(infotext.parse_infotext(text).get("Styles array", "[]"))
        except ValueError:
            return []
        if not isinstance(names, list) or not names:
            return []
        self.ctx.styles.reload()
        unwound = self.ctx.styles.extract([str(n) for n in names], values.get("prompt", ""),
                                          values.get("negative_prompt", ""))
        if unwound is None:
            return []
        values["prompt"], values["negative_prompt"] = unwound
        return [str(n) for n in names]

    def _extensions_rows(self) -> list[list[str]]:
        rows = []
        disabled = set(self.ctx.options.disabled_extensions)
        for extension in self.ctx.manager.extensions.extensions:
            if extension.error:
                status = f"failed: {extension.error}"
            elif not extension.enabled:
                status = "disabled"
            else:
                status = "enabled" + (f" (last error: {extension.last_error})" if extension.last_error else "")
            marker = extension.path.parent / f"{extension.name}.disabled"
            wanted = extension.name not in disabled and not marker.exists()
            if wanted != extension.enabled and not extension.error:
                status += " · restart to apply the change"
            rows.append([extension.name, status, extension.panel.title if extension.panel else "",
                         str(extension.path)])
        return rows

    def _extensions_tab(self) -> None:
        ctx = self.ctx
        registry = ctx.manager.extensions
        names = [e.name for e in registry.extensions]
        table = gr.Dataframe(self._extensions_rows(), headers=["extension", "status", "panel", "folder"],
                             interactive=False, elem_id="extensions_table", wrap=True)
        enabled = gr.CheckboxGroup(names, value=[e.name for e in registry.extensions if e.enabled],
                                   label="Enabled (takes effect at the next start)", elem_id="extensions_enabled")
        apply = gr.Button("Apply", elem_id="extensions_apply")
        with gr.Row():
            url = gr.Textbox(label="Install from a git URL", placeholder="https://github.com/user/extension.git",
                             elem_id="extensions_url", scale=4)
            install_button = gr.Button("Install", elem_id="extensions_install", scale=1)
        result = gr.HTML(elem_id="extensions_result")

        def apply_enabled(chosen):
            try:
                ctx.runtime.apply({"disabled_extensions": sorted(set(names) - set(chosen or []))})
            except InputError as exc:
                return gr.skip(), _error_html(f"Not saved: {exc}")
            for name in chosen or []:  # enabling also removes an extensions/<name>.disabled marker
                if registry.folder is not None:
                    (registry.folder / f"{name}.disabled").unlink(missing_ok=True)
            return self._extensions_rows(), "<div>Saved; restart Easel to load or unload extensions.</div>"

        def install_from(address):
            from backend.extensions import InstallError, install

            try:
                path = install(address, Path(ctx.settings.data_dir) / "extensions", public=ctx.public,
                               allow_insecure=ctx.allow_extension_install)
            except InstallError as exc:
                return _error_html(str(exc))
            return f"<div>Installed into {html.escape(str(path))}; restart Easel to load it.</div>"

        apply.click(apply_enabled, inputs=enabled, outputs=[table, result], queue=False, api_visibility="private")
        install_button.click(install_from, inputs=url, outputs=result, api_visibility="private")

    def _settings_tab(self) -> None:
        ctx = self.ctx
        o = ctx.options
        with gr.Column():
            controls = {
                "save_images": gr.Checkbox(o.save_images, label="Save every generated image"),
                "outdir_txt2img": gr.Textbox(o.outdir_txt2img, label="txt2img output folder (empty: outputs/txt2img-images)"),
                "outdir_img2img": gr.Textbox(o.outdir_img2img, label="img2img output folder (empty: outputs/img2img-images)"),
                "filename_pattern": gr.Textbox(o.filename_pattern, label="File name pattern, after the number "
                                               "([seed], [prompt], [prompt_words], [model_name], [sampler], [steps], "
                                               "[cfg], [width], [height], [datetime], [date])"),
                "save_txt": gr.Checkbox(o.save_txt, label="Also write a .txt file with the parameters beside each image"),
                "checkpoint_cache": gr.Slider(1, 8, value=o.checkpoint_cache, step=1, label="Checkpoints kept in memory"),
                "default_sampler": gr.Dropdown(list(SAMPLER_NAMES), value=o.default_sampler, label="Default sampler"),
                "default_steps": gr.Slider(1, 150, value=o.default_steps, step=1, label="Default steps"),
                "default_cfg_scale": gr.Slider(1, 30, value=o.default_cfg_scale, step=0.5, label="Default CFG scale"),
                "emphasis": gr.Radio(list(EMPHASIS_MODES), value=o.emphasis, label="Emphasis mode: how (word:1.2) "
                                     "weights apply (Original: scale, then restore the mean; No norm: scale only; "
                                     "Ignore: drop weights; None: brackets are plain text)"),
                "same_wildcards": gr.Checkbox(o.same_wildcards, label="Same wildcard picks for every image of a batch"),
                "live_preview_every": gr.Slider(0, 50, value=o.live_preview_every, step=1,
                                                label="Live preview every N steps (0: off)"),
                "face_restoration_model": gr.Radio(["CodeFormer", "GFPGAN"], value=o.face_restoration_model,
                                                   label="Face restoration model"),
                "code_former_weight": gr.Slider(0, 1, value=o.code_former_weight, step=0.01,
                                                label="CodeFormer weight (0 = strongest, 1 = weakest)"),
                "save_images_before_face_restoration": gr.Checkbox(
                    o.save_images_before_face_restoration, label="Also save each image before face restoration"),
                "face_restoration_unload": gr.Checkbox(o.face_restoration_unload,
                                                       label="Free the face restoration model after each use"),
                "upscaler_unload": gr.Checkbox(o.upscaler_unload, label="Free upscaler models after each use"),
                "ESRGAN_tile": gr.Slider(0, 512, value=o.ESRGAN_tile, step=16,
                                         label="Upscaler tile size (0: no tiling; smaller uses less memory)"),
                "ESRGAN_tile_overlap": gr.Slider(0, 48, value=o.ESRGAN_tile_overlap, step=1,
                                                 label="Upscaler tile overlap, pixels"),
            }
            apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit")
            result = gr.HTML(elem_id="settings_result")

        def apply_settings(values: dict):
            typed = {name: values[component] for name, component in controls.items()}
            for name in ("checkpoint_cache", "default_steps", "live_preview_every", "ESRGAN_tile", "ESRGAN_tile_overlap"):
                typed[name] = int(typed[name])
            typed["default_cfg_scale"] = float(typed["default_cfg_scale"])
            typed["code_former_weight"] = float(typed["code_former_weight"])
            try:
                ctx.runtime.apply(typed)
            except InputError as exc:
                return _error_html(f"Not saved: {exc}")
            return f"<div>Saved to {ctx.runtime.options_path}; applied.</div>"

        apply.click(apply_settings, inputs=set(controls.values()), outputs=result, queue=False,
                    api_visibility="private")

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Easel", analytics_enabled=False) as demo:
            top = self._top_bar()
            with gr.Tabs() as tabs:
                self.tabs = tabs
                with gr.Tab("txt2img", id="txt2img"):
                    self.pages["txt2img"] = self._generation_controls("txt2img")
                with gr.Tab("img2img", id="img2img"):
                    self.pages["img2img"] = self._generation_controls("img2img")
                with gr.Tab("Extras", id="extras"):
                    self._extras_tab()
                with gr.Tab("PNG Info", id="pnginfo"):
                    self._png_info_tab()
                with gr.Tab("Settings", id="settings"):
                    self._settings_tab()
                with gr.Tab("Extensions", id="extensions"):
                    self._extensions_tab()
                for extension in self.ctx.manager.extensions.active:
                    for title, build in extension.tabs:
                        with gr.Tab(title):
                            try:
                                build()
                            except Exception as exc:  # an extension's tab must not take the UI down
                                logger.error("Extension %s failed to build its tab", extension.name, exc_info=exc)
                                extension.last_error = f"its tab failed: {exc}"
                                gr.HTML(_error_html(f"Extension {extension.name} failed to build this tab: {exc}"))
            for mode in ("txt2img", "img2img"):
                self._wire_generation(mode, top)
                self._wire_page_helpers(mode)
            self._wire_send_to("txt2img")
            self._wire_send_to("img2img")
            self._wire_top_bar()
            demo.load(self._on_load, outputs=self._load_outputs(), queue=False, api_visibility="private")
        return demo

    def _load_outputs(self) -> list:
        out = [self._top["checkpoint"], self.model_status]
        for mode in ("txt2img", "img2img"):
            out += [self.pages[mode][n] for n in ("sampler", "steps", "cfg_scale", "width", "height")]
        return out

    def _on_load(self):
        """Each page load shows the current model and the current default settings."""
        o, size = self.ctx.options, self.ctx.native_size()
        values = [gr.update(choices=self.ctx.checkpoint_choices(), value=self.ctx.active_checkpoint()),
                  self._model_status()]
        for _ in ("txt2img", "img2img"):
            values += [o.default_sampler, o.default_steps, o.default_cfg_scale, size, size]
        return values


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def _error_html(message: str) -> str:
    return f"<div class='easel-error'>⚠ {html.escape(message)}</div>"


def build_ui(context: UIContext) -> gr.Blocks:
    return EaselUI(context).build()
