"""One-shot all-reduce through peer memory, for the small sums of decode steps.

At batch 1 a tensor-parallel rank of the 8B shape sums 8 KiB after every attention and
every MLP (64 times a step). NCCL's ring all-reduce took ~15 µs a call on an H200 pair,
a quarter of a TP=2 step. Here every rank's partial sum sits in a buffer of torch's
symmetric memory (``torch.distributed._symmetric_memory``: mapped into every rank of
the group over NVLink); ``symm_mem.one_shot_all_reduce`` waits for the peers' signals
and then reads their buffers directly, in one kernel.

Contract (``PeerAllReduce``):

- Built collectively by every rank of a CUDA group, in the same order
  (``PeerAllReduce.build``); ``None`` where it cannot work (not CUDA, or a dtype or a
  world the kernel does not take). Opt-in: ``KVSERVE_TP_ALLREDUCE=peer``.
- ``staging(shape)`` hands out a view of one of two buffers, alternately; the caller
  writes its partial sum there (``torch.mm(..., out=)``: no extra copy) and
  ``reduce(staged)`` returns the sum in a new tensor. A rank writes a buffer again only
  two reductions later, after its peers have passed the next reduction's start, so
  they are done reading it.
- ``fence()`` restarts the alternation; it must follow a collective that every rank
  passes only after its previous reductions (``TPContext.all_reduce`` calls it after
  every NCCL sum, the model's embedding sum among them), so that the first write of a
  step cannot race a peer's last read of the step before. CUDA graphs capture the
  alternation, so every replay starts from the fence.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import uuid
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MODE = os.environ.get("KVSERVE_TP_ALLREDUCE", "nccl")
"""``peer``: one-shot all-reduce through symmetric memory for sums up to ``MAX_BYTES``;
``nccl`` (default): NCCL for every sum."""
MAX_BYTES = int(os.environ.get("KVSERVE_TP_PEER_MAX_KIB", "1024")) << 10
"""The largest sum that goes through peer memory (larger ones go through NCCL)."""


class PeerAllReduce:
    def __init__(self, name: str, group: Any, buffers: list[torch.Tensor]) -> None:
        self.name, self._group, self._buffers = name, group, buffers
        self._next = 0

    @classmethod
    def build(cls, backend: Any, store: Any, rank: int, size: int, device: torch.device,
              dtype: torch.dtype, max_bytes: int = MAX_BYTES) -> PeerAllReduce | None:  # fmt: skip
        """Registers this rank's NCCL ``backend`` (a ``ProcessGroupNCCL`` made from
        ``store``) as a named process group, allocates two symmetric buffers of
        ``max_bytes`` and meets the other ranks (a collective: every rank calls it)."""
        if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return None
        import torch.distributed._symmetric_memory as symm

        c10d: Any = torch._C._distributed_c10d
        if rank == 0:
            store.set("peer-allreduce-name", f"kvserve-tp-{uuid.uuid4().hex[:12]}")
        name = store.get("peer-allreduce-name").decode()
        group = c10d.ProcessGroup(dist.PrefixStore("peer-allreduce", store), rank, size)
        group._register_backend(torch.device("cuda"), c10d.ProcessGroup.BackendType.NCCL, backend)
        group._set_default_backend(c10d.ProcessGroup.BackendType.NCCL)
        group._set_group_name(name)
        c10d._register_process_group(name, group)
        elems = max_bytes // torch.empty((), dtype=dtype).element_size()
        buffers = []
        for _ in range(2):
            buf = symm.empty(elems, dtype=dtype, device=device)
            symm.rendezvous(buf, name)
            buffers.append(buf)
        logger.info("peer all-reduce %s: rank %d of %d, 2 buffers of %d KiB", name, rank, size,
                    max_bytes >> 10)  # fmt: skip
        return cls(name, group, buffers)

    def fits(self, numel: int, dtype: torch.dtype) -> bool:
        return dtype == self._buffers[0].dtype and numel <= self._buffers[0].numel()

    def fence(self) -> None:
        self._next = 0

    def staging(self, shape: tuple[int, ...]) -> torch.Tensor:
        buf = self._buffers[self._next]
        self._next ^= 1
        return buf[: math.prod(shape)].view(shape)

    def reduce(self, staged: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.name)
        return out

    def close(self) -> None:
        """Drops the buffers and the group's name (the group can be rebuilt)."""
        c10d: Any = torch._C._distributed_c10d
        unregister = getattr(c10d, "_unregister_process_group", None)
        if unregister is not None:
            with contextlib.suppress(RuntimeError):
                unregister(self.name)
        self._buffers = []
