"""The Extensions tab: each extension's state, enabling and disabling, and installs from git.
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from backend.errors import InputError
from ui.context import error_html


def extensions_rows(ui) -> list[list[str]]:
    rows = []
    disabled = set(ui.ctx.options.disabled_extensions)
    for extension in ui.ctx.runtime.extensions.extensions:
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


def extensions_tab(ui) -> None:
    ctx = ui.ctx
    registry = ctx.runtime.extensions
    names = [e.name for e in registry.extensions]
    table = gr.Dataframe(extensions_rows(ui, ), headers=["extension", "status", "panel", "folder"],
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
            return gr.skip(), error_html(f"Not saved: {exc}")
        for name in chosen or []:  # enabling also removes an extensions/<name>.disabled marker
            if registry.folder is not None:
                (registry.folder / f"{name}.disabled").unlink(missing_ok=True)
        return extensions_rows(ui, ), "<div>Saved; restart Easel to load or unload extensions.</div>"

    def install_from(address):
        from backend.extensions import InstallError, install

        try:
            path = install(address, Path(ctx.settings.data_dir) / "extensions", public=ctx.public,
                           allow_insecure=ctx.allow_extension_install)
        except InstallError as exc:
            return error_html(str(exc))
        return f"<div>Installed into {html.escape(str(path))}; restart Easel to load it.</div>"

    apply.click(apply_enabled, inputs=enabled, outputs=[table, result], queue=False, api_visibility="private")
    install_button.click(install_from, inputs=url, outputs=result, api_visibility="private")
