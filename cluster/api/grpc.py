"""The gRPC service of the API replicas, ``kvserve.v1.KVServe`` (Generate,
GenerateStream, ListModels) and ``grpc.health.v1`` (Check, Watch), through Serve's gRPC
proxy or HAProxy: ``GrpcMethods`` (a mixin of the ingress, over the same ``_open`` as
the HTTP routes) and the servicer registrations Serve is given by name
(``cluster.app.GRPC_SERVICERS``). Requests parse leniently: a message that does not
decode reaches the method as ``Malformed`` and is answered INVALID_ARGUMENT with why.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from cluster.api import asgi
from cluster.api.errors import engine_error
from cluster.api.openai import MAX_N
from cluster.core.messages import Delta, Request
from protos import kvserve_pb2 as pb

SERVICE = "kvserve.v1.KVServe"


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse as ``message_type``."""

    message_type: str
    error: str

    @property
    def problem(self) -> str:
        return f"malformed {self.message_type} message: {self.error}"


def _lenient(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError) as e:
            return Malformed(cls.DESCRIPTOR.full_name, str(e)[:200] or "cannot parse")

    return parse


def add_KVServeServicer_to_server(servicer: Any, server: Any) -> None:
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=_lenient(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString),
        "ResetPrefixCache": grpc.unary_unary_rpc_method_handler(
            servicer.ResetPrefixCache,
            request_deserializer=_lenient(pb.ResetPrefixCacheRequest),
            response_serializer=pb.ResetPrefixCacheResponse.SerializeToString),
    }  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.65
        server.add_registered_method_handlers(SERVICE, handlers)


def _grpc_params(opts: Any) -> Any:
    """SamplingParams from ``SamplingOptions`` (unset optional fields keep defaults)."""
    from engine.sampling_params import SamplingParams

    kw: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "n"):  # fmt: skip
        if opts.HasField(name):
            kw[name] = getattr(opts, name)
    kw.setdefault("max_tokens", 16)
    # The same limits as the HTTP API's (cluster.api.openai).
    if kw.get("n", 1) > MAX_N:
        raise ValueError(f"n must be in [1, {MAX_N}]")
    if len(opts.stop) > 8 or any(not s for s in opts.stop):
        raise ValueError("stop: at most 8 non-empty strings")
    return SamplingParams(stop=tuple(opts.stop), ignore_eos=opts.ignore_eos, **kw)


def _grpc_choices(pb: Any, item: Delta) -> list[Any]:
    out = []
    for c in item["choices"]:
        lps = [pb.TokenLogprob(token=e["token"], logprob=e["logprob"], top=dict(e["top"]))
               for e in c["logprobs"] or []]  # fmt: skip
        out.append(pb.Choice(index=c["index"], text=c["text"], token_ids=c["token_ids"],
                             finish_reason=c["finish_reason"] or "", logprobs=lps))  # fmt: skip
    return out


class GrpcMethods:
    """The gRPC methods of an ingress that has ``_open``, ``_engine_info``, ``_serving``
    (``cluster.api.http.OpenAIFront``) and ``model_name``."""

    model_name: str

    def _open(self, req: Request) -> AsyncIterator[Delta]:
        raise NotImplementedError

    async def _engine_info(self) -> dict[str, Any]:
        raise NotImplementedError

    async def _serving(self) -> tuple[bool, str]:
        raise NotImplementedError

    async def _reset_prefix_cache(self) -> dict[str, int | str]:
        raise NotImplementedError

    def _grpc_admit(self, request: Any, context: Any) -> bool:
        """The API key (when one is configured) and a message that parsed; else False
        after setting UNAUTHENTICATED / INVALID_ARGUMENT on ``context``."""
        import grpc

        key = asgi.GUARD.api_key
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

    def _grpc_check(self, request: Any, context: Any) -> Request | None:
        """The engine request for a ``GenerateRequest``, or None after setting
        INVALID_ARGUMENT / NOT_FOUND / UNAUTHENTICATED on ``context``."""
        import grpc

        if not self._grpc_admit(request, context):
            return None
        problem, code = None, grpc.StatusCode.INVALID_ARGUMENT
        req: Request = {}
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

    async def _grpc_items(self, req: Request, context: Any) -> AsyncIterator[Delta]:
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
            err = engine_error(e)
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
        last: Delta | None = None
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

    def _grpc_response(self, pb: Any, item: Delta, choices: list[Any], completion: int) -> Any:
        usage = pb.Usage(prompt_tokens=item["prompt_tokens"], completion_tokens=completion,
                         cached_tokens=item["cached_tokens"])  # fmt: skip
        acct = item.get("kv") or {}
        kv = pb.KVAccounting(cached_tokens=item["cached_tokens"], instance=acct.get("instance", ""),
                             host_cached_tokens=int(item.get("host_cached_tokens", 0)),
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

    async def ResetPrefixCache(self, request: Any, grpc_context: Any = None) -> Any:
        """``POST /reset_prefix_cache`` over gRPC: UNAVAILABLE when no instance answered."""
        import grpc

        from protos import kvserve_pb2 as pb

        if not self._grpc_admit(request, grpc_context):
            return pb.ResetPrefixCacheResponse()
        done = await self._reset_prefix_cache()
        resp = pb.ResetPrefixCacheResponse(
            forgotten_blocks={k: v for k, v in done.items() if isinstance(v, int)},
            errors={k: v for k, v in done.items() if isinstance(v, str)},
        )
        if not resp.forgotten_blocks and grpc_context is not None:
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details(f"no engine instance reset its prefix cache: {done}")
        return resp
