"""Turning a step's logits into next tokens.

Order of operations (that of transformers' logits processors): penalties
(repetition over prompt and output; presence and frequency over output; the
``min_tokens`` ban on stop tokens), then for sampled rows temperature, top-k,
top-p, min-p, and a draw from the request's own generator. Returned logprobs are
those of the model's raw distribution (log-softmax of the unprocessed logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request
from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    # Per row: the sampled token's logprob, and the top-N (token -> logprob) when asked.
    sampled_logprobs: list[float] | None
    top_logprobs: list[dict[int, float] | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._default_gen: torch.Generator | None = None
        self._gens: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._gens.pop(request_id, None)

    def _generator(self, req: Request, device: torch.device) -> torch.Generator:
        sp = req.sampling_params
        if sp.seed is None:
            if self._default_gen is None or self._default_gen.device != device:
                self._default_gen = torch.Generator(device=device).manual_seed(self._seed)
            return self._default_gen
        gen = self._gens.get(req.request_id)
        if gen is None:
            # Sample i of a seeded request with n > 1 gets its own stream.
            gen = torch.Generator(device=device).manual_seed(sp.seed + 1_000_003 * req.sample_index)
            self._gens[req.request_id] = gen
        return gen

    def skip_draws(self, req: Request, vocab_size: int, device: torch.device, n: int = 1) -> None:
        """Advances a seeded request's generator past ``n`` draws made elsewhere (the
        prefill instance sampled its first token), so the next token is the one the
        colocated engine would draw. A draw over ``vocab_size`` probabilities consumes
        the same random numbers whatever the probabilities are."""
        if req.sampling_params.greedy or req.sampling_params.seed is None:
            return
        gen = self._generator(req, device)
        flat = torch.full((vocab_size,), 1.0 / vocab_size, device=device)
        for _ in range(n):
            torch.multinomial(flat, 1, generator=gen)

    def sample(
        self, logits: torch.Tensor, requests: list[Request], eos_ids: tuple[int, ...]
    ) -> SampleResult:
        """logits: float32 [B, V], row i for ``requests[i]``. Does not mutate requests."""
        want_lp = any(r.sampling_params.logprobs is not None for r in requests)
        raw_lp = torch.log_softmax(logits, dim=-1) if want_lp else None
        edited = [i for i, r in enumerate(requests) if _edits_logits(r, eos_ids)]
        if edited:  # the caller's logits stay as they are (a CUDA graph's output buffer)
            logits = logits.clone()
        for i in edited:
            _apply_penalties(logits[i], requests[i], eos_ids)
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        for i in sampled_rows:
            r = requests[i]
            probs = _warped_probs(logits[i], r.sampling_params)
            tokens[i] = torch.multinomial(probs, 1, generator=self._generator(r, logits.device))[0]
        token_list = tokens.tolist()
        if raw_lp is None:
            return SampleResult(token_list, None, [None] * len(requests))
        chosen = raw_lp.gather(1, tokens[:, None]).squeeze(1).tolist()
        tops: list[dict[int, float] | None] = []
        for i, r in enumerate(requests):
            k = r.sampling_params.logprobs
            if k is None:
                tops.append(None)
                continue
            top: dict[int, float] = {}
            if k:
                vals, ids = raw_lp[i].topk(k)
                top = dict(zip(ids.tolist(), vals.tolist(), strict=True))
            top[token_list[i]] = chosen[i]
            tops.append(top)
        return SampleResult(token_list, chosen, tops)


def _edits_logits(r: Request, eos_ids: tuple[int, ...]) -> bool:
    """Whether ``_apply_penalties`` changes ``r``'s row this step."""
    sp = r.sampling_params
    bans = r.num_output_tokens < sp.min_tokens and bool(
        sp.stop_token_ids or (eos_ids and not sp.ignore_eos)
    )
    return bans or sp.uses_penalties


def _apply_penalties(row: torch.Tensor, r: Request, eos_ids: tuple[int, ...]) -> None:
    sp = r.sampling_params
    if r.num_output_tokens < sp.min_tokens:
        banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(eos_ids))
        if banned:
            row[banned] = float("-inf")
    if not sp.uses_penalties:
        return
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(r.all_token_ids)), dtype=torch.long, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(
            vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty
        )
    if (sp.presence_penalty or sp.frequency_penalty) and r.output_token_ids:
        out = torch.tensor(r.output_token_ids, dtype=torch.long, device=row.device)
        counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
        row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(row.dtype)


def _warped_probs(row: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p. row: [V] float32."""
    scores = row / sp.temperature
    if sp.top_k > 0 and sp.top_k < scores.shape[0]:
        kth = scores.topk(sp.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (keeps >= 1).
        drop = probs.cumsum(-1) - probs >= sp.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)
    if sp.min_p > 0.0:
        probs = probs.masked_fill(probs < sp.min_p * probs.max(), 0.0)
    return probs
