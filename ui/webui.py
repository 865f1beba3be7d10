"""The Gradio app: the top bar and the tabs (txt2img, img2img, Extras, PNG Info, Settings, Extensions,
and the extensions' own), each built by its module, all on one `Runtime`.

Generation and Extras jobs go through the device queue shared with the REST API (arrival order, one at
a time); per-browser state lives in `gr.State` and the session hash keys each browser's own job.
"""

from __future__ import annotations

import logging

import gradio as gr

from ui import extensions_tab, extras_tab, page, page_events, page_helpers, png_info_tab, send_to, settings_tab, top_bar
from ui.context import CSS, UI_IMAGES, UIContext, error_html

__all__ = ["CSS", "UI_IMAGES", "EaselUI", "UIContext", "build_ui"]

logger = logging.getLogger(__name__)


class EaselUI:
    """The built app's parts that handlers of several tabs reach: the pages' controls by field name,
    the tab sets (to switch tabs), the top bar and the Extras inputs."""

    def __init__(self, context: UIContext):
        self.ctx = context
        self.tabs: gr.Tabs | None = None
        self.img2img_modes: gr.Tabs | None = None
        self.pages: dict[str, dict[str, gr.components.Component]] = {}
        self.top: dict[str, gr.components.Component] = {}
        self.model_status: gr.HTML | None = None
        self.extras: dict[str, gr.components.Component] = {}

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Easel", analytics_enabled=False) as demo:
            top = top_bar.top_bar(self)
            with gr.Tabs() as tabs:
                self.tabs = tabs
                for mode in ("txt2img", "img2img"):
                    with gr.Tab(mode, id=mode):
                        self.pages[mode] = page.generation_controls(self, mode)
                with gr.Tab("Extras", id="extras"):
                    extras_tab.extras_tab(self)
                with gr.Tab("PNG Info", id="pnginfo"):
                    png_info_tab.png_info_tab(self)
                with gr.Tab("Settings", id="settings"):
                    settings_tab.settings_tab(self)
                with gr.Tab("Extensions", id="extensions"):
                    extensions_tab.extensions_tab(self)
                self._extension_tabs()
            for mode in ("txt2img", "img2img"):
                page_events.wire_generation(self, mode, top)
                page_helpers.wire_page_helpers(self, mode)
                send_to.wire_send_to(self, mode)
            top_bar.wire_top_bar(self)
            demo.load(self._on_load, outputs=self._load_outputs(), queue=False, api_visibility="private")
        return demo

    def _extension_tabs(self) -> None:
        for extension in self.ctx.runtime.extensions.active:
            for title, build in extension.tabs:
                with gr.Tab(title):
                    try:
                        build()
                    except Exception as exc:  # an extension's tab must not take the UI down
                        logger.error("Extension %s failed to build its tab", extension.name, exc_info=exc)
                        extension.last_error = f"its tab failed: {exc}"
                        gr.HTML(error_html(f"Extension {extension.name} failed to build this tab: {exc}"))

    def _load_outputs(self) -> list:
        out = [self.top["checkpoint"], self.model_status]
        for mode in ("txt2img", "img2img"):
            out += [self.pages[mode][n] for n in ("sampler", "steps", "cfg_scale", "width", "height")]
        return out

    def _on_load(self):
        """Each page load shows the current model and the current default settings."""
        o, size = self.ctx.options, self.ctx.native_size()
        values = [gr.update(choices=self.ctx.checkpoint_choices(), value=self.ctx.active_checkpoint()),
                  top_bar.model_status_html(self)]
        for _ in ("txt2img", "img2img"):
            values += [o.default_sampler, o.default_steps, o.default_cfg_scale, size, size]
        return values


def build_ui(context: UIContext) -> gr.Blocks:
    return EaselUI(context).build()
