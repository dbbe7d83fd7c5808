"""What runs under the HTTP routes: the guard (API key, body size, arrival stamps)
before a body is parsed, and the server-sent-events response of a stream.
"""

import contextvars
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response

from cluster.api.errors import APIError
from cluster.core.messages import Request

# When this request's HTTP call reached the app (``time.monotonic()``; ``_Guard`` sets it
# in the request's context, which the route runs in): ``timing_ms``'s ``api_parse``.
API_ARRIVED: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "kvserve_api_arrived", default=None
)


def stamp_arrival(req: Request) -> float:
    """Stamps ``req`` as its engine's front takes it (``time.monotonic()``, this
    process's clock) with when its HTTP call reached the app (None when unknown): what
    ``cluster.relay.first_token_timing`` splits. Returns the stamp."""
    now = req["submitted_at"] = time.monotonic()
    req["api_arrived_at"] = API_ARRIVED.get()
    return now


@dataclass(frozen=True)
class GuardSettings:
    api_key: str | None = None  # clients must send it (HTTP Bearer, gRPC metadata)
    max_body_bytes: int = 4 * 1024 * 1024  # larger bodies: HTTP 413


# This API process's settings (``ApiIngress`` sets them from the config at start).
GUARD = GuardSettings()


def configure(settings: GuardSettings) -> None:
    global GUARD
    GUARD = settings


class Guard:
    """API key (all but /health) and body size, before the body is parsed. A plain ASGI
    middleware: Starlette's ``BaseHTTPMiddleware`` would relay every streamed chunk
    through its own memory stream."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            API_ARRIVED.set(time.monotonic())
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers", [])}  # fmt: skip
            key = GUARD.api_key
            wrong_key = key and headers.get("authorization", "") != f"Bearer {key}"
            refusal = None
            if wrong_key and scope.get("path") != "/health":
                refusal = APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                   "authentication_error", code="invalid_api_key")  # fmt: skip
            length = headers.get("content-length")
            too_big = length is not None and length.isdigit() and int(length) > GUARD.max_body_bytes
            if refusal is None and too_big:
                refusal = APIError(413, f"request body over {GUARD.max_body_bytes} bytes",
                                   "invalid_request_error")  # fmt: skip
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStream(Response):
    """A server-sent-events response from ``(text, more)`` pairs: one ASGI body message
    per pair, the pair with ``more`` False ends the response (no empty closing message),
    and the iterator is closed as soon as that is sent, so the client's stream ends
    before the request's own clean-up runs. A disconnected client is the server's to
    see: the app runs under Serve, whose HTTP server (direct ingress) or proxy cancels
    the request's task, which closes the iterator (and so aborts the engine request).
    Starlette's ``StreamingResponse`` listens for the disconnect itself, with a task
    group and a second task per stream, and sends a last empty message of its own:
    each an event-loop turn that a burst of arriving requests waits behind."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[tuple[str, bool], None],
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})  # fmt: skip
        more = True
        async with aclosing(self.events) as events:
            async for text, more in events:
                await send({"type": "http.response.body", "body": text.encode(),
                            "more_body": more})  # fmt: skip
                if not more:
                    break
        if more:  # the iterator ended without its last pair
            await send({"type": "http.response.body", "body": b"", "more_body": False})
