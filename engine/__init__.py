"""kvserve's engine: one model instance with a paged KV cache and continuous batching.

Must not import Ray or open sockets; runs alone on a laptop CPU. The control plane
(``block_pool``, ``block_hash``, ``kv_cache_manager``, ``request``, ``scheduler``,
``scheduler_output``, ``sampling_params``, ``config``, ``kv_budget``) never imports torch; the
public names below are loaded lazily so importing the control plane stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config import EngineArgs
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine
    from engine.outputs import CompletionOutput, RequestOutput
    from engine.sampling_params import RequestOutputKind, SamplingParams

_EXPORTS = {
    "LLM": "engine.llm",
    "EngineArgs": "engine.config",
    "LLMEngine": "engine.llm_engine",
    "CompletionOutput": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "RequestOutputKind": "engine.sampling_params",
}

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
