"""The prefill side of a disaggregated request: a prefill replica computes a decode
replica's prompt and sends its K/V into the blocks that replica reserved, over the
pair's KV link (``workers.kv_links``; NCCL on GPUs, gloo on CPU). A mixin of
``cluster.replica.EngineReplica`` (its ``prefill`` Serve method, which decode replicas
call through the prefill pool's handle)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.async_engine import AsyncEngine
    from cluster.config import Faults
    from workers.kv_links import KVLinks


class PrefillSide:
    links: KVLinks | None
    replica_id: str
    faults: Faults
    engine: AsyncEngine
    _faults_left: int

    async def prefill(self, req: dict[str, Any], avoid: list[str] | None = None,
                      prefix: list[int] | None = None) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """Prefill side of a disaggregated request (called by a decode replica).

        ``req``: ``prompt`` (token ids), ``params``, ``request_id``, ``decode`` (the
        decode replica's id), ``decode_tp`` (its TP: the link re-slices KV heads when it
        differs from this replica's), ``num_blocks`` (what it reserved) and ``skip_blocks`` (the
        prompt's leading blocks it has cached: not sent). Yields, in order:
        ``{"link": offer}`` (join it if new), ``{"seq", "first_token", "cached_tokens",
        "host_cached_tokens", "num_blocks"}`` right before the blocks are sent on that link's turn ``seq``,
        or ``{"error": message}``. ``req["stale_links"]``: (peer, gen) links the decode
        side closed (renewed here); ``avoid`` and ``prefix`` (the prompt's leading block
        hashes: prefix affinity) are for the request router. The blocks are
        released (kept as prefix cache) once the send is over, whether or not the caller
        still listens."""
        assert self.links is not None, "not a prefill replica"
        rid = f"{req['request_id']}-prefill"
        peer = str(req["decode"])
        stale = [int(g) for p, g in req.get("stale_links", ()) if p == self.replica_id]
        yield {"link": self.links.offer(peer, stale, int(req["decode_tp"]))}
        if self._faults_left > 0:  # fault injection (tests)
            self._faults_left -= 1
            yield {"error": "injected prefill failure (faults.fail_prefills)"}
            return
        try:
            out = await self.engine.prefill(req["prompt"], req["params"], rid)
        except Exception as e:  # bad input or a dead engine: the decode side recomputes
            yield {"error": f"prefill failed: {e}"}
            return
        held = out.kv_block_ids or []
        blocks = held[int(req.get("skip_blocks", 0)) :]
        if len(blocks) != int(req["num_blocks"]):
            self.engine.release_kv_nowait(rid)
            yield {"error": f"prefill holds {len(held)} blocks, the decode side has "
                            f"{req.get('skip_blocks', 0)} and reserved {req['num_blocks']}"}  # fmt: skip
            return
        header: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def announce(seq: int) -> None:
            await header.put({"seq": seq, "first_token": out.outputs[0].token_ids[0],
                              "cached_tokens": out.num_cached_tokens,
                              "host_cached_tokens": out.num_host_cached_tokens,
                              "num_blocks": len(blocks)})  # fmt: skip
            if self.faults.send_delay_s:  # fault injection: the receiver waits in its receive
                await asyncio.sleep(self.faults.send_delay_s)

        send = asyncio.ensure_future(
            self.links.send(peer, self.engine.kv_caches(), blocks, announce)
        )
        send.add_done_callback(lambda _: self.engine.release_kv_nowait(rid))
        got = asyncio.ensure_future(header.get())
        try:
            await asyncio.wait([send, got], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the decode side left (e.g. a quarantined pair)
            if not got.done():
                send.cancel()  # not announced: no turn of the link taken; blocks released
            raise
        if got.done():
            yield got.result()
        else:
            got.cancel()
            yield {"error": f"transfer failed before it started: {send.exception()!r}"}
            return
        with contextlib.suppress(Exception):  # failures were logged; the link is broken
            await asyncio.shield(send)
