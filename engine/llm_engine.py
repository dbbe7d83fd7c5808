"""One engine instance: tokenizer, scheduler, block pool, model runner, sampler.

The step loop is schedule → run → postprocess. ``add_request`` / ``step`` /
``abort`` are the streaming interface the serving layer drives; ``LLM`` wraps them
for offline use. Deterministic given its inputs. With async scheduling (on with CUDA
at TP 1) a greedy step's postprocessing moves to the next ``step`` call, after that
call has launched the following step: the host prepares step N+1 while the GPU runs
step N, and N's tokens feed N+1 on the device (``PENDING`` ids, ``engine.pending``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from engine.block_pool import BlockPool
from engine.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig
from engine.detokenizer import IncrementalDetokenizer, backend_tokenizer
from engine.executor import Executor, make_executor
from engine.kv_cache_manager import KVCacheManager
from engine.loader import resolve_model
from engine.model_runner import ModelRunner
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import Request, RequestStatus
from engine.runner_config import RunnerConfig
from engine.sampler import Sampler, SampleResult
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)


# Run once at start-up when the KV cache is FP8, to set each layer's scales.
FP8_CALIBRATION_TEXT = (
    "The history of science is the study of how people have come to understand the natural "
    "world. Early astronomers charted the motions of the planets; physicians described the "
    "body; engineers built bridges, clocks and engines. def mean(xs):\n    return sum(xs) / "
    "len(xs)\n Questions, answers, numbers such as 3.14159 and 2,718, lists, and dialogue: "
    '"Where are you going?" she asked. "To the library," he said, "to read about rivers."'
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


@dataclass(slots=True)
class _Group:
    """A user request: its ``n`` samples and their detokenizers."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[Request]
    detoks: list[IncrementalDetokenizer]
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None


@dataclass(slots=True)
class _Launched:
    """A step queued on the device whose tokens are not read yet: ``logits`` to sample
    from, or (chained) greedy ``tokens`` on the device with their ``host`` copy and the
    CUDA event that says it landed (None off CUDA)."""

    to_sample: list[Request]
    logits: torch.Tensor | None
    tokens: torch.Tensor | None = None
    host: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None


def _device_greedy(req: Request) -> bool:
    """Whether ``req``'s next token is the argmax of the raw logits (no penalty, ban or
    logprob needs the host): such tokens can stay on the device for the next step."""
    sp = req.sampling_params
    return (
        sp.greedy
        and sp.logprobs is None
        and not sp.uses_penalties
        and req.num_output_tokens + req.num_pending >= sp.min_tokens
    )


def tokenize(tokenizer: Any, prompt: str) -> list[int]:
    """A text prompt's token ids, as every kvserve process tokenizes it."""
    return list(tokenizer(prompt).input_ids)


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> str:
    """A conversation as the prompt text of the model's chat template (ready for the
    assistant's turn); ``ValueError`` when the model has none."""
    if not tokenizer.chat_template:
        raise ValueError("this model has no chat template")
    return str(
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    )


