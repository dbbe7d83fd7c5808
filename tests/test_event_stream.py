"""cluster.api.http's SSE response (``EventStream`` over ``OpenAIFront._sse``): one body
message per engine output, the last one carrying the final chunks, the usage chunk and
``[DONE]`` and ending the response; an engine failure mid-stream ends it with an
in-band error; a cancelled response (Serve cancels it when the client leaves) closes the
engine's stream. The engine's outputs here are the dicts ``_open`` yields."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cluster.api.asgi import EventStream
from cluster.api.http import OpenAIFront
from cluster.api.openai import CompletionRequest, StreamOptions


class Front(OpenAIFront):
    model_name = "m"
    created = 0
    affinity = "off"


def _item(tokens: list[list[int]], finished: bool) -> dict[str, Any]:
    choices = [{"index": i, "text": "".join(f"<{t}>" for t in ids), "token_ids": ids,
                "finish_reason": "length" if finished else None, "logprobs": None}
               for i, ids in enumerate(tokens)]  # fmt: skip
    return {"choices": choices, "finished": finished, "prompt_tokens": 5, "cached_tokens": 0,
            "kv": {"instance": "x"}}  # fmt: skip


class Engine:
    """An async generator of outputs that records whether it was closed."""

    def __init__(self, items: list[dict[str, Any] | Exception], gate: asyncio.Event | None = None):
        self.items = items
        self.gate = gate
        self.closed = False

    async def gen(self) -> AsyncIterator[dict[str, Any]]:
        try:
            for i, item in enumerate(self.items):
                if self.gate is not None and i > 0:
                    await self.gate.wait()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed = True


async def _respond(engine: Engine, body: CompletionRequest) -> list[dict[str, Any]]:
    gen = engine.gen()
    first = await gen.__anext__()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await EventStream(Front()._sse(gen, first, "cmpl-1", body, False))({}, None, send)
    return sent


def _events(messages: list[dict[str, Any]]) -> list[Any]:
    text = b"".join(m.get("body", b"") for m in messages[1:]).decode()
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            out.append(block[6:] if block == "data: [DONE]" else json.loads(block[6:]))
    return out


@pytest.mark.parametrize("usage", [True, False])
def test_one_message_per_output_and_the_last_ends_it(usage: bool) -> None:
    body = CompletionRequest(model="m", prompt="x", n=2, stream=True,
                             stream_options=StreamOptions(include_usage=usage))  # fmt: skip
    engine = Engine([_item([[1], [2]], False), _item([[3], [4, 5]], False),
                     _item([[6], [7]], True)])  # fmt: skip
    sent = asyncio.run(_respond(engine, body))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    bodies = sent[1:]
    assert [m["more_body"] for m in bodies] == [True, True, False]  # no empty closing message
    events = _events(sent)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    texts = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i)
             for i in (0, 1)}  # fmt: skip
    assert texts == {0: "<1><3><6>", 1: "<2><4><5><7>"}
    last = bodies[-1]["body"].decode()
    assert last.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in last
    if usage:
        assert events[-2]["usage"]["completion_tokens"] == 7
        assert events[-2]["usage"]["prompt_tokens"] == 5
        assert events[-2]["kvserve"]["instance"] == "x"
    else:
        assert all("usage" not in e for e in events[:-1])
    assert engine.closed


def test_engine_failure_mid_stream_ends_with_an_error_event() -> None:
    body = CompletionRequest(model="m", prompt="x", stream=True)
    engine = Engine([_item([[1]], False), RuntimeError("the core died")])
    sent = asyncio.run(_respond(engine, body))
    assert sent[-1]["more_body"] is False
    events = _events(sent)
    assert events[0]["choices"][0]["text"] == "<1>"
    assert events[-1]["error"]["code"] == "engine_unavailable"
    assert "[DONE]" not in events
    assert engine.closed


def test_cancelled_response_closes_the_engine_stream() -> None:
    body = CompletionRequest(model="m", prompt="x", stream=True)

    async def main() -> Engine:
        gate = asyncio.Event()  # never set: the second output never comes
        engine = Engine([_item([[1]], False), _item([[2]], True)], gate)
        task = asyncio.create_task(_respond(engine, body))
        await asyncio.sleep(0.05)
        assert not task.done() and not engine.closed
        task.cancel()  # what Serve does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine

    assert asyncio.run(main()).closed
