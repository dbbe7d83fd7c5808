"""Errors of the API in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
and what each engine-side failure becomes (``engine_error``): 400 for bad input, 429
with ``Retry-After`` for a full queue, 503 with ``Retry-After`` when no engine can serve.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.core.messages import EngineGone, PoolFull

logger = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorBody


ERRORS = {400: "bad input", 401: "missing or wrong API key", 404: "unknown model or path",
           405: "method not allowed", 413: "body too large", 429: "queues full (Retry-After)",
           503: "no engine instance can serve now (Retry-After)"}  # fmt: skip


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code,
        )  # fmt: skip
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (a body that does not parse, an unknown path or method) in
    the OpenAI shape too."""
    status = exc.status_code
    type_ = "invalid_request_error" if status < 500 else "server_error"
    err = APIError(status, str(exc.detail), type_, headers=dict(exc.headers or {}))
    return err.response()


async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = "; ".join(
        f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
        for e in errors[:5]
    )
    return bad_request(msg or "invalid request", param).response()


def engine_error(e: BaseException) -> APIError:
    from ray.serve.exceptions import BackPressureError

    if isinstance(e, ValueError):
        return bad_request(str(e))
    if isinstance(e, BackPressureError | PoolFull):
        return APIError(429, "the engine pool's queues are full; retry shortly",
                        "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})  # fmt: skip
    logger.warning("engine call failed: %s", e)
    what = str(e)[:200] if isinstance(e, EngineGone) else type(e).__name__
    return APIError(503, f"the engine is unavailable: {what}", "server_error",
                    code="engine_unavailable", headers={"Retry-After": "5"})  # fmt: skip
