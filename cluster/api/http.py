"""The OpenAI-compatible HTTP API of the API replicas.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending with
``data: [DONE]``). Errors come in OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``: 400 for bad input (never a 5xx for it), 401 without the API key
(when ``KVSERVE_API_KEY`` is set), 404 for an unknown model, 413 for a body over the
limit, 429 with ``Retry-After`` when the engine's queue is full, 503 with
``Retry-After`` when no engine can serve.

``OpenAIFront`` holds the routes; the ingress (``cluster.api.ingress.ApiIngress``) says
where a request's deltas come from (``_open``), what the engine is (``_engine_info``)
and whether it can serve (``_serving``). ``ingress_app()`` is its FastAPI app.
"""

import contextvars
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.core.server import EngineGone, PoolFull
from cluster.front_trace import HTTP_READ_KEY
from cluster.openai_protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

# When this request's HTTP call reached the app (``time.monotonic()``; ``_Guard`` sets it
# in the request's context, which the route runs in): ``timing_ms``'s ``api_parse``.
API_ARRIVED: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "kvserve_api_arrived", default=None
)
# When the HTTP server parsed the request's first bytes (only while
# ``cluster.front_trace`` stamps them): ``timing_ms``'s ``http_wait``.
HTTP_READ: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "kvserve_http_read", default=None
)


def stamp_arrival(req: dict[str, Any]) -> float:
    """Stamps ``req`` as its engine's front takes it (``time.monotonic()``, this
    process's clock) with when its HTTP call reached the app and was parsed (None when
    unknown): what ``cluster.relay.first_token_timing`` splits. Returns the stamp."""
    now = req["submitted_at"] = time.monotonic()
    req["api_arrived_at"] = API_ARRIVED.get()
    req["http_read_at"] = HTTP_READ.get()
    return now


MAX_BODY_BYTES = int(os.environ.get("KVSERVE_MAX_BODY_BYTES", str(4 * 1024 * 1024)))


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorBody


_ERRORS = {400: "bad input", 401: "missing or wrong API key", 404: "unknown model or path",
           405: "method not allowed", 413: "body too large", 429: "queues full (Retry-After)",
           503: "no engine instance can serve now (Retry-After)"}  # fmt: skip


def api_key() -> str | None:
    """The key clients must present: ``KVSERVE_API_KEY`` of this router process
    (``ServeConfig.api_key`` reaches it through the deployment's runtime_env)."""
    return os.environ.get("KVSERVE_API_KEY") or None


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


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (a body that does not parse, an unknown path or method) in
    the OpenAI shape too."""
    status = exc.status_code
    type_ = "invalid_request_error" if status < 500 else "server_error"
    err = APIError(status, str(exc.detail), type_, headers=dict(exc.headers or {}))
    return err.response()


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = "; ".join(
        f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
        for e in errors[:5]
    )
    return bad_request(msg or "invalid request", param).response()


class _Guard:
    """API key (all but /health) and body size, before the body is parsed. A plain ASGI
    middleware: Starlette's ``BaseHTTPMiddleware`` would relay every streamed chunk
    through its own memory stream."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            API_ARRIVED.set(time.monotonic())
            if HTTP_READ_KEY in scope:
                HTTP_READ.set(scope[HTTP_READ_KEY])
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers", [])}  # fmt: skip
            key = api_key()
            wrong_key = key and headers.get("authorization", "") != f"Bearer {key}"
            refusal = None
            if wrong_key and scope.get("path") != "/health":
                refusal = APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                   "authentication_error", code="invalid_api_key")  # fmt: skip
            length = headers.get("content-length")
            too_big = length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES
            if refusal is None and too_big:
                refusal = APIError(413, f"request body over {MAX_BODY_BYTES} bytes",
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


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _usage(item: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
    prompt = int(item["prompt_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": min(prompt, int(item["cached_tokens"]))},
    }


def _kv_extension(item: dict[str, Any]) -> dict[str, Any]:
    """kvserve's per-request KV accounting (an extension field of the response): the
    decode (or only) instance, prompt tokens found in its prefix cache, and for a
    disaggregated request the prefill instance and the bytes and seconds of the
    transfer (only the prompt's blocks the decode instance had not cached move);
    ``mode`` is colocated, transferred, recomputed (prefill or transfer failed), local
    (no room to reserve, or little left to compute after prefix hits) or resumed (its
    first instance died; this one went on after ``resumed_tokens``; ``earlier`` holds
    the failed attempts' accounting). ``prefill_failures`` names prefill instances that
    failed the request (``prefill_retries`` of them were followed by another prefill
    instance).

    ``timing_ms`` splits the first token's latency (milliseconds, each within one
    process): ``api_first_delta`` from the API process opening the request to its first
    delta arriving there (``api_place``: until a core took it; ``api_parse``: the HTTP
    call's routing and body parsing before the opening); ``replica_first_delta`` from
    the engine replica taking the request to that delta leaving it, of which
    ``replica_queue`` before the engine took it and ``engine_ttft`` from then to the
    first token. What ``api_first_delta`` has beyond ``replica_first_delta`` is the
    link's wire and queueing time, both ways. ``replica_received_at`` is no duration
    but the request's arrival at the replica on its host's monotonic clock (ms;
    ``bench.loadgen`` on the same host turns it into the time outside the replica, in
    and out). ``api`` names the API replica that served the request."""
    acct = dict(item.get("kv") or {})
    acct.setdefault("mode", "colocated")
    acct["cached_tokens"] = int(item.get("cached_tokens", 0))
    return acct


def _chat_logprobs(entries: list[dict[str, Any]], body: Any) -> dict[str, Any]:
    k = body.top_logprobs or 0
    return {"content": [
        {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                          for t, lp in e["top"][:k]]}
        for e in entries
    ]}  # fmt: skip


def _completion_logprobs(entries: list[dict[str, Any]], body: Any) -> dict[str, Any]:
    k = body.logprobs or 0
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [dict(e["top"][:k]) for e in entries],
        "text_offset": offsets,
    }


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


