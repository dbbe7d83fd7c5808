"""KV blocks moved between two Ray actors over a gloo pair: every layer's blocks land
intact in the receiver's (different) block ids, in order, and mismatches fail loudly."""

from __future__ import annotations

from typing import Any

import pytest
import ray
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.parallel import kv_head_range
from workers.comm import new_store_path
from workers.kv_routes import kv_routes
from workers.kv_transfer import (
    RECEIVER,
    SENDER,
    KVChannel,
    _chunks,
    gather_blocks,
    layer_stack,
    pack_blocks,
    scatter_blocks,
    unpack_blocks,
)

SHAPE = (2, 12, 4, 2, 8)  # [K/V, blocks, block_size, kv_heads, head_dim]
LAYERS = 3


def _caches(seed: int | None, stacked: bool = False) -> list[torch.Tensor]:
    """Per-layer caches: separate tensors, or (``stacked``) views of one tensor as the
    engine allocates them."""
    if seed is None:
        full = torch.zeros(LAYERS, *SHAPE)
    else:
        full = torch.randn(LAYERS, *SHAPE, generator=torch.Generator().manual_seed(seed))
    return list(full.unbind(0)) if stacked else [t.clone() for t in full.unbind(0)]


def test_layer_stack_sees_one_tensor_or_none() -> None:
    stacked, separate = _caches(1, stacked=True), _caches(1)
    view = layer_stack(stacked)
    assert view is not None and view.shape == (LAYERS, *SHAPE)
    assert all(torch.equal(view[i], stacked[i]) for i in range(LAYERS))
    view[1, 0, 3] = 7.0  # a view: writes land in the layer's cache
    assert bool((stacked[1][0, 3] == 7.0).all())
    assert layer_stack(separate) is None
    assert layer_stack([stacked[0], stacked[2]]) is not None  # equally spaced
    assert layer_stack([stacked[1], stacked[0]]) is None  # not in order
    # Both paths pack and unpack the same bytes.
    assert torch.equal(pack_blocks(_caches(2, True), [3, 0]), pack_blocks(_caches(2), [3, 0]))
    dst = _caches(None, stacked=True)
    unpack_blocks(dst, [5, 1], pack_blocks(separate, [3, 0]))
    assert torch.equal(pack_blocks(dst, [5, 1]), pack_blocks(separate, [3, 0]))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_every_copy_path_moves_the_same_blocks(data: st.DataObject) -> None:
    """One index kernel over the layer stack and one kernel per layer gather the same
    bytes, and scatter them into exactly the destination blocks."""
    n = data.draw(st.integers(1, 6))
    src = data.draw(st.lists(st.integers(0, 11), min_size=n, max_size=n, unique=True))
    dst = data.draw(st.lists(st.integers(0, 11), min_size=n, max_size=n, unique=True))
    lo = data.draw(st.integers(0, LAYERS - 1))
    hi = data.draw(st.integers(lo + 1, LAYERS))
    caches = _caches(3, stacked=True)
    want = torch.stack([c[:, src] for c in caches[lo:hi]])
    src_idx, dst_idx = torch.tensor(src), torch.tensor(dst)
    for method in ("index", "layers"):
        out = torch.empty_like(want)
        stack = layer_stack(caches) if method == "index" else None
        gather_blocks(caches, stack, src_idx, lo, hi, out)
        assert torch.equal(out, want), method
        target = _caches(None, stacked=True)
        stack = layer_stack(target) if method == "index" else None
        scatter_blocks(target, stack, dst_idx, lo, hi, want)
        for layer, cache in enumerate(target):
            inside = lo <= layer < hi
            for b in range(SHAPE[1]):
                if inside and b in dst:
                    assert torch.equal(cache[:, b], want[layer - lo][:, dst.index(b)]), method
                else:
                    assert not cache[:, b].any(), (method, layer, b)


@pytest.mark.parametrize(("chunk", "expect"), [(0, [(0, 3)]), (1, [(0, 1), (1, 2), (2, 3)]),
                                               (2048, [(0, 2), (2, 3)])])  # fmt: skip
def test_messages_are_whole_layers(chunk: int, expect: list[tuple[int, int]]) -> None:
    # One layer's 2 blocks: 2 (K/V) x 2 blocks x 4 x 2 x 8 float32 = 1 KiB.
    assert _chunks(_caches(None), 2, chunk) == expect


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
    def __init__(self, seed: int | None, stacked: bool) -> None:
        self.caches = _caches(seed, stacked)
        self.channel: KVChannel | None = None

    def connect(self, store: str, role: int) -> None:
        self.channel = KVChannel(store, role, "gloo", timeout_s=30)

    def send(self, block_ids: list[int], chunk: int | None = None) -> int:
        assert self.channel is not None
        return self.channel.send(self.caches, block_ids, chunk)

    def recv(self, block_ids: list[int], chunk: int | None = None) -> int:
        assert self.channel is not None
        return self.channel.recv(self.caches, block_ids, chunk)

    def blocks(self, block_ids: list[int]) -> torch.Tensor:
        return pack_blocks(self.caches, block_ids)


def test_transfers_between_actors_land_in_the_reserved_blocks(ray_cluster: Any) -> None:
    End = ray.remote(num_cpus=0)(_End)
    prefill, decode = End.remote(1, True), End.remote(None, False)  # both cache layouts
    store = new_store_path()
    ray.get([prefill.connect.remote(store, SENDER), decode.connect.remote(store, RECEIVER)])
    # (source blocks, destination blocks, bytes per message: one, one layer, two layers)
    plan = [([3, 7, 1], [9, 0, 4], 0), ([2], [11], 1), ([5, 6, 8, 10], [1, 2, 3, 5], 4096)]
    for src, dst, chunk in plan:  # both sides in the same order: no deadlock
        sent, got = ray.get([prefill.send.remote(src, chunk), decode.recv.remote(dst, chunk)])
        assert sent == got == LAYERS * 2 * len(src) * 4 * 2 * 8 * 4
    for src, dst, _ in plan:
        assert torch.equal(ray.get(prefill.blocks.remote(src)), ray.get(decode.blocks.remote(dst)))
    # A receiver expecting another block count refuses the transfer.
    with pytest.raises(ray.exceptions.RayTaskError, match="expects 2 blocks"):
        ray.get([prefill.send.remote([1, 2, 3]), decode.recv.remote([4, 5])])
    for a in (prefill, decode):
        ray.kill(a)