class LLMEngine:
    def __init__(self, args: EngineArgs | None = None, executor_class: Any = None) -> None:
        """``executor_class``: what runs the model on the ranks, handed in (a serving
        core passes ``workers.group.RayExecutor``); None: the one
        ``args.distributed_executor_backend`` names (``engine.executor``)."""
        args = args or EngineArgs()
        if args.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {args.tensor_parallel_size}")
        self.args = args
        model_dir = resolve_model(args.model)
        self.model_dir = model_dir
        hf_config = AutoConfig.from_pretrained(model_dir)
        self.model_config = ModelConfig.from_hf(hf_config)
        self.model_config.check_tensor_parallel(args.tensor_parallel_size)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self._detok_backend = backend_tokenizer(self.tokenizer)
        self.eos_token_ids = self._eos_ids(model_dir)
        device = _device(args.device)
        max_len = args.max_model_len or min(self.model_config.max_position_embeddings, 8192)
        chunked = args.enable_chunked_prefill and args.kv_cache
        batched = args.max_num_batched_tokens or (2048 if chunked else max(2048, max_len))
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=batched,
            max_model_len=max_len,
            enable_chunked_prefill=chunked,
            kv_admission=args.kv_admission,
            unbounded_reserve_tokens=args.unbounded_reserve_tokens,
        )
        self.cache_config = CacheConfig(
            block_size=args.block_size,
            cpu_kv_cache_bytes=args.cpu_kv_cache_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_blocks_override=args.num_blocks,
            enable_prefix_caching=args.enable_prefix_caching,
            kv_cache=args.kv_cache,
            kv_cache_dtype=args.kv_cache_dtype,
            host_kv_cache_bytes=args.host_kv_cache_bytes,
        )
        runner_cfg = RunnerConfig(
            model_dir, self.model_config, self.cache_config, self.scheduler_config, device,
            _dtype(args.dtype, device), args.attention_backend, args.load_format, args.seed,
            args.enforce_eager, args.fused_ops, self._calibration_ids(args),
        )  # fmt: skip
        # Runs the model on every rank; rank 0's runner lives in this process.
        self.executor: Executor = make_executor(
            args.distributed_executor_backend, runner_cfg, args.tensor_parallel_size,
            args.distributed_timeout_s, executor_class,
        )  # fmt: skip
        self.runner: ModelRunner = self.executor.runner
        self.kv: KVCacheManager | None = None
        if args.kv_cache:
            pool = BlockPool(self.executor.num_blocks, args.enable_prefix_caching,
                             self.executor.num_host_blocks)  # fmt: skip
            self.kv = KVCacheManager(pool, args.block_size, extra_key=str(model_dir).encode())
        self.scheduler = Scheduler(self.scheduler_config, self.kv)
        self.sampler = Sampler(args.seed)
        on = args.async_scheduling
        if on is None:
            on = device.type == "cuda"
        takes = getattr(self.executor, "takes_device_tokens", False)  # older executors: no
        self._async = bool(on and args.kv_cache and takes)
        self._inflight: _Launched | None = None
        self._groups: dict[str, _Group] = {}
        self._sample_group: dict[str, _Group] = {}
        self._next_id = 0

    def _calibration_ids(self, args: EngineArgs) -> tuple[int, ...]:
        """Tokens of a short neutral text, for the FP8 KV scales (none without FP8)."""
        if args.kv_cache_dtype != "fp8":
            return ()
        ids = self.tokenize(FP8_CALIBRATION_TEXT)
        return tuple(t for t in ids if 0 <= t < self.model_config.vocab_size)

    def _eos_ids(self, model_dir: os.PathLike[str]) -> tuple[int, ...]:
        ids: list[int] = []
        try:
            gen = GenerationConfig.from_pretrained(model_dir)
            e = gen.eos_token_id
            ids += [e] if isinstance(e, int) else list(e or [])
        except OSError:
            pass
        ids += list(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))

    # --- requests ------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return tokenize(self.tokenizer, prompt)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        return render_chat(self.tokenizer, messages)

    def prefix_hashes(self, limit: int) -> list[bytes]:
        """The hashes of the newest ``limit`` blocks in the prefix cache, on either tier
        (the host tier's first, least recently used first; none without a cache): a
        prefix held on the host is restored by a copy, so placement counts it as held.
        ``prefix_key`` is the key they were hashed with."""
        if self.kv is None or not self.kv.pool.enable_caching:
            return []
        pool = self.kv.pool
        on_device = pool.cached_hashes()
        device = set(on_device)
        host = [h for h in pool.host_hashes() if h not in device]
        return (host + on_device)[-limit:]

    @property
    def prefix_key(self) -> bytes:
        return self.kv.extra_key if self.kv is not None else b""

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        resume: Sequence[int] = (),
    ) -> str:
        """Validates and queues a request (``n`` samples); returns its id.

        ``resume``: output tokens this request already produced elsewhere (an engine
        instance that died mid-stream; ``n`` = 1). They count as its output (length,
        penalties, a seeded generator's draws) and their K/V is recomputed with the
        prompt, so it goes on where it stopped; outputs carry them too.

        Raises ``ValueError`` naming the problem (empty prompt, too long, token ids
        outside the vocabulary, duplicate id, nothing left to resume); nothing is queued
        then.
        """
        group = self._new_group(prompt, params or SamplingParams(), request_id, resume)
        for sample in group.samples:
            self.scheduler.add_request(sample)
        return group.request_id

    def _new_group(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None,
        resume: Sequence[int] = (),
    ) -> _Group:  # fmt: skip
        """Validates a request and registers its group (not yet with the scheduler)."""
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate_prompt(ids)
        max_len = self.scheduler_config.max_model_len
        room = max_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        resume = list(resume)
        if resume:
            self._validate_resume(resume, params, len(ids), max_tokens)
        samples = [
            Request(
                request_id if params.n == 1 else f"{request_id}#{i}", ids, params, max_tokens, text,
                parent_id=request_id, sample_index=i,
            )
            for i in range(params.n)
        ]  # fmt: skip
        detoks = [
            IncrementalDetokenizer(self._detok_backend, params.skip_special_tokens, params.stop)
            for _ in samples
        ]
        for tok in resume:  # n == 1: one sample
            samples[0].append_output_token(tok)
            detoks[0].add(tok, check_stop=False)
        if resume:
            self.sampler.skip_draws(samples[0], self.model_config.vocab_size,
                                    self.runner.device, len(resume))  # fmt: skip
        group = _Group(request_id, text, ids, samples, detoks)
        self._groups[request_id] = group
        for sample in samples:
            self._sample_group[sample.request_id] = group
        return group

    # --- disaggregated prefill / decode ------------------------------------------------
    def add_prefill_request(
        self, prompt: str | list[int], params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:  # fmt: skip
        """Prefill-only: computes the prompt and samples the first token; the request
        then finishes (``finish_reason`` "length" unless it stopped) but keeps its blocks,
        listed in its output's ``kv_block_ids``, until ``release_kv``."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("a disaggregated request has n=1")
        group = self._new_group(prompt, dataclasses.replace(params, max_tokens=1, min_tokens=0),
                                request_id)  # fmt: skip
        sample = group.samples[0]
        sample.hold_kv = True
        self.scheduler.add_request(sample)
        return group.request_id

    def release_kv(self, request_id: str) -> bool:
        """Frees the blocks a prefill-only request kept (its transfer is done or given
        up); they stay in the prefix cache. False if it held none."""
        return self.scheduler.release_held(request_id)

    def add_transferred_request(
        self, prompt: str | list[int], params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> list[int] | None:  # fmt: skip
        """Decode side: registers a request whose prompt K/V comes from a prefill
        instance and returns the block ids to receive it into (None: no room now,
        nothing registered). The prompt's leading full blocks that are in this
        instance's prefix cache need no transfer: the ids are for the blocks after
        them, so the sender skips its first ``ceil(len(prompt) / block_size) - len(ids)``
        blocks. Call ``finish_transfer`` once the blocks are written."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("a disaggregated request has n=1")
        group = self._new_group(prompt, params, request_id)
        blocks = self.scheduler.add_transferred(group.samples[0])
        if blocks is None:
            del self._groups[group.request_id]
            self._sample_group.pop(group.samples[0].request_id, None)
        return blocks

    def finish_transfer(self, request_id: str, first_token: int) -> RequestOutput:
        """The prompt's K/V is in the blocks ``add_transferred_request`` gave: the request
        takes the prefill side's first token and decodes from here. Returns the output
        carrying that token (finished if it already ends the request)."""
        group = self._groups[request_id]
        sample = group.samples[0]
        self.scheduler.transfer_done(sample)
        self.sampler.skip_draws(sample, self.model_config.vocab_size, self.runner.device)
        group.first_token_time = time.monotonic()
        self._append_token(sample, group, first_token)
        done = self._finish_group_if_done(group)
        return done if done is not None else self._output(group)

    def _validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt must not be empty")
        max_len = self.scheduler_config.max_model_len
        if len(ids) >= max_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; max_model_len is {max_len} (room for at least one new token needed)"
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")

    def _validate_resume(self, resume: list[int], params: SamplingParams, num_prompt: int,
                         max_tokens: int) -> None:  # fmt: skip
        if params.n != 1:
            raise ValueError("only a request with n=1 can be resumed")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in resume):
            raise ValueError(f"resumed token ids must be in the vocabulary [0, {vocab})")
        if len(resume) >= max_tokens:
            raise ValueError(f"nothing left to resume: {len(resume)} of {max_tokens} tokens "
                             "were produced already")  # fmt: skip
        if num_prompt + len(resume) >= self.scheduler_config.max_model_len:
            raise ValueError("prompt and resumed tokens fill max_model_len")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Aborts every sample of a request at any point; its blocks return to the pool."""
        group = self._groups.get(request_id)
        if group is None:
            return None
        for s in group.samples:
            if not s.is_finished:
                self.scheduler.abort(s.request_id)
        return self._finish_group_if_done(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # --- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduler step; returns an output for every request it advanced
        (cumulative, ``finished`` set on the last one); a request whose
        ``output_kind`` is ``FINAL_ONLY`` gets only its finished one.

        With async scheduling a step whose every sampled request is plain greedy stays
        in flight: the next call schedules and launches the following step first, then
        reads this one's tokens (the GPU never waits for the host between them), so
        its outputs come from that call. Tokens are the same either way."""
        prev, self._inflight = self._inflight, None
        out = self.scheduler.schedule()
        launched = self._launch(out, prev) if not out.is_empty else None
        touched: dict[str, _Group] = {}
        if prev is not None:
            self._read_tokens(prev, touched)
        if launched is not None and launched.tokens is None:
            self._read_tokens(launched, touched)  # not chained: its tokens now
        elif launched is not None:
            self._inflight = launched
        outputs = []
        for group in touched.values():
            done = self._finish_group_if_done(group)
            if done is not None:
                outputs.append(done)
            elif group.samples[0].sampling_params.output_kind is RequestOutputKind.CUMULATIVE:
                outputs.append(self._output(group))
        return outputs

    def _launch(self, out: SchedulerOutput, prev: _Launched | None) -> _Launched:
        """Queues ``out``'s model run (``PENDING`` ids from ``prev``'s device tokens);
        a step that can be chained also queues its greedy tokens' copy to the host."""
        to_sample = [self.scheduler.requests[s.request_id] for s in out.scheduled if s.needs_sample]
        prev_tokens = None
        if prev is not None and prev.tokens is not None:
            row = {r.request_id: i for i, r in enumerate(prev.to_sample)}
            out.pending_sources = [row[s.request_id] for s in out.scheduled if s.pending]
            prev_tokens = prev.tokens
        chained = self._async and bool(to_sample) and all(map(_device_greedy, to_sample))
        logits = self.executor.execute(out, prev_tokens)
        self.scheduler.update_after_step(out)
        for req in to_sample:
            req.num_pending += 1
        if not chained:
            return _Launched(to_sample, logits)
        tokens = logits.argmax(dim=-1)
        if tokens.device.type != "cuda":
            return _Launched(to_sample, None, tokens, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(to_sample, None, tokens, host, ready)

    def _read_tokens(self, step: _Launched, touched: dict[str, _Group]) -> None:
        """Appends ``step``'s tokens (sampled now from its logits, or its greedy tokens
        once they reach the host) to its requests; those finished meanwhile (a stop
        found in the previous step's tokens, an abort) are skipped."""
        if not step.to_sample:
            return
        if step.logits is not None:
            result = self.sampler.sample(step.logits, step.to_sample, self.eos_token_ids)
        else:
            assert step.host is not None
            if step.ready is not None:
                step.ready.synchronize()
            n = len(step.to_sample)
            result = SampleResult(step.host.tolist(), None, [None] * n)
        self.executor.check_health()  # a rank that died mid-step voids these tokens
        now = time.monotonic()
        for i, req in enumerate(step.to_sample):
            req.num_pending -= 1
            if req.is_finished:
                continue
            group = self._sample_group[req.request_id]
            if group.first_token_time is None:
                group.first_token_time = now
            lp = result.top_logprobs[i]
            if lp is not None and result.sampled_logprobs is not None:
                req.logprobs.append(lp)
                req.cumulative_logprob += result.sampled_logprobs[i]
            self._append_token(req, group, result.token_ids[i])
            touched[group.request_id] = group

    def _append_token(self, req: Request, group: _Group, token: int) -> None:
        sp = req.sampling_params
        req.append_output_token(token)
        detok = group.detoks[req.sample_index]
        stop_str = detok.add(token, check_stop=req.num_output_tokens > sp.min_tokens)
        status = None
        if not sp.ignore_eos and token in self.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif token in sp.stop_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
        elif stop_str is not None:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        elif req.num_output_tokens >= req.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(req, status)
            self.sampler.forget(req.request_id)

    def _finish_group_if_done(self, group: _Group) -> RequestOutput | None:
        if not all(s.is_finished for s in group.samples):
            return None
        del self._groups[group.request_id]
        for s in group.samples:
            self._sample_group.pop(s.request_id, None)
        return self._output(group)

    def _output(self, group: _Group) -> RequestOutput:
        outs = []
        for s, d in zip(group.samples, group.detoks, strict=True):
            wants_lp = s.sampling_params.logprobs is not None
            outs.append(
                CompletionOutput(
                    index=s.sample_index,
                    text=d.visible_text(s.is_finished),
                    token_ids=list(s.output_token_ids),
                    finish_reason=s.status.finish_reason,
                    stop_reason=s.stop_reason,
                    cumulative_logprob=s.cumulative_logprob if wants_lp else None,
                    logprobs=list(s.logprobs) if wants_lp else None,
                )
            )
        finished = all(o.finished for o in outs)
        held = group.samples[0].hold_kv and finished and self.kv is not None
        metrics = {"arrival": group.arrival}
        if group.first_token_time is not None:
            metrics["ttft_s"] = group.first_token_time - group.arrival
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=outs,
            finished=finished,
            num_cached_tokens=max(0, group.samples[0].num_cached_tokens),
            num_host_cached_tokens=group.samples[0].num_host_cached_tokens,
            metrics=metrics,
            kv_block_ids=list(self.kv.block_table(group.request_id)) if held and self.kv else None,
        )

    def shutdown(self) -> None:
        """Releases the worker group (Ray actors, placement group); idempotent."""
        self.executor.shutdown()

    # --- introspection ------------------------------------------------------------
    def kv_usage(self) -> float:
        return self.kv.pool.usage if self.kv is not None else 0.0

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix not held by a running request; returns how many
        cached blocks were forgotten (their K/V is recomputed when a prompt needs it)."""
        return self.kv.pool.reset_prefix_cache() if self.kv is not None else 0

    def pool_is_whole(self) -> bool:
        """True when no request holds a block (all free or evictable cache)."""
        if self.kv is None:
            return True
        self.kv.pool.check()
        return (
            self.kv.pool.num_free_blocks == self.kv.pool.num_blocks
            and self.kv.num_requests == 0
            and not self.scheduler.held
        )
