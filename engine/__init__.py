"""kvserve's engine: one model instance with a paged KV cache and continuous batching.

Must not import Ray or open sockets; runs alone on a laptop CPU.
"""

from engine.llm import LLM
from engine.llm_engine import EngineArgs, LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "LLMEngine", "RequestOutput", "SamplingParams"]
