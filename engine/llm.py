"""The offline API, as vLLM users know it::

from engine import LLM, SamplingParams
llm = LLM()                      # the default model, SmolLM2-135M-Instruct
outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from tqdm import tqdm

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    def __init__(self, model: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        """``kwargs`` are ``EngineArgs`` fields (``block_size``, ``max_model_len``, ...)."""
        known = {f.name for f in fields(EngineArgs)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown engine arguments: {sorted(unknown)}")
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs))

    def shutdown(self) -> None:
        """Releases the worker group of a tensor-parallel engine (no-op at TP 1)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Sequence[str] | Sequence[list[int]] | str,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in prompt order.

        All prompts are validated before any is queued, so a bad one raises
        ``ValueError`` without leaving the others half-done.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        tokenized = [self.engine.tokenize(p) if isinstance(p, str) else list(p) for p in prompts]
        for ids in tokenized:
            self.engine._validate_prompt(ids)
        ids_by_order = []
        for p, toks, sp in zip(prompts, tokenized, params, strict=True):
            # Offline: only the finished outputs are read, so the steps build no others.
            sp = replace(sp, output_kind=RequestOutputKind.FINAL_ONLY)
            rid = self.engine.add_request(toks, sp)
            ids_by_order.append((rid, p if isinstance(p, str) else None))
        return self._run(ids_by_order, use_tqdm)

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.engine.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(
        self, ids_by_order: list[tuple[str, str | None]], use_tqdm: bool
    ) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids_by_order), disable=not use_tqdm, desc="generate")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        results = []
        for rid, text in ids_by_order:
            out = done[rid]
            out.prompt = text
            results.append(out)
        return results
