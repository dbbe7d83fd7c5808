"""Process groups for one node: tensor-parallel groups made without a global world.

Groups are plain ``ProcessGroup`` objects built from a ``FileStore`` (every rank of a
tensor-parallel group shares one node, by the placement group's ``STRICT_PACK``), not
``init_process_group``: a process may hold several groups and rebuild one after a
failure. Gloo binds to loopback only; NCCL bootstraps through the same store.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from workers import peer_allreduce


def new_store_path() -> str:
    """A fresh rendezvous file for one group (unique: a FileStore must start empty)."""
    return os.path.join(tempfile.gettempdir(), f"kvserve-tp-{uuid.uuid4().hex}")


def tcp_store(host: str, port: int, is_master: bool, world_size: int, timeout_s: float) -> Any:
    """A ``TCPStore`` for a rendezvous across nodes: the master binds ``host:port``
    (port 0: any free one, read back from ``.port``), the others connect to it."""
    return dist.TCPStore(host, port, world_size, is_master, timedelta(seconds=timeout_s),
                         wait_for_workers=False)  # fmt: skip


def new_group(store: str | Any, rank: int, size: int, backend: str, timeout_s: float) -> Any:
    """Returns this rank's ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` (a c10d backend
    object, usable as ``group=`` of the ``torch.distributed`` collectives).

    Joins the group of ``size`` ranks that rendezvous at ``store`` (a ``FileStore`` path
    on one node, or a store object such as ``tcp_store``); blocks until all have joined
    (or ``timeout_s`` passes). Any collective that waits longer than ``timeout_s``
    raises instead of hanging."""
    base = dist.FileStore(store, size) if isinstance(store, str) else store
    store = dist.PrefixStore("tp", base)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        gloo_opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        gloo_opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        gloo_opts._timeout = timeout
        return dist.ProcessGroupGloo(store, rank, size, gloo_opts)
    if backend == "nccl":
        # The heartbeat monitor thread makes a dropped group's destructor wait for its
        # timeout (minutes); our watchdog (workers.group) does its job instead.
        os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "0")
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, nccl_opts)
    raise ValueError(f"backend must be gloo or nccl, got {backend!r}")


def tp_group(store_path: str, rank: int, size: int, backend: str, timeout_s: float,
             device: Any, dtype: Any) -> tuple[Any, Any]:  # fmt: skip
    """A tensor-parallel rank's group (``new_group``) and, on NCCL with
    ``KVSERVE_TP_ALLREDUCE=peer``, its ``PeerAllReduce`` for small sums (else ``None``).
    Every rank calls it with the same arguments but its own ``rank``."""
    base = dist.FileStore(store_path, size)
    group = new_group(base, rank, size, backend, timeout_s)
    if backend != "nccl" or peer_allreduce.MODE != "peer":
        return group, None
    peer = peer_allreduce.PeerAllReduce.build(
        group, dist.PrefixStore("peer", base), rank, size, device, dtype
    )
    return group, peer


# Groups taken out of service. Kept referenced: destroying a ProcessGroupNCCL can block
# (holding the GIL) while its threads wind down, so it must not happen inside a
# garbage collection in the middle of serving. Small: one entry per rebuilt group.
_RETIRED: list[object] = []


def retire_group(group: object, abort: bool) -> None:
    """Keeps ``group`` from being destroyed; aborts its pending collectives first when
    ``abort`` (gloo: closes its sockets). ``ProcessGroupNCCL.abort()`` was seen to
    block for minutes on an H200 pair (torch 2.11), so NCCL groups are not aborted on
    a clean shutdown."""
    if abort:
        abort_group(group)
    _RETIRED.append(group)


def abort_group(group: object) -> None:
    """Breaks every pending collective of ``group`` in this process (best effort)."""
    for name in ("abort", "shutdown"):
        fn = getattr(group, name, None)
        if fn is not None:
            try:
                fn()
                return
            except RuntimeError:
                continue
