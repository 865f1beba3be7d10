"""PNG Info: read an image's parameters and send them (styles unwound) to txt2img or img2img.
"""

from __future__ import annotations

import html
import json

import gradio as gr
from PIL import Image

from backend import infotext, outputs
from ui.context import error_html, format_infotext_html, paste_infotext, pasted_names


def png_info_tab(ui) -> None:
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
            return error_html(f"Cannot read the image: {exc}"), ""
        if not text:
            return "<div>No generation parameters found in this image.</div>", ""
        try:
            parsed = infotext.parse_infotext(text)
        except infotext.InfotextError as exc:
            return error_html(str(exc)), ""
        rows = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in parsed.items())
        return format_infotext_html(text) + f"<table>{rows}</table>", text

    upload.change(read, inputs=upload, outputs=[shown, raw], queue=False, api_visibility="private")
    for button, mode in ((to_txt2img, "txt2img"), (to_img2img, "img2img")):
        page = ui.pages[mode]
        names = pasted_names(page)

        def send(given: dict, page=page, names=names, mode=mode):
            text, path = given[raw], given[upload]
            if not text:
                raise gr.Error("drop a PNG with generation parameters first")
            values = paste_infotext(page, {n: given[page[n]] for n in names}, text)
            styles = styles_from_infotext(ui, text, values)
            image = gr.skip()
            if mode == "img2img" and path:
                image = Image.open(path).convert("RGB")
            return (gr.Tabs(selected=mode), image, styles, *[values[n] for n in names])

        image_output = ui.pages["img2img"]["_image"]
        button.click(send, inputs={raw, upload, *[page[n] for n in names]},
                     outputs=[ui.tabs, image_output, page["_styles"], *[page[n] for n in names]], queue=False,
                     api_visibility="private")


def styles_from_infotext(ui, text: str, values: dict) -> list[str]:
    """A1111's paste: with a `Styles array`, take the styles' text back out of the prompts and
    select the styles instead (left as they are when the prompts do not unwind)."""
    try:
        names = json.loads(infotext.parse_infotext(text).get("Styles array", "[]"))
    except ValueError:
        return []
    if not isinstance(names, list) or not names:
        return []
    ui.ctx.styles.reload()
    unwound = ui.ctx.styles.extract([str(n) for n in names], values.get("prompt", ""),
                                      values.get("negative_prompt", ""))
    if unwound is None:
        return []
    values["prompt"], values["negative_prompt"] = unwound
    return [str(n) for n in names]
