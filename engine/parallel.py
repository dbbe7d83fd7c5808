"""Tensor-parallel context: which rank this process is, and its collectives.

With ``size == 1`` every collective is the identity, so the same model code runs
single-process. ``group`` is a ``torch.distributed`` process group (NCCL on GPU,
gloo on CPU) created by the worker layer; the engine never creates one itself.
Groups are plain ``ProcessGroup`` objects, not the global default group, so one
process can hold several (a TP group, KV-transfer pairs) and rebuild them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class TPContext:
    rank: int = 0
    size: int = 1
    group: Any = None
    # Optional one-shot all-reduce through peer memory for small sums (a
    # ``workers.peer_allreduce.PeerAllReduce``, built by the worker layer).
    peer: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} outside tensor-parallel size {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the ranks in place (through the group) and returns it. Every
        rank leaves it only after its peers' earlier sums, so ``peer`` restarts its
        buffers after it (the embedding's sum begins every forward this way)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
            if self.peer is not None:
                self.peer.fence()
        return x

    def linear_all_reduce(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` summed over the ranks (a row-parallel layer's output). With
        ``peer`` the product is written straight into its staging buffer."""
        if self.size > 1 and self.peer is not None and x.dim() == 2:
            shape = (x.shape[0], weight.shape[0])
            if self.peer.fits(shape[0] * shape[1], x.dtype):
                staged = self.peer.staging(shape)
                torch.mm(x, weight.t(), out=staged)
                return self.peer.reduce(staged)  # type: ignore[no-any-return]
        return self.all_reduce(F.linear(x, weight))

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's ``x`` along the last dimension, rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over the ranks (every rank gets the same answer)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what}: {numerator} is not divisible by tensor-parallel size {denominator}"
        )
    return numerator // denominator


def kv_head_range(num_kv_heads: int, size: int, rank: int) -> tuple[int, int]:
    """The KV heads rank ``rank`` of ``size`` holds: (first head, count). Heads split
    evenly when ``size`` divides them; when ``size`` is a multiple of them each rank holds
    one head, the one its query heads use (a head is then on ``size / num_kv_heads``
    ranks). ``ModelConfig.check_tensor_parallel`` refuses other sizes."""
    if size >= num_kv_heads:
        divide(size, num_kv_heads, "tensor-parallel size over KV heads")
        return rank * num_kv_heads // size, 1
    count = divide(num_kv_heads, size, "KV heads")
    return rank * count, count
