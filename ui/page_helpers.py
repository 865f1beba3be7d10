"""A generation page's helpers: token counters, seed buttons, styles, wildcards, the gallery's
selection, the extra networks cards, the ControlNet units' buttons and the output folder button.
"""

from __future__ import annotations

import gradio as gr

from backend.embeddings import NO_EMBEDDINGS
from backend.extra_networks import parse_tags
from backend.styles import Style
from ui import controlnet_panel, extra_networks
from ui.context import EXTRA_NETWORK_KINDS, format_infotext_html, open_folder, token_counter
from ui.page import extra_cards, wildcard_samples


def wire_page_helpers(ui, mode: str) -> None:
    c, ctx = ui.pages[mode], ui.ctx
    def count(value: str) -> str:
        model = ctx.manager.active
        if model is not None and model.engine.encodes_prompts:  # FLUX.1, SD 3.x: T5's tokens against its limit
            counted = model.engine.token_count(model, parse_tags(value)[0])
            if counted is not None:
                return f"<div class='easel-tokens'>{counted[0]}/{counted[1]}</div>"
            return f"<div class='easel-tokens'>{token_counter(ctx.tokenizer(), value)}</div>"
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

    _wire_styles(ui, mode)

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
    c["_refresh_wildcards"].click(lambda: gr.Dataset(samples=wildcard_samples(ui, )), outputs=c["_wildcards"],
                                  queue=False, api_visibility="private")

    c["_gallery"].select(select, inputs=c["_infotexts"], outputs=[c["_infotext"], c["_selected"]], queue=False,
                         api_visibility="private")
    wire_extra_networks(ui, mode)
    controlnet_panel.wire_controlnet(ui, mode)

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


def wire_extra_networks(ui, mode: str) -> None:
    c, ctx = ui.pages[mode], ui.ctx

    def show(kind, search, folder):
        images, shown, folders = extra_cards(ui, kind, search or "", folder or extra_networks.ALL_FOLDERS)
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


def _wire_styles(ui, mode: str) -> None:
    """Apply the chosen styles to the prompts, or save the prompts as a new style in styles.csv."""
    c, ctx = ui.pages[mode], ui.ctx

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
