"""The Serve ingress: OpenAI-compatible HTTP in front of the engine pool.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending with
``data: [DONE]``). Errors come in OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``: 400 for bad input (never a 5xx for it), 401 without the API key
(when ``KVSERVE_API_KEY`` is set), 404 for an unknown model, 413 for a body over the
limit, 503 with ``Retry-After`` when the engine is gone.

The router holds no model state: requests go to an ``EngineReplica`` through a
streaming deployment handle (Serve picks the replica); a client that disconnects
cancels the handle's stream, which aborts the request in its engine.
"""

import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.openai_protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = int(os.environ.get("KVSERVE_MAX_BODY_BYTES", str(4 * 1024 * 1024)))

app = FastAPI(title="kvserve", docs_url=None, redoc_url=None)


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


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
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


@app.middleware("http")
async def _guard(request: Request, call_next: Any) -> Any:
    """API key (all but /health) and body size, before the body is parsed."""
    key = os.environ.get("KVSERVE_API_KEY")
    wrong_key = key and request.headers.get("authorization", "") != f"Bearer {key}"
    if wrong_key and request.url.path != "/health":
        return APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                        "authentication_error", code="invalid_api_key").response()  # fmt: skip
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return APIError(413, f"request body over {MAX_BODY_BYTES} bytes",
                        "invalid_request_error").response()  # fmt: skip
    return await call_next(request)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _usage(item: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
    prompt = int(item["prompt_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": int(item["cached_tokens"])},
    }


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
    if isinstance(e, ValueError):
        return bad_request(str(e))
    logger.warning("engine call failed: %s", e)
    return APIError(503, f"the engine is unavailable: {type(e).__name__}", "server_error",
                    code="engine_unavailable", headers={"Retry-After": "5"})  # fmt: skip


@serve.deployment(name="router")
@serve.ingress(app)
class Router:
    def __init__(self, engine: DeploymentHandle, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.created = int(time.time())

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await self.engine.check_health.remote()
        except Exception as e:  # any failure of the pool means not serving
            return JSONResponse({"status": "unhealthy", "error": str(e)[:200]}, status_code=503,
                                headers={"Retry-After": "5"})  # fmt: skip
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model:path}")
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
    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        self._check_model(body.model)
        req = {"prompt": body.prompt, "params": body.to_params()}
        return await self._serve(body, req, chat=False)

    @app.post("/v1/chat/completions")
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
        gen: Any = self.engine.options(stream=True).generate.remote(req)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the engine returned nothing", "server_error") from None
        except Exception as e:
            raise _engine_error(e) from None
        if "error" in first:
            raise bad_request(first["error"], "messages" if chat else "prompt")
        if body.stream:
            return StreamingResponse(
                self._sse(gen, first, rid, body, chat), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )  # fmt: skip
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
        usage = _usage(item, sum(counts))
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": _chat_logprobs(lps[i], body) if body.logprobs else None,
                        "finish_reason": reasons[i]} for i in range(n)]  # fmt: skip
            return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices, "usage": usage}  # fmt: skip
        choices = [{"index": i, "text": texts[i],
                    "logprobs": _completion_logprobs(lps[i], body) if body.logprobs is not None else None,
                    "finish_reason": reasons[i]} for i in range(n)]  # fmt: skip
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": usage}  # fmt: skip

    async def _sse(self, gen: Any, first: dict[str, Any], rid: str, body: Any,
                   chat: bool) -> AsyncIterator[str]:  # fmt: skip
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        started: set[int] = set()
        total = 0
        item = first
        try:
            while True:
                for c in item["choices"]:
                    total += len(c["token_ids"])
                    yield _event(self._chunk(rid, obj, created, c, body, chat, started))
                if item["finished"]:
                    break
                item = await gen.__anext__()
            if body.include_usage:
                yield _event({"id": rid, "object": obj, "created": created,
                              "model": self.model_name, "choices": [],
                              "usage": _usage(item, total)})  # fmt: skip
            yield "data: [DONE]\n\n"
        except StopAsyncIteration:
            yield "data: [DONE]\n\n"
        except Exception as e:  # mid-stream: the status is sent already; say it in-band
            err = _engine_error(e)
            yield _event({"error": {"message": err.message, "type": err.type, "param": None,
                                    "code": err.code}})  # fmt: skip
        finally:
            gen.cancel()  # a client that left cancels its request in the engine

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
