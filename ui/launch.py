"""Starting the web UI: authentication, the public-server rule, offline gradio, and `launch()`."""

from __future__ import annotations

import asyncio
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
    enable_insecure_extension_access: bool = False  # extension installs from the UI on a public server
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
    """Build the runtime and the UI and serve them; returns gradio's (app, local_url, share_url)."""
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    pairs = credentials(server)
    api_pairs = parse_auth(server.api_auth) if server.api_auth else []
    check_public(server, pairs, api_pairs)

    from backend.runtime import Runtime

    runtime = Runtime.create(settings, config_path)
    try:
        model = runtime.select_checkpoint()
        if model is None:
            logger.info("Checkpoint %s: the %d workers load it on first use", runtime.manager.selected,
                        runtime.cluster.workers)
        else:
            logger.info("Loaded %s", model.label)
    except Exception as exc:  # the UI still starts; the top bar shows the error and lets the user pick
        logger.error("No model loaded at start: %s", exc)
    atexit.register(runtime.shutdown)  # never leave the process while the device thread runs torch
    api = _api_context(runtime, server, api_pairs) if server.api else None
    if server.nowebui:
        return serve_api_only(api, server, block)
    return _serve_ui(runtime, server, pairs, api, block)


def _api_context(runtime, server: ServerOptions, api_pairs: list[tuple[str, str]]):
    from api import ApiContext
    from api.access import ApiAccess, parse_admins

    try:
        access = ApiAccess.from_pairs(api_pairs, parse_admins(server.api_admin))
    except ValueError as exc:
        raise LaunchError(str(exc)) from exc
    return ApiContext(runtime, access, server.flags or {})


def served_folders(settings) -> list[str]:
    """What the UI's file route may serve: the outputs folder and the cache folders of images made for
    the UI, never the model folders, the rest of the cache or a folder named by an option."""
    from ui.extra_networks import PLACEHOLDERS, SERVED_PREVIEWS
    from ui.webui import UI_IMAGES

    return [str(settings.output_root)] + [str(settings.cache_dir / name) for name in (UI_IMAGES, PLACEHOLDERS,
                                                                                        SERVED_PREVIEWS)]


def _serve_ui(runtime, server: ServerOptions, pairs, api, block: bool):
    from starlette.middleware import Middleware

    from api import mount
    from api.access import FailedLogins, LocalHostOnly
    from ui.webui import CSS, UIContext, build_ui

    context = UIContext(runtime, public=server.public, authenticated=bool(pairs),
                        allow_extension_install=not server.public or server.enable_insecure_extension_access)
    demo = build_ui(context)
    demo.queue(default_concurrency_limit=1)
    middleware = [Middleware(SlowFailedLogins, failures=FailedLogins())] if pairs else []
    if not server.public:
        middleware.append(Middleware(LocalHostOnly))
    app, local_url, share_url = demo.launch(
        server_name="0.0.0.0" if server.listen else "127.0.0.1",
        server_port=server.port,
        share=server.share,
        auth=pairs or None,
        auth_message="Easel: sign in with the credentials given to --gradio-auth" if pairs else None,
        allowed_paths=served_folders(runtime.settings),
        blocked_paths=[str(runtime.settings.models_dir)],
        css=CSS,
        prevent_thread_lock=True,
        quiet=False,
        footer_links=["settings"],
        app_kwargs={"middleware": middleware},
    )
    if api is not None:
        mount(app, api)
        url = local_url.rstrip("/")
        logger.info("API at %s/sdapi/v1 and %s/easel/v1/jobs, docs at %s/docs", url, url, url)
    if server.share and not share_url:
        logger.error("The share link could not be created (it needs the network to reach gradio's tunnel); "
                     "still serving at %s", local_url)
    demo.easel_context = context
    if block:
        demo.block_thread()
    return demo, local_url, share_url


def asgi_app(runtime, server: ServerOptions):
    """The UI and the API as one ASGI app for another server to run (Ray Serve's ingress deployment in a
    KubeRay RayService, `serve_app.py`), under the same access rules as `launch`."""
    import gradio as gr
    from fastapi import FastAPI

    from api import mount
    from api.access import FailedLogins, LocalHostOnly
    from ui.webui import CSS, UIContext, build_ui

    pairs = credentials(server)
    api_pairs = parse_auth(server.api_auth) if server.api_auth else []
    check_public(server, pairs, api_pairs)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="Easel")
    if pairs:
        app.add_middleware(SlowFailedLogins, failures=FailedLogins())
    if not server.public:
        app.add_middleware(LocalHostOnly)
    if server.api:
        mount(app, _api_context(runtime, server, api_pairs))
    if server.nowebui:
        return app
    context = UIContext(runtime, public=server.public, authenticated=bool(pairs),
                        allow_extension_install=not server.public or server.enable_insecure_extension_access)
    demo = build_ui(context)
    demo.queue(default_concurrency_limit=1)
    demo.easel_context = context
    return gr.mount_gradio_app(app, demo, path="/", auth=pairs or None, css=CSS, footer_links=["settings"],
                               auth_message="Easel: sign in with the credentials given to --gradio-auth" if pairs
                               else None, allowed_paths=served_folders(runtime.settings),
                               blocked_paths=[str(runtime.settings.models_dir)])


class SlowFailedLogins:
    """ASGI middleware: a failed sign-in on gradio's login route waits before its answer, longer after
    each failure from the same address (see `api.access.FailedLogins`)."""

    def __init__(self, app, failures, sleep=asyncio.sleep):
        self.app, self.failures, self.sleep = app, failures, sleep

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("?",))[0]

        async def answer(message):
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    await self.sleep(self.failures.failed(address))
                else:
                    self.failures.succeeded(address)
            await send(message)

        await self.app(scope, receive, answer)


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

    from api import mount
    from api.access import LocalHostOnly

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="Easel API")
    mount(app, api)
    if not server.public:
        app.add_middleware(LocalHostOnly)
    host = "0.0.0.0" if server.listen else "127.0.0.1"
    port = server.port or 7861  # A1111's --nowebui port
    handle = ApiServer(app, host, port)
    handle.start()
    url = f"http://127.0.0.1:{port}/"
    logger.info("API only at %ssdapi/v1, docs at %sdocs", url, url)
    if block:
        handle.block_thread()
    return handle, url, None
