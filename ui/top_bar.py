"""The top bar: checkpoint (switched in the background), VAE, text encoders (FLUX.1 / SD 3.5 files that lack
theirs, as Forge's "VAE / Text Encoder"), clip skip, and the model status."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from ui.context import describe_error, error_html

logger = logging.getLogger(__name__)



def top_bar(ui) -> dict[str, Any]:
    ctx = ui.ctx
    with gr.Row(elem_id="easel-topbar"):
        checkpoint = gr.Dropdown(ctx.checkpoint_choices(), value=ctx.active_checkpoint(), label="Stable Diffusion checkpoint",
                                 elem_id="setting_sd_model_checkpoint", scale=4)
        refresh = gr.Button("🔄", scale=0, min_width=40, elem_id="refresh_checkpoints")
        vae = gr.Dropdown(ctx.manager.vae_options(), value=ctx.manager.vae_choice, label="SD VAE",
                          elem_id="setting_sd_vae", scale=2)
        encoders = gr.Dropdown(ctx.manager.text_encoder_options(), value=list(ctx.manager.text_encoder_choice),
                               multiselect=True, label="Text encoders (FLUX.1 / SD 3.5)", scale=2,
                               elem_id="setting_text_encoders")
        clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip", scale=2, elem_id="setting_clip_skip")
    status = gr.HTML("", elem_classes="easel-status", elem_id="model_status")  # filled on page load
    ui.model_status = status
    top = {"checkpoint": checkpoint, "vae": vae, "text_encoders": encoders, "clip_skip": clip_skip}

    def refresh_lists(current_checkpoint, current_vae, current_encoders):
        ctx.manager.refresh()
        checkpoints, vaes = ctx.checkpoint_choices(), ctx.manager.vae_options()
        found = ctx.manager.text_encoder_options()
        return (gr.update(choices=checkpoints, value=current_checkpoint if current_checkpoint in checkpoints else None),
                gr.update(choices=vaes, value=current_vae if current_vae in vaes else vaes[0]),
                gr.update(choices=found, value=[name for name in current_encoders or () if name in found]))

    refresh.click(refresh_lists, inputs=[checkpoint, vae, encoders], outputs=[checkpoint, vae, encoders],
                  queue=False, api_visibility="private")
    ui.top = top
    return top


PRESET_FIELDS = ("sampler", "cfg_scale", "steps")


def family_presets(ctx, model) -> dict:
    """The sampler, CFG scale and steps the UI starts a model's family with (the options' for SD)."""
    options = ctx.options
    defaults = {"sampler": options.default_sampler, "cfg_scale": options.default_cfg_scale,
                "steps": options.default_steps}
    return defaults if model is None else model.engine.presets(model, defaults)


def model_status_html(ui, error: str | None = None) -> str:
    manager = ui.ctx.manager
    active = manager.active
    text = (f"Model: {active.name} · {active.label} · {active.native_size}px native" if active is not None
            else "No model loaded")
    picks = [*manager.text_encoder_choice, *([manager.vae_choice] if manager.vae_choice != "Automatic" else [])]
    if picks:
        text += f" · VAE / text encoders: {', '.join(picks)}"
    if error:
        return error_html(error) + f"<div>{text}</div>"
    return f"<div>{text}</div>"


def wire_top_bar(ui) -> None:
    ctx, top = ui.ctx, ui.top
    size_outputs = [ui.pages[m][n] for m in ("txt2img", "img2img") for n in ("width", "height")]
    preset_outputs = [ui.pages[m][n] for m in ("txt2img", "img2img") for n in PRESET_FIELDS]

    def switch(name, *values):
        sizes, presets = values[:len(size_outputs)], values[len(size_outputs):]
        previous = ctx.manager.active
        old_size = previous.native_size if previous is not None else None
        old_presets = family_presets(ctx, previous)
        yield {ui.model_status: f"<div>Loading {name}...</div>"}
        try:
            model = ctx.manager.select(name)
        except Exception as exc:  # a broken file must not take the app down
            logger.error("Loading %s failed", name, exc_info=exc)
            yield {ui.model_status: model_status_html(ui, f"Cannot load {name}: {describe_error(exc)}"),
                   top["checkpoint"]: gr.update(choices=ctx.checkpoint_choices(), value=ctx.active_checkpoint())}
            return
        update: dict = {ui.model_status: model_status_html(ui, )}
        # Follow the new model's native size, and its family's sampler, CFG and steps (FLUX.1: Euler, CFG 1),
        # where the user had not changed them
        for component, value in zip(size_outputs, sizes):
            if value == old_size and model.native_size != old_size:
                update[component] = model.native_size
        new_presets = family_presets(ctx, model)
        for component, value, field in zip(preset_outputs, presets, PRESET_FIELDS * 2):
            if value == old_presets[field] and new_presets[field] != value:
                update[component] = new_presets[field]
        yield update

    top["checkpoint"].input(switch, inputs=[top["checkpoint"], *size_outputs, *preset_outputs],
                            outputs=[ui.model_status, top["checkpoint"], *size_outputs, *preset_outputs],
                            concurrency_id="device", concurrency_limit=1, show_progress="hidden",
                            trigger_mode="always_last", api_visibility="private")

    def switch_vae(choice):
        try:
            with ctx.manager.lock:
                ctx.manager.set_vae(choice)
        except Exception as exc:
            return model_status_html(ui, f"Cannot use VAE {choice}: {describe_error(exc)}"), ctx.manager.vae_choice
        return model_status_html(ui, ), choice

    top["vae"].input(switch_vae, inputs=top["vae"], outputs=[ui.model_status, top["vae"]],
                     concurrency_id="device", concurrency_limit=1, api_visibility="private")

    def switch_encoders(names):
        try:
            ctx.manager.set_text_encoders(names or [])
        except Exception as exc:
            return (model_status_html(ui, f"Cannot use text encoders {', '.join(names or [])}: {describe_error(exc)}"),
                    list(ctx.manager.text_encoder_choice))
        return model_status_html(ui), list(ctx.manager.text_encoder_choice)

    top["text_encoders"].input(switch_encoders, inputs=top["text_encoders"],
                               outputs=[ui.model_status, top["text_encoders"]], concurrency_id="device",
                               concurrency_limit=1, api_visibility="private")
