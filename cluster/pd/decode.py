"""The decode side of a disaggregated request: a decode replica reserves blocks for the
prompt past its cached prefix, has a prefill replica compute the prompt and send its
K/V into them (re-placed on another prefill replica when one fails, up to
``pd.prefill_attempts``; quarantining pairs that keep failing), then decodes; when no
prefill is left it recomputes the prompt itself. A mixin of
``cluster.replica.EngineReplica`` (its ``_disaggregated``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from cluster.placement import affinity
from cluster.placement.ledger import get_ledger, up
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from cluster.async_engine import AsyncEngine
    from cluster.config import PDConfig
    from cluster.metrics import EngineMetrics
    from cluster.pd.pairs import PairHealth
    from workers.kv_links import KVLinks

logger = logging.getLogger(__name__)


def kv_links(replica_id: str, host: str, engine: AsyncEngine) -> KVLinks:
    """The KV links of a prefill or decode replica (NCCL on GPUs, gloo on CPU), over
    every rank of its worker group."""
    from workers.kv_links import KVLinks

    eng = engine.engine
    backend = "nccl" if eng.runner.device.type == "cuda" else "gloo"
    ranks = eng.executor.rank_actors() if hasattr(eng.executor, "rank_actors") else []
    return KVLinks(replica_id, host, backend, eng.model_config.num_kv_heads, ranks=ranks)


class PairQuarantined(RuntimeError):
    """The prefill replica that took the request is quarantined for this decode replica."""


class DecodeSide:
    links: KVLinks | None
    pd: PDConfig
    pairs: PairHealth
    metrics: EngineMetrics
    engine: AsyncEngine
    prefill_pool: Any
    replica_id: str
    model_name: str

    async def _disaggregated(self, prompt: str | list[int], params: SamplingParams, rid: str,
                             kv: dict[str, Any]) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Decode side: reserve blocks, have a prefill replica compute the prompt and send
        its K/V into them, then decode here.

        A prefill or transfer that fails (the prefill replica died, its engine failed, the
        link broke) is re-placed on another live prefill replica, keeping the reserved
        blocks, up to ``self.pd.prefill_attempts`` in all (``kv["prefill_retries"]``,
        ``kv["prefill_failures"]``). When none is left, the reservation is released and
        the prompt is recomputed here (the client sees a normal response; ``kv["mode"]``
        says "recomputed"). No room, or n > 1: the request runs here from the start
        ("local").

        Only what this replica lacks moves: the prompt's leading full blocks that are
        in its prefix cache (a previous turn of the conversation, say) are not sent
        (they count in the response's ``cached_tokens``). When at most
        ``self.pd.local_prefill_tokens`` of the prompt are left, it runs here ("local", no
        prefill call)."""
        ids = self.engine.engine.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        blocks = await self.engine.reserve(ids, params, rid) if params.n == 1 else None
        skip = 0  # the prompt's leading blocks held here: not sent
        if blocks is not None:
            bs = self.engine.engine.args.block_size
            skip = -(-len(ids) // bs) - len(blocks)
            if len(ids) - skip * bs <= self.pd.local_prefill_tokens:
                self.engine.abort(rid)  # the reservation; the hits stay cached
                blocks, kv["reason"] = None, f"{len(ids) - skip * bs} tokens left to compute"
        if blocks is None:
            kv["mode"] = "local"
            async for out in self.engine.generate(ids, params, rid):
                yield out
            return
        ledger_res = await self._ledger_reserve(rid, len(blocks))
        failed: list[str] = []
        while True:
            fetch = asyncio.ensure_future(
                self._fetch_kv(ids, params, rid, blocks, skip, kv, failed)
            )
            try:
                first = await asyncio.shield(fetch)
                break
            except asyncio.CancelledError:  # the client left: the transfer still completes
                fetch.add_done_callback(lambda _: self.engine.abort(rid))
                self._ledger_settle(ledger_res, False)
                raise
            except Exception as e:
                peer = kv.pop("prefill_instance", None)
                if isinstance(e, PairQuarantined):  # not a new failure: the pair is resting
                    kv.update({"mode": "local", "reason": str(e)[:300]})
                else:
                    self._prefill_failed(rid, peer, e, kv)
                    if peer is not None and len(failed) + 1 < self.pd.prefill_attempts:
                        failed.append(peer)
                        if await self._prefill_left(failed):
                            kv["prefill_retries"] = len(failed)
                            logger.warning("request %s: prefill on %s failed (%s); re-placing "
                                           "it on another prefill replica", rid, peer, e)  # fmt: skip
                            continue
                    kv.update({"mode": "recomputed", "error": str(e)[:300]})
                self._ledger_settle(ledger_res, False)
                self.engine.abort(rid)
                async for out in self.engine.generate(ids, params, rid):
                    yield out
                return
        self._ledger_settle(ledger_res, True)
        self.pairs.success(kv["prefill_instance"])
        kv["mode"] = "transferred"
        self.metrics.kv_transfer_bytes.inc(max(1, kv["transferred_bytes"]))
        self.metrics.kv_transfer_seconds.observe(kv["transfer_seconds"])
        async for out in self.engine.transferred(rid, first):
            yield out

    def _prefill_failed(self, rid: str, peer: str | None, e: Exception,
                        kv: dict[str, Any]) -> None:  # fmt: skip
        """Counts a failed prefill or transfer against its pair (quarantining a pair that
        keeps failing, which closes its links) and notes it in ``kv``."""
        logger.warning("request %s: prefill/transfer on %s failed: %s", rid, peer, e)
        self.metrics.kv_transfer_failures.inc()
        kv.setdefault("prefill_failures", []).append(peer)
        if peer is not None and self.pairs.failure(peer, time.monotonic()):
            logger.warning("quarantining the pair with prefill replica %s: %s", peer,
                           self.pairs.snapshot(time.monotonic()).get(peer))  # fmt: skip
            assert self.links is not None
            self.links.break_peer(peer, RuntimeError("pair quarantined"))

    async def reset_prefill_pool(self) -> dict[str, int]:
        """Has every live prefill instance the ledger knows empty its prefix cache (a
        call pinned to each); the blocks each forgot. One that fails is left out."""
        try:
            rows = await asyncio.wait_for(get_ledger().instances.remote(), 5.0)
        except Exception as e:
            logger.warning("the ledger did not answer (%s): no prefill instance reset", e)
            return {}
        peers = [str(r["instance_id"]) for r in up(rows, self.model_name, ("prefill",))]
        got = await asyncio.gather(*(self.prefill_pool.reset_prefix_cache.remote(target=p)
                                     for p in peers), return_exceptions=True)  # fmt: skip
        done: dict[str, int] = {}
        for peer, g in zip(peers, got, strict=True):
            if isinstance(g, BaseException):
                logger.warning("prefill instance %s did not reset its prefix cache: %s", peer, g)
            else:
                done.update(g)
        return done

    async def _prefill_left(self, exclude: list[str]) -> bool:
        """Whether the ledger knows a live prefill replica of this model outside
        ``exclude`` and outside the quarantined pairs (no: recompute here rather than
        wait for Serve to start one)."""
        exclude = [*exclude, *self.pairs.quarantined(time.monotonic())]
        try:
            rows = await asyncio.wait_for(get_ledger().instances.remote(), 2.0)
        except Exception as e:
            logger.warning("the ledger did not answer (%s): no prefill re-placement", e)
            return False
        return bool(up(rows, self.model_name, ("prefill",), exclude))

    async def _fetch_kv(self, ids: list[int], params: SamplingParams, rid: str,
                        blocks: list[int], skip: int, kv: dict[str, Any],
                        avoid: list[str]) -> int:  # fmt: skip
        """Runs one prefill call, away from ``avoid`` and the quarantined pairs while
        other prefill replicas exist, and receives its K/V into ``blocks`` (the prompt's
        blocks after the first ``skip``, which are cached here); the first token."""
        assert self.links is not None and self.prefill_pool is not None
        req = {"prompt": ids, "params": params, "request_id": rid, "decode": self.replica_id,
               "num_blocks": len(blocks), "skip_blocks": skip, "decode_tp": self.links.tp,
               "stale_links": self.links.stale_links()}  # fmt: skip
        now = time.monotonic()
        eng = self.engine.engine
        gen = self.prefill_pool.options(stream=True).prefill.remote(
            req,
            avoid=sorted({*self.pairs.quarantined(now), *avoid}),
            prefix=affinity.prompt_prefix(ids, eng.args.block_size, eng.prefix_key),
        )
        key: tuple[str, int] | None = None
        try:
            async for item in gen:
                if "error" in item:
                    raise RuntimeError(item["error"])
                if "link" in item:
                    peer = str(item["link"]["peer"])
                    kv["prefill_instance"] = peer
                    if self.pairs.is_quarantined(peer, now):
                        gen.cancel()  # the prefill side aborts; nothing was computed here
                        raise PairQuarantined(f"the pair with prefill replica {peer} is "
                                              "quarantined after repeated failures")  # fmt: skip
                    key = self.links.accept(item["link"])
                elif "seq" in item:
                    assert key is not None, "the prefill side sent no link"
                    nbytes, secs = await self.links.recv(key, int(item["seq"]),
                                                         self.engine.kv_caches(), blocks)  # fmt: skip
                    kv.update({"transferred_bytes": nbytes, "transfer_seconds": secs,
                               "prefill_cached_tokens": int(item["cached_tokens"]),
                               "prefill_host_cached_tokens":
                                   int(item.get("host_cached_tokens", 0))})  # fmt: skip
                    return int(item["first_token"])
        except Exception as e:
            if key is not None and not isinstance(e, RuntimeError):  # incl. PairQuarantined
                self.links.break_link(key, e)  # the prefill replica is gone: so is the link
            raise
        raise RuntimeError("the prefill stream ended without a transfer")

    async def _ledger_reserve(self, rid: str, n: int) -> tuple[str, int] | None:
        try:
            res: tuple[str, int] | None = await get_ledger().reserve.remote(self.replica_id, rid, n)
            return res
        except Exception as e:  # advisory: the blocks are held here either way
            logger.warning("ledger reservation failed: %s", e)
            return None

    def _ledger_settle(self, res: tuple[str, int] | None, used: bool) -> None:
        if res is not None:
            with contextlib.suppress(Exception):
                get_ledger().settle.remote(res[0], res[1], used)
