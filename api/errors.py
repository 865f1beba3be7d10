"""API errors in A1111's body (`error`, `detail`, `body`, `errors`): validation, auth, Easel's own
errors (their status from `backend.errors`) and bugs (500, logged), whatever app the routes are on."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.errors import http_status

logger = logging.getLogger(__name__)


def error_body(status: int, error: str, detail: Any, body: Any = "", errors: str = "") -> JSONResponse:
    return JSONResponse(status_code=status, content=jsonable_encoder(
        {"error": error, "detail": detail, "body": body, "errors": errors or str(detail)}))


def raise_for(error: BaseException):
    """An engine error as the HTTP error a client can act on; anything else is re-raised (a 500)."""
    status = http_status(error)
    if status is None:
        raise error
    raise HTTPException(status, str(error)) from error


def _validation_body(error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    text = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems)
    return error_body(422, "RequestValidationError", problems, getattr(error, "body", ""), text)


class A1111Route(APIRoute):
    """Errors of these routes answer with A1111's error body, whatever exception handlers the app they
    are mounted on has."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as error:
                return _validation_body(error)
            except StarletteHTTPException as error:  # FastAPI's HTTPException, and Starlette's (bad bodies)
                response = error_body(error.status_code, "HTTPException", error.detail)
                for key, value in (error.headers or {}).items():
                    response.headers[key] = value
                return response
            except Exception as error:
                status = http_status(error)
                if status is not None:
                    return error_body(status, type(error).__name__, str(error))
                logger.error("API error on %s", request.url.path, exc_info=error)
                return error_body(500, type(error).__name__, "", "", str(error))

        return answer