def _tp_sizes(heads: int) -> list[int]:
    """The TP sizes a model with ``heads`` KV heads can run at (up to 8)."""
    return [t for t in range(1, 9) if heads % t == 0 or t % heads == 0]


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_routes_give_every_decode_head_once_from_a_rank_that_holds_it(data: st.DataObject) -> None:
    heads = data.draw(st.sampled_from([1, 2, 4, 8]))
    p = data.draw(st.sampled_from(_tp_sizes(heads)))
    d = data.draw(st.sampled_from(_tp_sizes(heads)))
    routes = kv_routes(heads, p, d)
    for dst in range(d):
        start, count = kv_head_range(heads, d, dst)
        got = sorted((r.head + i, r.dst_lo + i) for r in routes if r.dst == dst
                     for i in range(r.count))  # fmt: skip
        assert got == [(start + i, i) for i in range(count)]  # each head once, in its place
    for r in routes:
        lo, n = kv_head_range(heads, p, r.src)
        assert lo <= r.head and r.head + r.count <= lo + n and r.src_lo == r.head - lo
    assert routes == sorted(routes, key=lambda r: (r.head, r.dst))
    if p == d and heads % p == 0:  # equal groups: rank r to rank r, every head
        assert [(r.src, r.dst, r.src_lo, r.count) for r in routes] == [
            (r, r, 0, heads // p) for r in range(p)
        ]


def _rank_caches(full: torch.Tensor, heads: int, tp: int, rank: int) -> list[torch.Tensor]:
    """One rank's per-layer caches: its KV heads of ``full`` ([layers, *SHAPE])."""
    lo, n = kv_head_range(heads, tp, rank)
    return [layer[..., lo : lo + n, :].clone() for layer in full.unbind(0)]


@pytest.mark.parametrize(("heads", "p", "d"), [(4, 1, 2), (4, 2, 1), (4, 2, 4), (4, 4, 2),
                                               (1, 1, 2), (1, 2, 1), (2, 4, 1)])  # fmt: skip
def test_a_transfer_between_tp_sizes_reslices_the_heads(heads: int, p: int, d: int) -> None:
    """``p`` prefill ranks send one request's blocks to ``d`` decode ranks (threads of
    this process, gloo, one store as a link has): each decode rank ends with its heads of
    the prefill group's blocks, in its own block ids, and nothing else written."""
    import threading

    from workers.comm import tcp_store
    from workers.kv_routes import RankChannels

    shape = (LAYERS, 2, 12, 4, heads, 8)
    full = torch.randn(shape, generator=torch.Generator().manual_seed(heads * 10 + p))
    senders = [_rank_caches(full, heads, p, r) for r in range(p)]
    receivers = [_rank_caches(torch.zeros(shape), heads, d, r) for r in range(d)]
    routes = kv_routes(heads, p, d)
    master = tcp_store("127.0.0.1", 0, True, 2, 30)
    src, dst, moved = [3, 7, 1], [9, 0, 4], []

    def end(role: int, rank: int, caches: list[torch.Tensor]) -> None:
        store = tcp_store("127.0.0.1", master.port, False, 2, 30)
        ch = RankChannels(store, role, rank, routes, "gloo", 30)
        moved.append(ch.send(caches, src) if role == SENDER else ch.recv(caches, dst))
        ch.close()

    threads = [threading.Thread(target=end, args=(SENDER, r, c)) for r, c in enumerate(senders)]
    threads += [threading.Thread(target=end, args=(RECEIVER, r, c))
                for r, c in enumerate(receivers)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(moved) == p + d
    for rank, caches in enumerate(receivers):
        want = _rank_caches(full, heads, d, rank)
        for layer, got in zip(want, caches, strict=True):
            assert torch.equal(got[:, dst], layer[:, src])
            assert got[:, [b for b in range(12) if b not in dst]].abs().sum() == 0
    block = LAYERS * 2 * 4 * 8 * 4  # bytes of one head of one block, every layer
    per_decode_rank = kv_head_range(heads, d, 0)[1]
    assert sum(moved) == 2 * len(src) * block * per_decode_rank * d  # sent + received


def test_a_link_for_another_model_or_tp_is_refused_clearly() -> None:
    """The decode side refuses an offer made for other KV heads or another decode TP
    (the request is then recomputed) with a message naming both."""
    import asyncio

    from workers.kv_links import KVLinks, LinkError

    async def accept(kv_heads: int, peer_tp: int) -> None:
        offer = {"peer": "prefill-1", "gen": 1, "host": "127.0.0.1", "port": 1, "tp": 2,
                 "peer_tp": peer_tp, "kv_heads": kv_heads}  # fmt: skip
        KVLinks("decode-1", "127.0.0.1", "gloo", kv_heads=4).accept(offer)

    with pytest.raises(LinkError, match="for 8 KV heads at decode TP 1; this decode replica "
                                        "has 4 at TP 1"):  # fmt: skip
        asyncio.run(accept(8, 1))
    with pytest.raises(LinkError, match="at decode TP 2; this decode replica has 4 at TP 1"):
        asyncio.run(accept(4, 2))
