"""A small example extension: a panel with a signature text, written into the infotext of every
image, and an API route that says hello. Disabled while `extensions/example.disabled` exists: delete
that file and restart to try it.
"""

from __future__ import annotations

import logging

from backend.extensions import Control

logger = logging.getLogger(__name__)


def register(easel) -> None:
    easel.add_panel("Signature", [Control("text", "Signature written into the infotext", "text", "")])
    easel.on("before_generation", log_request)
    easel.on("after_image", sign)

    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/hello")
    def hello() -> dict:
        return {"hello": easel.name}

    easel.add_routes(router)


def log_request(event) -> None:
    logger.info("generating %d image(s)", event.request.batch_count * event.request.batch_size)


def sign(event) -> None:
    if event.args["text"]:
        event.parameters["Signature"] = event.args["text"]
