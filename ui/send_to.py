"""Sending a generated image with its parameters to img2img, inpaint or Extras.
"""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ui.context import paste_infotext, pasted_names


def wire_send_to(ui, source: str) -> None:
    """Send the selected image and its parameters to img2img or its inpaint tab."""
    c, target = ui.pages[source], ui.pages["img2img"]
    shared = [name for name in pasted_names(target) if name in c]

    def send(given: dict, inpaint: bool):
        paths, infotexts, selected = given[c["_paths"]], given[c["_infotexts"]], given[c["_selected"]]
        if not paths:
            raise gr.Error("generate an image first")
        index = selected if 0 <= selected < len(paths) else 0
        image = Image.open(paths[index])
        image.load()
        values = paste_infotext(target, {name: given[c[name]] for name in shared}, infotexts[index])
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

    outputs = [ui.tabs, ui.img2img_modes, target["_mode"], target["_inpaint"], target["_image"]]
    outputs += [target[name] for name in shared]
    inputs = {c["_paths"], c["_infotexts"], c["_selected"], *[c[name] for name in shared]}
    c["_to_img2img"].click(lambda given: send(given, inpaint=False), inputs=inputs, outputs=outputs, queue=False,
                           api_visibility="private")
    c["_to_inpaint"].click(lambda given: send(given, inpaint=True), inputs=inputs, outputs=outputs, queue=False,
                           api_visibility="private")

    def to_extras(paths, selected):
        if not paths:
            raise gr.Error("generate an image first")
        # The saved PNG itself, so its parameters reach Extras' result.
        path = paths[selected if 0 <= selected < len(paths) else 0]
        return gr.Tabs(selected="extras"), gr.Tabs(selected="single"), "single", str(path)

    extras = ui.extras
    c["_to_extras"].click(to_extras, inputs=[c["_paths"], c["_selected"]],
                          outputs=[ui.tabs, extras["sources"], extras["source"], extras["image"]], queue=False,
                          api_visibility="private")

# -- tabs ------------------------------------------------------------------------------------------
