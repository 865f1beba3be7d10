"""Starting the web UI: authentication, the public-server rule, offline gradio, and `launch()`."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# No calls home: gradio's analytics and version check stay off (set before gradio is imported).
OFFLINE_ENVIRONMENT = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "DO_NOT_TRACK": "1"}


class LaunchError(RuntimeError):
    """The server cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class ServerOptions:
    listen: bool = False
    port: int | None = None
    share: bool = False
    auth: str | None = None  # "user:pass,user2:pass2"
    auth_path: Path | None = None
    insecure: bool = False
    api: bool = False  # A1111's REST API and the job API on the same server
    nowebui: bool = False  # the API alone
    api_auth: str | None = None  # "user:pass,user2:pass2" for the API (HTTP Basic)
    api_admin: str | None = None  # "user,user2": API users who may stop anyone's job
    flags: dict | None = None  # the command line, for /sdapi/v1/cmd-flags (passwords left out)

    @property
    def public(self) -> bool:
        return self.listen or self.share


def parse_auth(text: str) -> list[tuple[str, str]]:
    """`user:pass,user2:pass2` (commas or newlines between pairs; a password may contain ':')."""
    pairs = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise LaunchError(f"bad credentials {item.split(':')[0]!r}: write them as user:password")
        pairs.append((user, password))
    return pairs


def credentials(options: ServerOptions) -> list[tuple[str, str]]:
    pairs = parse_auth(options.auth) if options.auth else []
    if options.auth_path:
        try:
            pairs += parse_auth(Path(options.auth_path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise LaunchError(f"cannot read --gradio-auth-path {options.auth_path}: {exc}") from exc
    return pairs


def check_public(options: ServerOptions, pairs: list[tuple[str, str]],
                 api_pairs: list[tuple[str, str]] | None = None) -> None:
    """A server reachable from other machines needs a password (for the UI, and for the API when it is
    served) unless --insecure says otherwise."""
    if not options.public:
        return
    flag = "--share" if options.share else "--listen"
    if options.api and not api_pairs:
        if options.insecure:
            logger.warning("*** %s with --api and no --api-auth (--insecure): anyone who can reach this server can "
                           "use its API ***", flag)
        else:
            raise LaunchError(f"{flag} with --api makes the API reachable from other machines, so it needs a "
                              "password: add --api-auth user:password (--insecure starts it without one)")
    if pairs or options.nowebui:
        return
    if options.insecure:
        logger.warning("*** %s without a password (--insecure): anyone who can reach this server can use it "
                       "and read its files ***", flag)
        return
    raise LaunchError(
        f"{flag} makes Easel reachable from other machines, so it needs a password: add "
        "--gradio-auth user:password (or --gradio-auth-path FILE with user:password lines); "
        "--insecure starts it without one"
    )


def launch(settings, server: ServerOptions, config_path: Path | None = None, block: bool = True):
    """Build the model manager and the UI and serve it; returns gradio's (app, local_url, share_url)."""
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    pairs = credentials(server)
    api_pairs = parse_auth(server.api_auth) if server.api_auth else []
    check_public(server, pairs, api_pairs)

    from backend.extensions import ExtensionRegistry
    from backend.model_manager import ModelManager
    from ui.options import CONFIG_NAME, load_options
    from backend.styles import StyleDatabase
    from ui.webui import CSS, UIContext, build_ui

    config_path = config_path or Path(settings.data_dir) / CONFIG_NAME
    options = load_options(config_path)
    if settings.checkpoint_cache_size == 1 and options.checkpoint_cache != 1:
        settings = settings.with_changes(checkpoint_cache_size=options.checkpoint_cache)
    manager = ModelManager(settings)
    manager.extensions = ExtensionRegistry(Path(settings.data_dir) / "extensions", set(options.disabled_extensions))
    manager.faces.release_after_use = options.face_restoration_unload
    manager.upscalers.release_after_use = options.upscaler_unload
    manager.upscalers.tile = options.upscaler_tile()
    try:
        model = manager.select()
        logger.info("Loaded %s", model.label)
    except Exception as exc:  # the UI still starts; the top bar shows the error and lets the user pick
        logger.error("No model loaded at start: %s", exc)
    context = UIContext(manager, options, config_path, StyleDatabase(settings.styles_file),
                        public=server.public, authenticated=bool(pairs))
    atexit.register(context.device.shutdown)  # never leave the process while the device thread runs torch
    api = None
    if server.api:
        from ui.api import ApiAccess, EaselApi, parse_admins

        try:
            access = ApiAccess.from_pairs(api_pairs, parse_admins(server.api_admin))
        except ValueError as exc:
            raise LaunchError(str(exc)) from exc
        api = EaselApi(context, access, server.flags or {})
    if server.nowebui:
        return serve_api_only(api, server, block)
    demo = build_ui(context)
    demo.queue(default_concurrency_limit=1)
    # Served files: outputs, card placeholders (cache), and the previews beside LoRAs and embeddings.
    allowed = [str(settings.output_root), str(settings.cache_dir), str(settings.model_dir("lora")),
               str(settings.model_dir("embeddings"))]
    allowed += [folder for folder in (options.outdir_txt2img, options.outdir_img2img) if folder.strip()]
    app, local_url, share_url = demo.launch(
        server_name="0.0.0.0" if server.listen else "127.0.0.1",
        server_port=server.port,
        share=server.share,
        auth=pairs or None,
        auth_message="Easel: sign in with the credentials given to --gradio-auth" if pairs else None,
        allowed_paths=allowed,
        css=CSS,
        prevent_thread_lock=True,
        quiet=False,
        footer_links=["settings"],
    )
    if api is not None:
        api.mount(app)
        logger.info("API at %s/sdapi/v1 and %s/easel/v1/jobs, docs at %s/docs", local_url.rstrip("/"),
                    local_url.rstrip("/"), local_url.rstrip("/"))
    if server.share and not share_url:
        logger.error("The share link could not be created (it needs the network to reach gradio's tunnel); "
                     "still serving at %s", local_url)
    demo.easel_context = context
    if block:
        demo.block_thread()
    return demo, local_url, share_url


class ApiServer:
    """`--nowebui`: the API alone, on uvicorn in a background thread."""

    def __init__(self, app, host: str, port: int):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="easel-api", daemon=True)

    def start(self) -> None:
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            self.thread.join(0.05)
        if not self.server.started:
            raise LaunchError("the API server could not start (is the port in use?)")

    def block_thread(self) -> None:
        try:
            self.thread.join()
        except KeyboardInterrupt:
            self.close()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_api_only(api, server: ServerOptions, block: bool):
    from fastapi import FastAPI

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="Easel API")
    api.mount(app)
    host = "0.0.0.0" if server.listen else "127.0.0.1"
    port = server.port or 7861  # A1111's --nowebui port
    handle = ApiServer(app, host, port)
    handle.start()
    url = f"http://127.0.0.1:{port}/"
    logger.info("API only at %ssdapi/v1, docs at %sdocs", url, url)
    if block:
        handle.block_thread()
    return handle, url, None
