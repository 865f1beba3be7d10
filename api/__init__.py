"""Easel's REST API: A1111's `/sdapi/v1` routes and Easel's job API, on any FastAPI app (the UI's
server, or an app of its own with `--nowebui`). It imports no gradio.

    api.mount(app, ApiContext(runtime, access, flags))

Clients written for A1111 (Krita plugins, SillyTavern, bots, the `webuiapi` package) work unchanged.
Every generation goes through the device queue shared with the UI; bad input is a 4xx with A1111's
error body, never a 500.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

from api import a1111, controlnet, jobs
from api.context import ApiContext, caller
from api.errors import A1111Route
from backend.version import INFOTEXT_VERSION

__all__ = ["ApiContext", "mount", "openapi"]

_docs = APIRouter(dependencies=[Depends(caller)], route_class=A1111Route)


def openapi() -> dict:
    routes = [r for router in (a1111.router, controlnet.router, jobs.router) for r in router.routes
              if getattr(r, "include_in_schema", True)]
    return get_openapi(title="Easel API (A1111-compatible)", version=INFOTEXT_VERSION, routes=routes)


@_docs.get("/openapi.json", include_in_schema=False)
def _openapi_route():
    return JSONResponse(openapi())


@_docs.get("/docs", include_in_schema=False, response_class=HTMLResponse)
def _docs_route():
    return get_swagger_ui_html(openapi_url="/openapi.json", title="Easel API")


def mount(app: FastAPI, context: ApiContext) -> None:
    """Add the routes ahead of the app's own (`/docs` and `/openapi.json` describe the API), and the
    extensions' routes under `/easel/v1/ext/<name>`, behind the same access rules."""
    app.state.easel_api = context
    before = len(app.router.routes)
    for router in (a1111.router, controlnet.router, jobs.router, _docs):
        app.include_router(router)
    for extension in context.runtime.extensions.active:
        if extension.routes is not None:
            app.include_router(extension.routes, prefix=f"/easel/v1/ext/{extension.name}",
                               dependencies=[Depends(caller)], tags=[f"extension {extension.name}"])
    ours = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[:0] = ours
