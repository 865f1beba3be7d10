"""A1111's Extras tab: upscale and restore faces in one image, uploaded files, or a folder on the server.
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
from PIL import Image

from backend.errors import EaselError
from backend.postprocess import ExtrasRequest, run_extras
from ui.context import need


def extras_tab(ui) -> None:
    """A1111's Extras: upscale one image, uploaded files, or a folder of images."""
    ctx = ui.ctx
    with gr.Row():
        with gr.Column():
            fields = _source_controls(ui)
            fields.update(_upscale_controls(ui))
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

    refresh.click(rescan, outputs=[fields["upscaler"], fields["upscaler_2"]], queue=False, api_visibility="private")

    def run(values: dict):
        return _run(ui, {name: values[component] for name, component in fields.items()})

    run_button.click(run, inputs=set(fields.values()), outputs=[gallery, info], concurrency_limit=None,
                     api_visibility="private")


def _source_controls(ui) -> dict:
    """Where the images come from: one image, uploaded files, or a folder on the server."""
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
    ui.extras = {"sources": source_tabs, "source": source, "image": single}
    for tab, name in ((single_tab, "single"), (batch_tab, "batch"), (folder_tab, "folder")):
        tab.select(lambda name=name: name, outputs=source, queue=False, api_visibility="private")
    return {"source": source, "image": single, "uploads": files, "folder_in": input_dir, "folder_out": output_dir}


def _upscale_controls(ui) -> dict:
    """Scale by or to a size, the two upscalers, and the face restorers' visibilities."""
    names = ui.ctx.manager.upscalers.names
    with gr.Tabs():
        with gr.Tab("Scale by") as by_tab:
            scale = gr.Slider(1, 8, value=4, step=0.05, label="Resize", elem_id="extras_scale")
        with gr.Tab("Scale to") as to_tab:
            with gr.Row():
                width = gr.Number(512, label="Width", precision=0, elem_id="extras_width")
                height = gr.Number(512, label="Height", precision=0, elem_id="extras_height")
                crop = gr.Checkbox(True, label="Crop to fit")
    mode = gr.State("by")
    by_tab.select(lambda: "by", outputs=mode, queue=False, api_visibility="private")
    to_tab.select(lambda: "to", outputs=mode, queue=False, api_visibility="private")
    with gr.Row():
        upscaler = gr.Dropdown(names, value=names[1] if len(names) > 1 else names[0], label="Upscaler 1",
                               elem_id="extras_upscaler_1")
        upscaler_2 = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id="extras_upscaler_2")
        visibility = gr.Slider(0, 1, value=0, step=0.01, label="Upscaler 2 visibility")
    with gr.Row():
        gfpgan = gr.Slider(0, 1, value=0, step=0.001, label="GFPGAN visibility", elem_id="extras_gfpgan")
        codeformer = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer visibility", elem_id="extras_codeformer")
        weight = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer weight (0 = strongest)",
                           elem_id="extras_codeformer_weight")
    return {"mode": mode, "scale": scale, "width": width, "height": height, "crop": crop, "upscaler": upscaler,
            "upscaler_2": upscaler_2, "visibility": visibility, "gfpgan": gfpgan, "codeformer": codeformer,
            "codeformer_weight": weight}


def _run(ui, v: dict) -> tuple[list[str], str]:
    """Run the Extras job on the device queue; (result paths, the postprocessing text and notes)."""
    ctx = ui.ctx
    images = extras_inputs(ui, v["source"], v["image"], v["uploads"], v["folder_in"])
    folder_out = v["folder_out"].strip() if v["source"] == "folder" else ""
    request = ExtrasRequest(
        upscaler=v["upscaler"], scale=float(v["scale"]), crop=bool(v["crop"]),
        resize_to=(int(v["width"]), int(v["height"])) if v["mode"] == "to" else None,
        upscaler_2=v["upscaler_2"], upscaler_2_visibility=float(v["visibility"]),
        gfpgan_visibility=float(v["gfpgan"]), codeformer_visibility=float(v["codeformer"]),
        codeformer_weight=float(v["codeformer_weight"]), output_dir=Path(folder_out) if folder_out else None)
    try:
        results = ctx.device.submit(
            lambda control: run_extras(ctx.manager.upscalers, images, request, ctx.settings.output_root,
                                       should_stop=lambda: control.interrupted, faces=ctx.manager.faces),
            owner="ui:extras", kind="extras").wait()
    except EaselError as exc:
        raise gr.Error(str(exc)) from exc
    text = results[0].postprocessing if results else ""
    notes = "".join(f"<br>{html.escape(n)}" for n in dict.fromkeys(n for r in results for n in r.notes))
    shown = [str(r.path) if r.path is not None else r.image for r in results]  # unsaved: shown all the same
    return shown, f"<div class='easel-infotext'>{html.escape(text)}{notes}</div>"


def extras_inputs(ui, source: str, image, uploads, folder: str) -> list[Image.Image]:
    """The images of the chosen source; a file that is not an image names itself in the error."""
    if source == "single":
        paths = [Path(need(image, "Drop an image into Source first"))]
    elif source == "batch":
        paths = [Path(getattr(f, "name", f)) for f in (uploads or [])]
        if not paths:
            raise gr.Error("Add image files first")
    elif ui.ctx.public:
        raise gr.Error("Batch from directory reads and writes folders on the server, so a server reached from "
                       "other machines (--listen/--share) does not offer it: upload the images instead")
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
