"""How each engine is driven and timed: the shared ``Context``, our engine through
``LLM.generate`` or ``add_request`` + ``step``, the HF peer through ``generate``.

``hf_generate`` is the peer without a ``Context`` (the GPU suite loads one engine at a
time); the GPU suite's ``generate_batch`` peer lives in ``bench/gpu_env.py``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from bench.common import ModelFacts, random_prompts, sync
from engine import LLM, SamplingParams


@dataclass
class Context:
    """What every workload runs against: both engines, loaded once, and the ceilings.

    ``make_ours(**engine_args)`` builds another instance of our engine on the same
    model (W3's ``kv_cache=False``); ``pad_token_id`` is the peer's pad (= EOS).
    """

    device: torch.device
    ours: LLM
    peer: Any
    facts: ModelFacts
    ceilings: dict[str, Any]
    make_ours: Callable[..., LLM]
    pad_token_id: int

    @property
    def vocab_size(self) -> int:
        return int(self.ours.engine.model_config.vocab_size)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of ``fn``, synchronised on ``device``, after a GC pass."""
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def peer_generate(
    ctx: Context, prompts: list[list[int]], max_new: int, **kwargs: Any
) -> list[list[int]]:
    """``hf_generate`` on the context's peer."""
    return hf_generate(ctx.peer, ctx.device, ctx.pad_token_id, prompts, max_new, **kwargs)


def hf_generate(
    model: Any,
    device: torch.device,
    pad_token_id: int,
    prompts: list[list[int]],
    max_new: int,
    **kwargs: Any,
) -> list[list[int]]:
    """HF ``generate`` on one batch: left padding with ``pad_token_id``, attention mask,
    greedy, exactly ``max_new`` new tokens per row (``min_new_tokens = max_new_tokens``)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        seq = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
            min_new_tokens=max_new, do_sample=False, pad_token_id=pad_token_id, **kwargs,
        )  # fmt: skip
    return [row[width:] for row in seq.tolist()]


def warm_up(ctx: Context, llm: LLM | None = None) -> None:
    """One short generate on each engine (or only on ``llm``) before anything is timed.
    Its prompts come from their own seed, so they never seed the prefix cache of a
    timed prompt."""
    prompts = random_prompts(2, 16, 16, ctx.vocab_size, seed=12345)
    (llm or ctx.ours).generate(prompts, greedy(4))
    if llm is None:
        peer_generate(ctx, prompts, 4)


class TimingStreamer(BaseStreamer):
    """Records ``perf_counter`` at each ``put``; the first put is the prompt and is skipped."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def ours_token_times(
    llm: LLM, prompt: list[int], sp: SamplingParams, device: torch.device
) -> tuple[float, list[float]]:
    """(start, arrival time of every new token) driving ``add_request`` + ``step``.
    A token is there when ``step`` returns it (its value is on the host); no device
    sync between steps, which would stall async scheduling's step in flight."""
    engine = llm.engine
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    engine.add_request(prompt, sp)
    times: list[float] = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            times.extend([now] * (len(o.outputs[0].token_ids) - len(times)))
    return t0, times
