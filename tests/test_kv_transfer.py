"""KV blocks moved between two Ray actors over a gloo pair: every layer's blocks land
intact in the receiver's (different) block ids, in order, and mismatches fail loudly."""

from __future__ import annotations

from typing import Any

import pytest
import ray
import torch

from workers.comm import new_store_path
from workers.kv_transfer import RECEIVER, SENDER, KVChannel, pack_blocks, unpack_blocks

SHAPE = (2, 12, 4, 2, 8)  # [K/V, blocks, block_size, kv_heads, head_dim]
LAYERS = 3


def _caches(seed: int | None) -> list[torch.Tensor]:
    if seed is None:
        return [torch.zeros(SHAPE) for _ in range(LAYERS)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(LAYERS)]


def test_pack_unpack_roundtrip() -> None:
    src, dst = _caches(1), _caches(None)
    unpack_blocks(dst, [9, 0, 4], pack_blocks(src, [3, 7, 1]))
    for s, d in zip(src, dst, strict=True):
        for a, b in ((3, 9), (7, 0), (1, 4)):
            assert torch.equal(s[:, a], d[:, b])
        assert d[:, 5].abs().sum() == 0  # nothing else written
    with pytest.raises(ValueError, match="does not fit"):
        unpack_blocks(dst, [1, 2], pack_blocks(src, [3, 7, 1]))


class _End:
    def __init__(self, seed: int | None) -> None:
        self.caches = _caches(seed)
        self.channel: KVChannel | None = None

    def connect(self, store: str, role: int) -> None:
        self.channel = KVChannel(store, role, "gloo", timeout_s=30)

    def send(self, block_ids: list[int]) -> int:
        assert self.channel is not None
        return self.channel.send(self.caches, block_ids)

    def recv(self, block_ids: list[int]) -> int:
        assert self.channel is not None
        return self.channel.recv(self.caches, block_ids)

    def blocks(self, block_ids: list[int]) -> torch.Tensor:
        return pack_blocks(self.caches, block_ids)


def test_transfers_between_actors_land_in_the_reserved_blocks(ray_cluster: Any) -> None:
    End = ray.remote(num_cpus=0)(_End)
    prefill, decode = End.remote(1), End.remote(None)
    store = new_store_path()
    ray.get([prefill.connect.remote(store, SENDER), decode.connect.remote(store, RECEIVER)])
    plan = [([3, 7, 1], [9, 0, 4]), ([2], [11]), ([5, 6, 8, 10], [1, 2, 3, 5])]
    for src, dst in plan:  # both sides in the same order: no deadlock
        sent, got = ray.get([prefill.send.remote(src), decode.recv.remote(dst)])
        assert sent == got == LAYERS * 2 * len(src) * 4 * 2 * 8 * 4
    for src, dst in plan:
        assert torch.equal(ray.get(prefill.blocks.remote(src)), ray.get(decode.blocks.remote(dst)))
    # A receiver expecting another block count refuses the transfer.
    with pytest.raises(ray.exceptions.RayTaskError, match="expects 2 blocks"):
        ray.get([prefill.send.remote([1, 2, 3]), decode.recv.remote([4, 5])])
    for a in (prefill, decode):
        ray.kill(a)


def test_a_link_between_different_tp_sizes_is_refused_clearly() -> None:
    """Re-sharding KV heads between TP sizes is not supported: the decode side refuses
    the offer with a message naming both sizes (the request is then recomputed)."""
    import asyncio

    from cluster.kv_links import KVLinks, LinkError

    async def accept() -> None:
        KVLinks("decode-1", "127.0.0.1", "gloo").accept(
            {"peer": "prefill-1", "gen": 1, "host": "127.0.0.1", "port": 1, "tp": 2}
        )

    with pytest.raises(LinkError, match="TP 2, this decode replica TP 1"):
        asyncio.run(accept())
