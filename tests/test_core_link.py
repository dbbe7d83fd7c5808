"""API processes' links to an engine core (``cluster.core``): a real engine replica
(outside Serve, on this test's event loop) serves its ``CoreServer`` on loopback, and
``CoreLink``s attach over TCP and in-process. Outputs equal the offline engine's; a wrong key, a
silent peer and a peer sending garbage are refused or dropped alone; a closed link
aborts its own requests, whose blocks return; a dead engine is reported as gone."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cluster.core import transport
from cluster.core.client import CoreLink
from cluster.core.messages import Added, EngineGone, Ready
from engine import LLM
from engine.sampling_params import SamplingParams

MAX_LEN = 256


def _req(prompt: str, params: SamplingParams) -> dict[str, Any]:
    return {"request_id": f"t-{uuid.uuid4().hex[:8]}", "prompt": prompt, "params": params}


async def _collect(link: CoreLink, req: dict[str, Any]) -> dict[str, Any]:
    """The request's deltas joined: text and tokens per sample, and its last delta."""
    queue = await link.add(req)
    texts: dict[int, str] = {}
    tokens: dict[int, list[int]] = {}
    while True:
        item = await queue.get()
        assert not isinstance(item, BaseException), item
        for c in item.get("choices", ()):
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            tokens.setdefault(c["index"], []).extend(c["token_ids"])
        if item.get("finished") or "error" in item:
            link.forget(req["request_id"])
            return {"texts": texts, "tokens": tokens, "last": item}


async def _whole(replica: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = replica.engine.stats()
        if s["running"] == s["waiting"] == 0 and s["free_blocks"] == s["num_blocks"]:
            return s
        assert time.monotonic() < deadline, s
        await asyncio.sleep(0.05)


def test_links_share_the_core(ray_cluster: Any, tiny_dirs: dict[str, Path]) -> None:
    from cluster.replica import EngineReplica

    model = str(tiny_dirs["llama3"])
    llm = LLM(model, device="cpu", max_model_len=MAX_LEN)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, n=2, seed=7,
                             ignore_eos=True)  # fmt: skip
    refs = [llm.generate([p], sp)[0] for p, sp in (("w1 w2 w3", greedy), ("w5 w6", sampled))]
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main() -> None:
        replica = EngineReplica({"model": model, "device": "cpu", "max_model_len": MAX_LEN},
                                "tiny", core_host="127.0.0.1")  # fmt: skip
        server = replica.server
        assert server is not None
        assert server.address.startswith("tcp://127.0.0.1:")
        host, port = "127.0.0.1", int(server.address.rpartition(":")[2])
        a = await CoreLink.open("r", server.address, server.key)  # over TCP
        b = await CoreLink.open("r", server.local_address, server.key)  # in this process
        assert a.info["max_model_len"] == MAX_LEN and a.role == "both" and b.info == a.info
        # Two links at once (one per transport), each its own requests: the offline
        # engine's outputs.
        got = await asyncio.gather(_collect(a, _req("w1 w2 w3", greedy)),
                                   _collect(b, _req("w5 w6", sampled)))  # fmt: skip
        for ref, g in zip(refs, got, strict=True):
            for o in ref.outputs:
                assert g["tokens"][o.index] == o.token_ids and g["texts"][o.index] == o.text
        # Bad input: one error delta, nothing queued.
        bad = await _collect(a, _req("w1 " * (MAX_LEN + 10), greedy))
        assert f"max_model_len is {MAX_LEN}" in bad["last"]["error"]
        # A wrong key, a silent peer and garbage from an attached link: refused or
        # dropped alone, while the other link goes on.
        for address in (server.address, server.local_address):
            with pytest.raises(transport.LinkClosed, match="key"):
                await CoreLink.open("r", address, b"not the key")
        silent = await asyncio.open_connection(host, port)
        rogue = await transport.connect(server.address, server.key)
        assert isinstance(await rogue.recv(), Ready)
        assert isinstance(rogue, transport.SocketEnd)
        rogue.writer.write(b"\x00\x00\x00\x05junk!")
        await rogue.drain()
        local_rogue = await transport.connect(server.local_address, server.key)
        assert isinstance(await local_rogue.recv(), Ready)
        local_rogue.send(Added("x", None))  # a message only a core sends
        again = await _collect(a, _req("w1 w2 w3", greedy))
        assert again["tokens"][0] == refs[0].outputs[0].token_ids
        for end in (rogue, local_rogue):  # dropped: end of stream
            with pytest.raises((transport.LinkClosed, TimeoutError)):
                while True:
                    await asyncio.wait_for(end.recv(), 5)
        silent[1].close()
        # A link closed mid-stream: the core aborts its requests; the blocks return.
        queue = await b.add(_req("w4 w5", long))
        assert not isinstance(await queue.get(), BaseException)
        b.close()
        await _whole(replica)
        assert server.live() == 0
        # A dead engine: a new request is refused as gone (the API tries another core).
        replica.engine._dead = RuntimeError("injected")  # type: ignore[assignment]
        with pytest.raises(EngineGone, match="injected"):
            await a.add(_req("w1", greedy))
        a.close()
        replica.engine._dead = None
        replica.__del__()
        replica.engine.shutdown()

    asyncio.run(main())
