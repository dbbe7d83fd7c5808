"""What every kvserve Serve process does at start-up (torch-free): its replica id, and
freezing what it loaded out of the garbage collector's way."""

from __future__ import annotations

import gc
import uuid


def serve_replica_id() -> str:
    """This Serve replica's unique id (a made-up one outside Serve)."""
    from ray import serve

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside Serve (a test building the class directly)
        return f"local-{uuid.uuid4().hex[:8]}"


def freeze_heap() -> None:
    """After a serving process's startup (a replica, the engine process, a router):
    collects, then moves every object alive (the libraries, the model's modules, the
    tokenizer) to the collector's permanent generation. A full collection then walks
    only what was allocated since: in a process that imports torch, transformers and
    Ray it took 0.1-0.2 s of a stopped event loop or step loop, several times a minute
    under load (vLLM freezes its engine core and API server the same way). Cycles among
    frozen objects are never collected: for processes that live as long as what they
    loaded, not for a library's callers."""
    gc.collect()
    gc.freeze()
