"""Continuous batching with one token budget per step.

There are no prefill and decode phases: each request has ``num_computed_tokens``
and the scheduler spends ``max_num_batched_tokens`` across requests, running ones
first (FCFS), then waiting ones. A prompt larger than what is left of the budget is
chunked. When the pool cannot supply blocks, the newest running request is
preempted (its blocks freed, to be recomputed later, often from the prefix cache)
and moved to the front of the waiting queue; no request is ever dropped.

With async scheduling a running request may have a token still being sampled on the
device (``num_pending``): it is scheduled as if that token were known, its id
``PENDING`` in the step's description, unless that token is its last (``max_tokens``).

Admission (``SchedulerConfig.kv_admission``): "projected" admits a waiting request only
while the free blocks cover what it and every admitted request may still need
(``engine.kv_budget``), so bounded requests never preempt; "committed" admits on the
blocks of this step alone and lets decode growth preempt. A prefix hit on the pool's
host tier is restored by a copy the step carries (``SchedulerOutput.restores``), as are
the spills of the cached blocks the step's allocations evicted.

Pure Python; mutates only the requests and the KV cache manager it is given.
"""

from __future__ import annotations

from collections import deque

from engine.config import SchedulerConfig
from engine.kv_budget import blocks_for, projected_tokens
from engine.kv_cache_manager import HOST, Hit, KVCacheManager
from engine.request import Request, RequestStatus
from engine.scheduler_output import PENDING, ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager | None) -> None:
        """``kv=None`` is the recompute mode: every step recomputes whole sequences."""
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.held: dict[str, Request] = {}  # finished prefill-only requests keeping blocks
        self.prefix_cache_queries = 0  # prompt tokens looked up at first admission
        self.prefix_cache_hits = 0  # of which found in the prefix cache
        self.prefix_cache_host_hits = 0  # of which restored from the host tier
        self.prompt_tokens_computed = 0  # prompt positions computed (recomputes included)

    # --- queue management ------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Ends ``request`` with ``status`` (a finished one); frees its blocks."""
        assert status.finished
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        del self.requests[request.request_id]
        if self.kv is None:
            return
        if request.hold_kv and status != RequestStatus.FINISHED_ABORTED:
            self.held[request.request_id] = request  # its K/V is being sent elsewhere
        else:
            self.kv.free(request)

    def release_held(self, request_id: str) -> bool:
        """Frees the blocks of a finished prefill-only request (transfer done or given
        up); its full blocks stay in the prefix cache. False if none was held."""
        request = self.held.pop(request_id, None)
        if request is None or self.kv is None:
            return False
        self.kv.free(request)
        return True

    def add_transferred(self, request: Request) -> list[int] | None:
        """Registers a request whose prompt K/V will arrive from another instance; returns
        the block ids to receive into (None: no room now). Leading full blocks already in
        this instance's prefix cache are taken from it: the ids returned are for the
        blocks after them (``num_cached_tokens`` says how many tokens were hits). It is
        not scheduled until ``transfer_done``."""
        assert self.kv is not None, "a transfer needs the KV cache"
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        incoming = sum(
            1 for r in self.requests.values() if r.status == RequestStatus.WAITING_FOR_KV
        )
        if len(self.running) + incoming >= self.config.max_num_seqs:
            return None  # the batch is full: a transferred request would not be scheduled
        hits = self.kv.find_cached_prefix(request, host=False)
        if not self._fits(request, hits, self.projected_blocks()):
            return None
        blocks = self.kv.allocate_for_transfer(request, request.num_prompt_tokens, hits)
        if blocks is None:
            return None
        request.num_cached_tokens = len(hits) * self.kv.block_size
        self.prefix_cache_queries += request.num_prompt_tokens
        self.prefix_cache_hits += request.num_cached_tokens
        request.status = RequestStatus.WAITING_FOR_KV
        self.requests[request.request_id] = request
        return blocks

    def transfer_done(self, request: Request) -> None:
        """The prompt's K/V is in place: the request decodes from here."""
        assert self.kv is not None and request.status == RequestStatus.WAITING_FOR_KV
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.commit_transfer(request, request.num_prompt_tokens)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Aborts a request at any point; returns it, or None if unknown/finished."""
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # --- one step ----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(use_cache=self.kv is not None)
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending and req.num_output_tokens + req.num_pending >= req.max_tokens:
                i += 1  # its last token is being sampled: nothing more to compute
                continue
            num_new = req.num_tokens + req.num_pending - req.num_computed_tokens
            if self.kv is None and num_new > budget:
                i += 1  # recompute mode cannot chunk; try again next step
                continue
            num_new = min(num_new, budget)
            if not self._allocate_or_preempt(req, num_new, out):
                break  # req itself was preempted
            self._emit(req, num_new, out)
            budget -= num_new
            i += 1
        if not out.preempted:
            budget = self._admit_waiting(budget, out)
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        if self.kv is not None:
            out.spills, out.restores = self.kv.pool.take_copies()
        return out

    # --- the KV budget (engine.kv_budget) -------------------------------------------
    def blocks_needed(self, req: Request) -> int:
        """Blocks ``req`` may still allocate: its projected tokens' blocks beyond its table."""
        assert self.kv is not None
        c = self.config
        bounded = req.max_tokens if req.sampling_params.max_tokens is not None else None
        tokens = projected_tokens(req.num_prompt_tokens, bounded, req.num_tokens + req.num_pending,
                                  c.max_model_len, c.unbounded_reserve_tokens)  # fmt: skip
        have = len(self.kv.block_table(req.request_id))
        return max(0, blocks_for(tokens, self.kv.block_size) - have)

    def projected_blocks(self) -> int:
        """Blocks the admitted requests (running, or waiting for a transfer) may still
        allocate: what projected admission keeps free for them."""
        if self.kv is None:
            return 0
        return sum(self.blocks_needed(r) for r in self.requests.values()
                   if r.status in (RequestStatus.RUNNING, RequestStatus.WAITING_FOR_KV))  # fmt: skip

    def _fits(self, req: Request, hits: list[Hit], reserved: int) -> bool:
        """Projected admission: the blocks ``req`` takes beyond its device hits, now and
        later, fit in the free blocks less the hits nobody holds and ``reserved``. Always
        true under "committed", and when nothing is admitted (a lone request always
        starts)."""
        assert self.kv is not None
        if self.config.kv_admission != "projected" or (not self.running and reserved == 0):
            return True
        on_device = sum(1 for b in hits if b is not HOST)
        return self.blocks_needed(req) - on_device <= self.kv.free_beside(hits) - reserved

    def _allocate_or_preempt(self, req: Request, num_new: int, out: SchedulerOutput) -> bool:
        if self.kv is None:
            return True
        while not self.kv.allocate_slots(req, num_new):
            victim = self._victim(req)
            self.running.remove(victim)
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _victim(self, req: Request) -> Request:
        """The newest running request not yet scheduled in this step (``req`` itself when
        none is left) whose next token is not being sampled on the device: a request
        with a pending token may be a prefill-only one about to hand its blocks over."""
        for r in reversed(self.running):
            if r is req or not r.num_pending:
                return r
        return req

    def _preempt(self, req: Request) -> None:
        assert self.kv is not None
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        reserved = -1  # the admitted requests' projected blocks, counted when first needed
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits = self.kv.find_cached_prefix(req) if self.kv is not None else []
            num_computed = len(hits) * self.kv.block_size if self.kv is not None else 0
            num_new = req.num_tokens - num_computed
            if num_new > budget and (self.kv is None or not self.config.enable_chunked_prefill):
                break
            num_new = min(num_new, budget)
            if self.kv is not None:
                projected = self.config.kv_admission == "projected"
                if projected and reserved < 0:
                    reserved = self.projected_blocks()
                if not self._fits(req, hits, reserved):
                    break  # FCFS: nobody overtakes the head of the queue
                if not self.kv.allocate_slots(req, num_new, hits):
                    break
                if projected:
                    reserved += self.blocks_needed(req)
            self.waiting.popleft()
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed
                req.num_host_cached_tokens = hits.count(HOST) * (
                    self.kv.block_size if self.kv else 0
                )
                self.prefix_cache_host_hits += req.num_host_cached_tokens
                # First admission: counted like vLLM's prefix-cache queries / hits (tokens).
                self.prefix_cache_queries += req.num_tokens
                self.prefix_cache_hits += num_computed
            self._emit(req, num_new, out)
            budget -= num_new
        return budget

    def _emit(self, req: Request, num_new: int, out: SchedulerOutput) -> None:
        start = req.num_computed_tokens
        if start < req.num_prompt_tokens:
            self.prompt_tokens_computed += min(start + num_new, req.num_prompt_tokens) - start
        token_ids = req.all_token_ids[start : start + num_new]
        token_ids += [PENDING] * (num_new - len(token_ids))  # sampled by the running step
        out.scheduled.append(
            ScheduledRequest(
                request_id=req.request_id,
                token_ids=token_ids,
                start_pos=start,
                block_ids=self.kv.block_table(req.request_id) if self.kv is not None else [],
                needs_sample=start + num_new == req.num_tokens + req.num_pending,
            )
        )

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advances ``num_computed_tokens`` of every request the step computed."""
        for s in out.scheduled:
            req = self.requests.get(s.request_id)
            if req is None:
                continue
            # Recompute mode keeps nothing: the next step starts from token 0 again.
            req.num_computed_tokens = 0 if not out.use_cache else s.start_pos + s.num_new_tokens
