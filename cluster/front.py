"""kvserve's API front: OpenAI-compatible HTTP and the gRPC service, whoever serves it.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending with
``data: [DONE]``). Errors come in OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``: 400 for bad input (never a 5xx for it), 401 without the API key
(when ``KVSERVE_API_KEY`` is set), 404 for an unknown model, 413 for a body over the
limit, 429 with ``Retry-After`` when the engine's queue is full, 503 with
``Retry-After`` when the engine is gone.

``OpenAIFront`` holds the routes and RPCs; a Serve ingress class derives from it and
says where a request's deltas come from (``_open``), what the engine is (``_engine_info``)
and whether it can serve (``_serving``). Two do:

- ``cluster.router.Router``: a replica of its own in front of the engine pool (prefix-
  and load-aware placement, failover; two Ray calls per request);
- ``cluster.replica.EngineIngress``: the engine replica itself (behind HAProxy no Ray
  call at all between the client's connection and the engine).

Each gets its own FastAPI app from ``ingress_app()`` (Serve binds an app's routes to
one class).
"""

import asyncio
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

from cluster.front_trace import HTTP_READ_KEY
from cluster.openai_protocol import MAX_N, ChatCompletionRequest, CompletionRequest
from cluster.streams import EngineGone, PoolFull

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


