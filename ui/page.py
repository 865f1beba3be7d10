"""One generation page's controls (txt2img or img2img), registered under the `GenerationRequest`
field each sets, so handlers receive `{component: value}` dicts and no positional list.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from backend.hires import HIRES_LATENT_MODES, SAME_SAMPLER
from backend.images import INPAINT_AREAS, MASKED_CONTENT, RESIZE_MODES
from backend.request import MIN_SIZE
from backend.samplers import SAMPLER_NAMES, SCHEDULE_TYPES
from ui import controlnet_panel, extra_networks
from ui.context import EXTRA_NETWORK_KINDS, MASK_MODES, slug


def generation_controls(ui, mode: str) -> dict[str, Any]:
    """The page's controls by name: `GenerationRequest` fields, and `_`-prefixed UI-only parts."""
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=6):
            c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{mode}_prompt",
                                     placeholder="a large red star on a blue background, top left")
            c["_prompt_tokens"] = gr.HTML("<div class='easel-tokens'>0/75</div>")
            c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{mode}_neg_prompt")
            c["_negative_tokens"] = gr.HTML("<div class='easel-tokens'>0/75</div>")
            extra_networks_panel(ui, c, mode)
        with gr.Column(scale=1, min_width=200):
            c["_generate"] = gr.Button("Generate", variant="primary", elem_id=f"{mode}_generate", size="lg")
            with gr.Row():
                c["_interrupt"] = gr.Button("Interrupt", visible=False, elem_id=f"{mode}_interrupt")
                c["_skip"] = gr.Button("Skip", visible=False, elem_id=f"{mode}_skip")
            c["_styles"] = gr.Dropdown(ui.ctx.styles.names, multiselect=True, label="Styles",
                                       elem_id=f"{mode}_styles")
            with gr.Row():
                c["_apply_styles"] = gr.Button("Apply styles", size="sm")
                c["_style_name"] = gr.Textbox(show_label=False, placeholder="new style name", scale=2)
                c["_save_style"] = gr.Button("Save style", size="sm")
    with gr.Row():
        with gr.Column(scale=1):
            _settings_column(ui, c, mode)
        with gr.Column(scale=1):
            _output_column(c, mode)
    # Per-browser state
    c["_infotexts"] = gr.State([])
    c["_paths"] = gr.State([])
    c["_selected"] = gr.State(0)
    c["_last_seed"] = gr.State(-1)
    return c




def _settings_column(ui, c: dict[str, Any], mode: str) -> None:
    """Sampler, steps, size, batch, CFG, seeds, then hires fix, extension panels and wildcards."""
    options, size = ui.ctx.options, ui.ctx.native_size()
    if mode == "img2img":
        img2img_inputs(ui, c)
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
    c["distilled_cfg_scale"] = gr.Slider(0, 30, value=3.5, step=0.1, label="Distilled CFG Scale (FLUX.1 dev)",
                                         elem_id=f"{mode}_distilled_cfg_scale")
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
        hires_controls(ui, c)
    controlnet_panel.controlnet_panel(ui, c, mode)
    extension_panels(ui, c, mode)
    with gr.Accordion("Wildcards", open=False):
        c["_wildcards"] = gr.Dataset(
            components=[gr.Textbox(visible=False), gr.Textbox(visible=False)], headers=["wildcard", "lines"],
            samples=wildcard_samples(ui), label="Click one to add it to the prompt", type="values",
            elem_id=f"{mode}_wildcards", samples_per_page=20)
        c["_refresh_wildcards"] = gr.Button("🔄 Rescan wildcards", size="sm")


def _output_column(c: dict[str, Any], mode: str) -> None:
    """Progress, live preview, the gallery and its buttons, the selected image's infotext."""
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


def extension_panels(ui, c: dict[str, Any], mode: str) -> None:
    """Each extension's panel (values reach it as `event.args`, keys `_ext:<name>:<control>`), and
    the Script dropdown with each script's controls (keys `_ext:<script title>:<control>`)."""
    registry = ui.ctx.runtime.extensions
    for extension in registry.panels(mode):
        with gr.Accordion(extension.panel.title, open=False, elem_id=f"{mode}_ext_{extension.name}"):
            extension_controls(c, mode, extension.name, extension.panel.controls)
    scripts = registry.scripts(mode)
    if not scripts:
        return
    c["script_name"] = gr.Dropdown(["None", *(s.title for s in scripts)], value="None", label="Script",
                                   elem_id=f"{mode}_script")
    for script in scripts:
        name = slug(script.title)
        with gr.Accordion(f"{script.title} settings", open=False, elem_id=f"{mode}_script_{name}"):
            extension_controls(c, mode, script.title, script.controls, name)


def extension_controls(c: dict[str, Any], mode: str, owner: str, controls, slug: str | None = None) -> None:
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


def hires_controls(ui, c: dict[str, Any]) -> None:
    upscalers = [*HIRES_LATENT_MODES, *(n for n in ui.ctx.manager.upscalers.names if n != "None")]
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


def extra_networks_panel(ui, c: dict[str, Any], mode: str) -> None:
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
        images, shown, _ = extra_cards(ui, "Lora", "", extra_networks.ALL_FOLDERS)
        c["_en_cards"] = gr.Gallery(images, columns=6, height=320, allow_preview=False, show_label=False,
                                    elem_id=f"{mode}_extra_cards", elem_classes="easel-cards", interactive=False)
        c["_en_shown"] = gr.State(shown)
        c["_en_details"] = gr.JSON(label="Card details", visible=False, elem_id=f"{mode}_extra_details")


def extra_cards(ui, kind: str, search: str, folder: str) -> tuple[list, list[str], list[str]]:
    """(gallery items, the shown cards' names in order, subfolder choices) for one kind."""
    manager = ui.ctx.manager
    library = manager.loras if kind == "Lora" else manager.embeddings
    all_cards = extra_networks.cards(EXTRA_NETWORK_KINDS[kind], library.files)
    shown = extra_networks.filter_cards(all_cards, search, folder)
    images = [(str(extra_networks.card_image(card, ui.ctx.settings.cache_dir)), card.name) for card in shown]
    return images, [card.file.name for card in shown], extra_networks.folders(all_cards)


def wildcard_samples(ui) -> list[list[str]]:
    return [[f"__{f.name}__", str(f.lines)] for f in ui.ctx.wildcards().files()] or [["(no wildcard files)", ""]]


def img2img_inputs(ui, c: dict[str, Any]) -> None:
    c["_mode"] = gr.State("img2img")
    with gr.Tabs(elem_id="img2img_modes") as modes:
        ui.img2img_modes = modes
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
