"""The OpenAI-compatible HTTP API of the API replicas.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending with
``data: [DONE]``), ``POST /reset_prefix_cache``. Errors come in OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``: 400 for bad input (never a 5xx for it), 401 without the API key
(when ``ServeConfig.api_key`` is set), 404 for an unknown model, 413 for a body over the
limit, 429 with ``Retry-After`` when the engine's queue is full, 503 with
``Retry-After`` when no engine can serve.

``OpenAIFront`` holds the routes; the ingress (``cluster.api.ingress.ApiIngress``) says
where a request's deltas come from (``_open``), what the engine is (``_engine_info``)
and whether it can serve (``_serving``). ``ingress_app()`` is its FastAPI app.
"""

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.api.asgi import EventStream, Guard
from cluster.api.errors import (
    ERRORS,
    APIError,
    ErrorResponse,
    bad_request,
    engine_error,
    on_api_error,
    on_http_error,
    on_validation_error,
)
from cluster.api.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    event,
    kv_extension,
    usage,
)
from cluster.core.messages import Delta, Request

logger = logging.getLogger(__name__)


class OpenAIFront:
    """The HTTP routes (``ROUTES``) of an ingress; see the module doc.

    A subclass sets ``model_name``, ``created`` (unix seconds) and ``affinity`` (what
    ``/health`` says of prefix affinity) and defines the three hooks below."""

    model_name: str
    created: int
    affinity: str

    def _open(self, req: Request) -> AsyncIterator[Delta]:
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

    async def _reset_prefix_cache(self) -> dict[str, int | str]:
        """Per engine instance reached: the cached blocks it forgot, or why it failed."""
        raise NotImplementedError

    async def reset_prefix_cache(self) -> dict[str, Any]:
        """``POST /reset_prefix_cache`` (vLLM's and Ray Serve LLM's name): every engine
        instance empties its prefix cache of the blocks no request holds (running
        requests keep theirs). 200 with each instance's count; 503 if none answered."""
        done = await self._reset_prefix_cache()
        if not any(isinstance(v, int) for v in done.values()):
            raise APIError(503, f"no engine instance reset its prefix cache: {done}",
                           "service_unavailable")  # fmt: skip
        return {"object": "prefix_cache_reset", "instances": done}

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
        req: Request = {"prompt": body.prompt, "params": body.to_params()}  # type: ignore[typeddict-item]
        return await self._serve(body, req, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        self._check_model(body.model)
        try:
            conversation = body.conversation()
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        req: Request = {"messages": conversation, "params": body.to_params()}
        return await self._serve(body, req, chat=True)

    async def _serve(self, body: Any, req: Request, chat: bool) -> Any:
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
        totals = usage(item, sum(counts))
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": chat_logprobs(lps[i], body) if body.logprobs else None,
                        "finish_reason": reasons[i]} for i in range(n)]  # fmt: skip
            return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices, "usage": totals,
                    "kvserve": kv_extension(item)}  # fmt: skip
        choices = [{"index": i, "text": texts[i],
                    "logprobs": completion_logprobs(lps[i], body) if body.logprobs is not None else None,
                    "finish_reason": reasons[i]} for i in range(n)]  # fmt: skip
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": totals,
                "kvserve": kv_extension(item)}  # fmt: skip

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
                    text += event(self._chunk(rid, obj, created, c, body, chat, started))
                if item["finished"]:
                    break
                if text:
                    yield text, True
                item = await gen.__anext__()
            if body.include_usage:
                text += event({"id": rid, "object": obj, "created": created,
                                "model": self.model_name, "choices": [],
                                "usage": usage(item, total), "kvserve": kv_extension(item)})  # fmt: skip
            yield text + "data: [DONE]\n\n", False
        except StopAsyncIteration:
            yield "data: [DONE]\n\n", False
        except Exception as e:  # mid-stream: the status is sent already; say it in-band
            err = engine_error(e)
            yield event({"error": {"message": err.message, "type": err.type, "param": None,
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
                                      "logprobs": chat_logprobs(c["logprobs"] or [], body)
                                      if body.logprobs else None}  # fmt: skip
        else:
            choice = {"index": i, "text": c["text"], "finish_reason": c["finish_reason"],
                      "logprobs": completion_logprobs(c["logprobs"] or [], body)
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
    ("/reset_prefix_cache", "POST", OpenAIFront.reset_prefix_cache),
]


def ingress_app() -> FastAPI:
    """A FastAPI app with ``ROUTES``, the OpenAI-shaped error handlers and the API key
    and body size guard; one per ingress class (``serve.ingress`` binds its routes)."""
    app = FastAPI(title="kvserve", docs_url=None, redoc_url=None,
                  responses={code: {"model": ErrorResponse, "description": what}
                             for code, what in ERRORS.items()})  # fmt: skip
    for path, method, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method])
    app.add_exception_handler(APIError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_middleware(Guard)
    return app
