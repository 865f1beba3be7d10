"""A generation page's Generate, Interrupt and Skip: the request built from the page's values, the
job run through the device queue, and the result shown with its infotext.
"""

from __future__ import annotations

import html
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from backend import outputs
from backend.request import GenerationRequest
from ui import controlnet_panel, jobs
from ui.context import (
    UI_IMAGES,
    describe_error,
    error_html,
    format_infotext_html,
    init_from_img2img_inputs,
    progress_html,
)

logger = logging.getLogger(__name__)



def build_request(ui, mode: str, values: dict[str, Any], top: dict[str, Any]) -> GenerationRequest:
    page = ui.pages[mode]
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
    fields["control_units"] = controlnet_panel.control_units(page, values, mode)
    return GenerationRequest(
        **{**ui.ctx.runtime.request_defaults(mode), **fields},
        checkpoint=top["checkpoint"] or None,
        vae=top["vae"] or None,
        clip_skip=int(top["clip_skip"]),
        styles=tuple(values.get(page["_styles"]) or ()),
        script_args=script_args(page, values),
    )


def script_args(page: dict[str, Any], values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    script_args: dict[str, dict[str, Any]] = {}
    for key, component in page.items():
        if key.startswith("_ext:") and component in values:
            name, _, control = key[len("_ext:"):].rpartition(":")
            script_args.setdefault(name, {})[control] = values[component]
    return script_args

# -- events ------------------------------------------------------------------------------------


def wire_generation(ui, mode: str, top: dict[str, Any]) -> None:
    c = ui.pages[mode]
    ctx = ui.ctx
    inputs = {comp for name, comp in c.items() if not name.startswith("_") or name.startswith("_ext:")}
    inputs |= {c["_styles"]} | controlnet_panel.request_inputs(c)
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
            generation = build_request(ui, mode, values, {k: values[v] for k, v in top.items()})
            generation.validate()
            ctx.runtime.extensions.check_script(generation)  # refused before queueing (X/Y/Z plot sizes)
        except (gr.Error, ValueError) as exc:
            ctx.jobs.finish(session, job)
            message = exc.message if isinstance(exc, gr.Error) else str(exc)
            yield {c["_progress"]: error_html(message)}
            return
        try:
            for event in jobs.run(lambda control: ctx.runtime.generate(generation, control), job, ctx.device,
                                  owner=f"ui:{session}", kind=mode, checkpoint=generation.checkpoint):
                if isinstance(event, jobs.Running):
                    update = {c["_progress"]: progress_html(event)}
                    if event.progress is not None and event.progress.preview is not None:
                        update[c["_preview"]] = gr.update(value=event.progress.preview, visible=True)
                    yield update
                    continue
                yield finished(ui, mode, event)
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


def finished(ui, mode: str, event: jobs.Finished) -> dict:
    c = ui.pages[mode]
    if event.error is not None:
        logger.error("Generation failed", exc_info=event.error)
        return {c["_progress"]: error_html(describe_error(event.error)), c["_preview"]: gr.update(visible=False)}
    result = event.result
    paths = [servable_path(ui, image) for image in result.images]
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


def servable_path(ui, image) -> Path:
    """A file the UI may serve with the image and its infotext: the saved PNG when it is under the
    outputs folder, else a PNG in the cache (saving off, or a folder of the user's choosing)."""
    root = ui.ctx.settings.output_root.resolve()
    if image.path is not None and root in Path(image.path).resolve().parents:
        return image.path
    folder = ui.ctx.settings.cache_dir / UI_IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, suffix=".png")
    with os.fdopen(fd, "wb") as handle:
        image.image.save(handle, format="PNG", pnginfo=outputs.png_info(image.infotext))
    return Path(name)