def _api_key() -> str | None:
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
            key = _api_key()
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
    process): ``router_first_delta`` from the router opening the request to its first
    delta arriving there (``router_place``: to the replica's ``submit`` answering);
    ``replica_first_delta`` from the replica's ``submit`` to that delta leaving it, of
    which ``replica_queue`` before the engine took the request and ``engine_ttft`` from
    then to the first token. What ``router_first_delta`` has beyond
    ``replica_first_delta`` is the two Serve calls' wire and queueing time. With the
    engine as the ingress (``cluster.replica.EngineIngress``) there is no router: the
    ``replica_*`` figures run from the request's arrival at the replica's API. With the
    engine in its own process, ``core_out``, ``pipe`` and ``replica_wake`` split what
    follows ``engine_ttft``; ``api_parse`` is the HTTP API's own time before
    ``replica_*`` starts (routing, body parsing). ``replica_received_at`` is no duration but the request's
    arrival at the replica on its host's monotonic clock (ms; ``cluster.loadgen`` on the
    same host turns it into the time outside the replica, in and out)."""
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


def _engine_error(e: BaseException) -> APIError:
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


# --- gRPC (through Serve's gRPC proxy) ----------------------------------------------------
def _grpc_params(opts: Any) -> Any:
    """SamplingParams from ``SamplingOptions`` (unset optional fields keep defaults)."""
    from engine.sampling_params import SamplingParams

    kw: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "n"):  # fmt: skip
        if opts.HasField(name):
            kw[name] = getattr(opts, name)
    kw.setdefault("max_tokens", 16)
    # The same limits as the HTTP API's (cluster.openai_protocol).
    if kw.get("n", 1) > MAX_N:
        raise ValueError(f"n must be in [1, {MAX_N}]")
    if len(opts.stop) > 8 or any(not s for s in opts.stop):
        raise ValueError("stop: at most 8 non-empty strings")
    return SamplingParams(stop=tuple(opts.stop), ignore_eos=opts.ignore_eos, **kw)


def _grpc_choices(pb: Any, item: dict[str, Any]) -> list[Any]:
    out = []
    for c in item["choices"]:
        lps = [pb.TokenLogprob(token=e["token"], logprob=e["logprob"], top=dict(e["top"]))
               for e in c["logprobs"] or []]  # fmt: skip
        out.append(pb.Choice(index=c["index"], text=c["text"], token_ids=c["token_ids"],
                             finish_reason=c["finish_reason"] or "", logprobs=lps))  # fmt: skip
    return out


class OpenAIFront:
    """The HTTP routes (``ROUTES``) and gRPC methods of an ingress; see the module doc.

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
            raise _engine_error(e) from None
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
            raise _engine_error(e) from None
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
            err = _engine_error(e)
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

    # --- gRPC ------------------------------------------------------------------------------
    def _grpc_admit(self, request: Any, context: Any) -> bool:
        """The API key (when one is configured) and a message that parsed; else False
        after setting UNAUTHENTICATED / INVALID_ARGUMENT on ``context``."""
        import grpc

        from cluster.grpc_api import Malformed

        key = _api_key()
        if key and context is not None:
            meta = dict(context.invocation_metadata())
            if meta.get("authorization") != f"Bearer {key}":
                context.set_code(grpc.StatusCode.UNAUTHENTICATED)
                context.set_details("missing or wrong API key (metadata authorization: Bearer ...)")
                return False
        if isinstance(request, Malformed):
            if context is not None:
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(request.problem)
            return False
        return True

    def _grpc_check(self, request: Any, context: Any) -> dict[str, Any] | None:
        """The engine request for a ``GenerateRequest``, or None after setting
        INVALID_ARGUMENT / NOT_FOUND / UNAUTHENTICATED on ``context``."""
        import grpc

        if not self._grpc_admit(request, context):
            return None
        problem, code = None, grpc.StatusCode.INVALID_ARGUMENT
        req: dict[str, Any] = {}
        if request.model and request.model != self.model_name:
            problem, code = (
                f"model {request.model!r} does not exist; this server has {self.model_name!r}",
                grpc.StatusCode.NOT_FOUND,
            )
        else:
            kind = request.WhichOneof("input")
            if kind == "text":
                req["prompt"] = request.text
            elif kind == "token_ids":
                req["prompt"] = list(request.token_ids.ids)
            elif kind == "chat":
                req["messages"] = [
                    {"role": m.role, "content": m.content} for m in request.chat.messages
                ]
            else:
                problem = "one of text, token_ids or chat is required"
            try:
                req["params"] = _grpc_params(request.sampling)
            except (ValueError, TypeError) as e:
                problem = str(e)
        if problem is not None:
            if context is not None:
                context.set_code(code)
                context.set_details(problem)
            return None
        req["request_id"] = f"grpc-{uuid.uuid4().hex}"
        return req

    async def _grpc_items(self, req: dict[str, Any], context: Any) -> AsyncIterator[dict[str, Any]]:
        import grpc

        gen: Any = self._open(req)
        try:
            async for item in gen:
                if "error" in item:
                    if context is not None:
                        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                        context.set_details(item["error"])
                    return
                yield item
        except Exception as e:
            err = _engine_error(e)
            if context is not None:
                context.set_code(
                    grpc.StatusCode.INVALID_ARGUMENT
                    if err.status == 400
                    else grpc.StatusCode.UNAVAILABLE
                )
                context.set_details(err.message)
        finally:
            await gen.aclose()

    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:
        from protos import kvserve_pb2 as pb

        req = self._grpc_check(request, grpc_context)
        if req is None:
            return pb.GenerateResponse()
        n = req["params"].n
        texts, reasons = [""] * n, [""] * n
        tokens: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[Any]] = [[] for _ in range(n)]
        last: dict[str, Any] | None = None
        async for item in self._grpc_items(req, grpc_context):
            last = item
            for c in _grpc_choices(pb, item):
                texts[c.index] += c.text
                tokens[c.index].extend(c.token_ids)
                reasons[c.index] = c.finish_reason or reasons[c.index]
                lps[c.index].extend(c.logprobs)
        if last is None:
            return pb.GenerateResponse()
        choices = [pb.Choice(index=i, text=texts[i], token_ids=tokens[i], finish_reason=reasons[i],
                             logprobs=lps[i]) for i in range(n)]  # fmt: skip
        return self._grpc_response(pb, last, choices, sum(len(t) for t in tokens))

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        from protos import kvserve_pb2 as pb

        req = self._grpc_check(request, grpc_context)
        if req is None:
            return
        total = 0
        async for item in self._grpc_items(req, grpc_context):
            choices = _grpc_choices(pb, item)
            total += sum(len(c.token_ids) for c in choices)
            yield self._grpc_response(pb, item, choices, total)

    def _grpc_response(
        self, pb: Any, item: dict[str, Any], choices: list[Any], completion: int
    ) -> Any:
        usage = pb.Usage(prompt_tokens=item["prompt_tokens"], completion_tokens=completion,
                         cached_tokens=item["cached_tokens"])  # fmt: skip
        acct = item.get("kv") or {}
        kv = pb.KVAccounting(cached_tokens=item["cached_tokens"], instance=acct.get("instance", ""),
                             transferred_bytes=int(acct.get("transferred_bytes", 0)),
                             transfer_seconds=float(acct.get("transfer_seconds", 0.0)),
                             prefill_instance=acct.get("prefill_instance", ""),
                             mode=acct.get("mode", "colocated"))  # fmt: skip
        return pb.GenerateResponse(request_id=item["request_id"], choices=choices,
                                   finished=item["finished"], usage=usage, kv=kv)  # fmt: skip

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        """grpc.health.v1: SERVING while the engine pool answers its health check."""
        from protos import health_pb2 as hpb

        ok = request.service in ("", "kvserve.v1.KVServe") and (await self._serving())[0]
        status = hpb.HealthCheckResponse.SERVING if ok else hpb.HealthCheckResponse.NOT_SERVING
        return hpb.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        """grpc.health.v1 Watch: the status now, then each change (polled every second)."""

        last = None
        while True:
            resp = await self.Check(request, grpc_context)
            if resp.status != last:
                last = resp.status
                yield resp
            await asyncio.sleep(1.0)

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:
        from protos import kvserve_pb2 as pb

        if not self._grpc_admit(request, grpc_context):
            return pb.ListModelsResponse()

        info = await self._engine_info()
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=self.model_name,
                                                          max_model_len=info["max_model_len"])])  # fmt: skip


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