class OpenAIFront:
    """The HTTP routes (``ROUTES``) of an ingress; see the module doc.

    A subclass sets ``model_name``, ``created`` (unix seconds) and ``affinity`` (what
    ``/health`` says of prefix affinity) and defines the three hooks below."""

    model_name: str
    created: int
    affinity: str

    def _open(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The request's deltas (``cluster.replica`` documents them), as an async
        generator: its first item is an ``{"error"}`` one for bad input; ``ValueError``
        means bad input too, ``PoolFull`` a full queue (429), ``EngineGone`` or any
        other exception an engine that cannot serve (503). Closing it early (``aclose``:
        the client left) aborts the request in the engine."""
        raise NotImplementedError

    async def _engine_info(self) -> dict[str, Any]:
        """The engine's ``EngineReplica.info()``."""
        raise NotImplementedError

    async def _serving(self) -> tuple[bool, str]:
        """Whether an engine instance can take a request now, and a line saying so."""
        raise NotImplementedError

    async def health(self) -> JSONResponse:
        """200 while an engine instance this ingress sends requests to is up (see the
        subclass's ``_serving``), else 503 saying why."""
        ok, detail = await self._serving()
        if not ok:
            return JSONResponse({"status": "unhealthy", "error": detail}, status_code=503,
                                headers={"Retry-After": "5"})  # fmt: skip
        return JSONResponse({"status": "ok", "instances": detail, "affinity": self.affinity})

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model: str) -> dict[str, Any]:
        self._check_model(model)
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "kvserve"}  # fmt: skip

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server has "
                           f"{self.model_name!r}", "invalid_request_error", "model",
                           "model_not_found")  # fmt: skip

    # --- generation -------------------------------------------------------------------
    async def completions(self, body: CompletionRequest) -> Any:
        self._check_model(body.model)
        req = {"prompt": body.prompt, "params": body.to_params()}
        return await self._serve(body, req, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        self._check_model(body.model)
        try:
            conversation = body.conversation()
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        req = {"messages": conversation, "params": body.to_params()}
        return await self._serve(body, req, chat=True)

    async def _serve(self, body: Any, req: dict[str, Any], chat: bool) -> Any:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        req["request_id"] = rid
        gen: Any = self._open(req)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the engine returned nothing", "server_error") from None
        except Exception as e:
            await gen.aclose()
            raise engine_error(e) from None
        if "error" in first:
            raise bad_request(first["error"], "messages" if chat else "prompt")
        if body.stream:
            return EventStream(self._sse(gen, first, rid, body, chat),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        return await self._collect(gen, first, rid, body, chat)

    async def _collect(
        self, gen: Any, first: dict[str, Any], rid: str, body: Any, chat: bool
    ) -> dict[str, Any]:
        n = body.n
        texts = [""] * n
        counts = [0] * n
        reasons: list[str | None] = [None] * n
        lps: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        item = first
        try:
            while True:
                for c in item["choices"]:
                    i = c["index"]
                    texts[i] += c["text"]
                    counts[i] += len(c["token_ids"])
                    reasons[i] = c["finish_reason"] or reasons[i]
                    lps[i].extend(c["logprobs"] or [])
                if item["finished"]:
                    break
                item = await gen.__anext__()
        except StopAsyncIteration:
            pass
        except Exception as e:
            raise engine_error(e) from None
        finally:
            await gen.aclose()  # a client that left cancels its request in the engine
        usage = _usage(item, sum(counts))
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": _chat_logprobs(lps[i], body) if body.logprobs else None,
                        "finish_reason": reasons[i]} for i in range(n)]  # fmt: skip
            return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices, "usage": usage,
                    "kvserve": _kv_extension(item)}  # fmt: skip
        choices = [{"index": i, "text": texts[i],
                    "logprobs": _completion_logprobs(lps[i], body) if body.logprobs is not None else None,
                    "finish_reason": reasons[i]} for i in range(n)]  # fmt: skip
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": usage,
                "kvserve": _kv_extension(item)}  # fmt: skip

    async def _sse(self, gen: Any, first: dict[str, Any], rid: str, body: Any,
                   chat: bool) -> AsyncGenerator[tuple[str, bool], None]:  # fmt: skip
        """The stream's SSE text as ``EventStream`` pairs: one pair per engine output
        (its choices' chunks together), the last one carrying the usage chunk and
        ``[DONE]`` too, with ``more`` False."""
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        started: set[int] = set()
        total = 0
        item = first
        try:
            while True:
                text = ""
                for c in item["choices"]:
                    total += len(c["token_ids"])
                    text += _event(self._chunk(rid, obj, created, c, body, chat, started))
                if item["finished"]:
                    break
                if text:
                    yield text, True
                item = await gen.__anext__()
            if body.include_usage:
                text += _event({"id": rid, "object": obj, "created": created,
                                "model": self.model_name, "choices": [],
                                "usage": _usage(item, total), "kvserve": _kv_extension(item)})  # fmt: skip
            yield text + "data: [DONE]\n\n", False
        except StopAsyncIteration:
            yield "data: [DONE]\n\n", False
        except Exception as e:  # mid-stream: the status is sent already; say it in-band
            err = engine_error(e)
            yield _event({"error": {"message": err.message, "type": err.type, "param": None,
                                    "code": err.code}}), False  # fmt: skip
        finally:
            await gen.aclose()  # a client that left cancels its request in the engine

    def _chunk(self, rid: str, obj: str, created: int, c: dict[str, Any], body: Any, chat: bool,
               started: set[int]) -> dict[str, Any]:  # fmt: skip
        i = c["index"]
        if chat:
            delta: dict[str, Any] = {"content": c["text"]}
            if i not in started:
                delta["role"] = "assistant"
                started.add(i)
            choice: dict[str, Any] = {"index": i, "delta": delta, "finish_reason": c["finish_reason"],
                                      "logprobs": _chat_logprobs(c["logprobs"] or [], body)
                                      if body.logprobs else None}  # fmt: skip
        else:
            choice = {"index": i, "text": c["text"], "finish_reason": c["finish_reason"],
                      "logprobs": _completion_logprobs(c["logprobs"] or [], body)
                      if body.logprobs is not None else None}  # fmt: skip
        return {"id": rid, "object": obj, "created": created, "model": self.model_name,
                "choices": [choice]}  # fmt: skip


# (path, HTTP method, OpenAIFront method): the routes every ingress serves.
ROUTES: list[tuple[str, str, Callable[..., Any]]] = [
    ("/health", "GET", OpenAIFront.health),
    ("/v1/models", "GET", OpenAIFront.models),
    ("/v1/models/{model:path}", "GET", OpenAIFront.model),
    ("/v1/completions", "POST", OpenAIFront.completions),
    ("/v1/chat/completions", "POST", OpenAIFront.chat_completions),
]


def ingress_app() -> FastAPI:
    """A FastAPI app with ``ROUTES``, the OpenAI-shaped error handlers and the API key
    and body size guard; one per ingress class (``serve.ingress`` binds its routes)."""
    app = FastAPI(title="kvserve", docs_url=None, redoc_url=None,
                  responses={code: {"model": ErrorResponse, "description": what}
                             for code, what in _ERRORS.items()})  # fmt: skip
    for path, method, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method])
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_middleware(_Guard)
    return app
