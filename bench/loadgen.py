"""Load against an OpenAI-compatible server (``python -m bench.loadgen``) or an in-process
engine.

Each request streams ``/v1/completions`` and records when it was sent, when each
chunk arrived and how many tokens it carried. ``summarize`` turns the records into
TTFT / ITL / end-to-end percentiles and throughput; ``plot`` draws them (PNG).
Concurrency mode keeps ``concurrency`` requests in flight; rate mode sends a Poisson
stream at ``rate`` requests per second.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Record:
    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens)
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # from the usage chunk; chunks may carry several tokens
    text: str = ""  # the streamed text, joined
    done: bool = False  # the stream ended as it should (``[DONE]`` / a finished response)
    prompt: str = ""
    timing_ms: dict[str, float] = field(default_factory=dict)  # kvserve's first-token split
    body_sent: float | None = None  # when the client wrote the request's body

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None

    @property
    def tokens(self) -> int:
        return self.completion_tokens or sum(n for _, n in self.chunks)

    def itls(self) -> list[float]:
        """Gaps between chunks per token: a chunk of k tokens after a gap g counts k
        gaps of g/k (when the server reports only the total, tokens are spread evenly
        over the chunks after the first)."""
        counted = sum(n for _, n in self.chunks)
        scale = 1.0
        if self.completion_tokens and len(self.chunks) > 1:
            scale = max(self.completion_tokens - self.chunks[0][1], 1) / max(
                counted - self.chunks[0][1], 1
            )
        out = []
        for (t0, _), (t1, n) in zip(self.chunks, self.chunks[1:], strict=False):
            k = max(round(n * scale), 1)
            out.extend([(t1 - t0) / k] * k)
        return out


def prompts(n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts of about ``length`` words (no shared prefix)."""
    rng = random.Random(seed)
    words = ["river", "stone", "cloud", "lamp", "orbit", "garden", "signal", "copper", "winter", "market", "lantern", "harbor", "violet", "engine", "meadow", "falcon", "quartz", "ember"]  # fmt: skip
    return [f"{i}: " + " ".join(rng.choice(words) for _ in range(length)) for i in range(n)]


async def _http_one(session: Any, url: str, model: str, prompt: str, max_tokens: int,
                    headers: dict[str, str]) -> Record:  # fmt: skip
    rec = Record(sent=time.perf_counter(), prompt=prompt)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers,
                                trace_request_ctx=rec) as r:  # fmt: skip
            if r.status != 200:
                rec.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return rec
            async for raw in r.content:  # one SSE line at a time
                line = raw.decode().rstrip("\r\n")
                if line == "data: [DONE]":
                    rec.done = True
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in chunk:
                    rec.error = f"in-band: {chunk['error']['message'][:200]}"
                if chunk.get("usage"):
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    rec.completion_tokens = chunk["usage"]["completion_tokens"]
                    rec.timing_ms = dict((chunk.get("kvserve") or {}).get("timing_ms") or {})
                for c in chunk.get("choices", []):
                    if c.get("text"):
                        rec.chunks.append((now, 1))
                        rec.text += c["text"]
        if not rec.done and rec.error is None:
            rec.error = "the stream ended without [DONE]"
    except Exception as e:  # recorded, the run goes on
        rec.error = f"{type(e).__name__}: {e}"
    _split_outside(rec)
    return rec


def _split_outside(rec: Record) -> None:
    """The server's arrival stamp (``replica_received_at``: ms on its host's monotonic
    clock, which is ``perf_counter``'s here) as durations: ``client_to_replica`` from
    sending to the replica's API taking the request, ``replica_to_client`` from the
    first delta leaving the replica to its chunk here. Kept only if both come out
    within the TTFT (another host's clock does not)."""
    at = rec.timing_ms.pop("replica_received_at", None)
    first = rec.timing_ms.get("replica_first_delta")
    if at is None or first is None or not rec.chunks:
        return
    ttft = (rec.chunks[0][0] - rec.sent) * 1e3
    into = at - rec.sent * 1e3
    out = ttft - into - first
    if 0 <= into <= ttft and 0 <= out <= ttft:
        rec.timing_ms.update(client_to_replica=round(into, 3), replica_to_client=round(out, 3))
        if rec.body_sent is not None:  # of client_to_replica: the client's own part
            rec.timing_ms["client_send"] = round((rec.body_sent - rec.sent) * 1e3, 3)


async def _body_sent(_session: Any, ctx: Any, _params: Any) -> None:
    """aiohttp's trace hook: the request's body is written (``ctx``: its ``Record``)."""
    rec = ctx.trace_request_ctx
    if isinstance(rec, Record) and rec.body_sent is None:
        rec.body_sent = time.perf_counter()


async def _grpc_one(stub: Any, model: str, prompt: str, max_tokens: int,
                    metadata: tuple[tuple[str, str], ...]) -> Record:  # fmt: skip
    from protos import kvserve_pb2 as pb

    rec = Record(sent=time.perf_counter(), prompt=prompt)
    req = pb.GenerateRequest(model=model, text=prompt, sampling=pb.SamplingOptions(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))  # fmt: skip
    try:
        async for resp in stub.GenerateStream(req, metadata=metadata, timeout=600):
            now = time.perf_counter()
            for c in resp.choices:
                if c.token_ids:
                    rec.chunks.append((now, len(c.token_ids)))
                    rec.text += c.text
            if resp.finished:
                rec.done = True
                rec.prompt_tokens = resp.usage.prompt_tokens
                rec.completion_tokens = resp.usage.completion_tokens
        if not rec.done:
            rec.error = "the stream ended before a finished response"
    except Exception as e:  # recorded, the run goes on (grpc.aio.AioRpcError and others)
        rec.error = f"{type(e).__name__}: {str(e)[:300]}"
    return rec


async def grpc_load(target: str, model: str, prompt_list: list[str], max_tokens: int,
                    concurrency: int | None, rate: float | None, api_key: str | None = None,
                    progress: bool = True) -> tuple[list[Record], float]:  # fmt: skip
    """``http_load`` through the gRPC API (``GenerateStream``) at ``target`` (host:port)."""
    import grpc

    from protos import kvserve_pb2_grpc

    metadata: tuple[tuple[str, str], ...] = (("application", "kvserve"),)
    if api_key:
        metadata += (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = kvserve_pb2_grpc.KVServeStub(channel)
        return await run_load(lambda p: _grpc_one(stub, model, p, max_tokens, metadata),
                              prompt_list, concurrency, rate, progress)  # fmt: skip


async def run_load(one: Callable[[str], Awaitable[Record]], prompt_list: list[str],
                   concurrency: int | None, rate: float | None, progress: bool = True,
                   seed: int = 0) -> tuple[list[Record], float]:  # fmt: skip
    """Sends every prompt through ``one``; returns the records and the wall time."""
    from tqdm.asyncio import tqdm

    bar = tqdm(total=len(prompt_list), disable=not progress, desc="requests")
    records: list[Record] = []
    t0 = time.perf_counter()

    async def wrapped(p: str) -> None:
        records.append(await one(p))
        bar.update(1)

    if rate:
        rng = random.Random(seed)
        tasks = []
        for p in prompt_list:
            tasks.append(asyncio.create_task(wrapped(p)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    else:
        sem = asyncio.Semaphore(concurrency or 1)

        async def limited(p: str) -> None:
            async with sem:
                await wrapped(p)

        await asyncio.gather(*(limited(p) for p in prompt_list))
    bar.close()
    return records, time.perf_counter() - t0


async def http_load(url: str, model: str | None, prompt_list: list[str], max_tokens: int,
                    concurrency: int | None, rate: float | None, api_key: str | None = None,
                    progress: bool = True) -> tuple[list[Record], float]:  # fmt: skip
    """Streams every prompt through ``/v1/completions`` (aiohttp: its C parser keeps the
    client's own cost per chunk low, as in vLLM's serving benchmark)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=(concurrency or 256) + 8)
    timeout = aiohttp.ClientTimeout(total=600)
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(_body_sent)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     trace_configs=[trace]) as session:  # fmt: skip
        if model is None:
            async with session.get(f"{url}/v1/models", headers=headers) as r:
                model = (await r.json())["data"][0]["id"]
        name = model
        return await run_load(
            lambda p: _http_one(session, url, name, p, max_tokens, headers), prompt_list,
            concurrency, rate, progress,
        )  # fmt: skip


def _http_load_part(url: str, model: str | None, prompt_list: list[str], max_tokens: int,
                    concurrency: int, api_key: str | None, start_at: float) -> list[Record]:  # fmt: skip
    import aiohttp  # noqa: F401  (imported before the start, not inside the measured run)

    time.sleep(max(start_at - time.perf_counter(), 0.0))
    records, _ = asyncio.run(http_load(url, model, prompt_list, max_tokens, concurrency, None,
                                       api_key, progress=False))  # fmt: skip
    return records


def http_load_procs(url: str, model: str | None, prompt_list: list[str], max_tokens: int,
                    concurrency: int, procs: int, api_key: str | None = None,
                    ) -> tuple[list[Record], float]:  # fmt: skip
    """``http_load`` (concurrency mode) from ``procs`` client processes, each with an
    equal share of the prompts and of the concurrency, so that the client's own event
    loop (SSE parsing of every token) is not what a run measures. They start sending
    at one moment (after their imports). Times are
    ``perf_counter`` (CLOCK_MONOTONIC, one clock for every process of the host); the
    wall time runs from the first request sent to the last chunk received."""
    if procs <= 1:
        return asyncio.run(http_load(url, model, prompt_list, max_tokens, concurrency, None,
                                     api_key, progress=False))  # fmt: skip
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    share = max(concurrency // procs, 1)
    with ProcessPoolExecutor(max_workers=procs, mp_context=ctx) as pool:
        list(pool.map(time.sleep, [0.0] * procs))  # the processes are up
        start_at = time.perf_counter() + 2.0  # every process starts sending together
        parts = [pool.submit(_http_load_part, url, model, prompt_list[i::procs], max_tokens,
                             share, api_key, start_at) for i in range(procs)]  # fmt: skip
        records = [r for f in parts for r in f.result()]
    start = min(r.sent for r in records)
    end = max([r.chunks[-1][0] for r in records if r.chunks] or [start])
    return records, end - start


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def summarize(records: list[Record], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and r.chunks]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itls()]
    e2e = [r.chunks[-1][0] - r.sent for r in ok]
    tokens = sum(r.tokens for r in ok)
    out: dict[str, Any] = {"requests": len(records), "ok": len(ok),
                           "errors": [r.error for r in records if r.error][:5],
                           "wall_s": wall_s, "output_tokens": tokens,
                           "output_tok_s": tokens / wall_s if wall_s else float("nan")}  # fmt: skip
    for name, xs in (("ttft_s", ttft), ("itl_s", itl), ("e2e_s", e2e)):
        out[name] = {"p50": _pct(xs, 50), "p90": _pct(xs, 90), "p99": _pct(xs, 99),
                     "mean": statistics.fmean(xs) if xs else float("nan")}  # fmt: skip
    keys = sorted({k for r in ok for k in r.timing_ms})
    if keys:  # the server's split of the first token's time (kvserve's timing_ms)
        out["first_token_timing_ms"] = {
            k: {"p50": _pct(xs, 50), "p90": _pct(xs, 90)}
            for k in keys
            if (xs := [r.timing_ms[k] for r in ok if k in r.timing_ms])
        }
    return out


def plot(records: list[Record], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.error is None and r.chunks]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.hist([r.ttft for r in ok], bins=30)
    a.set_xlabel("time to first token (s)")
    a.set_ylabel("requests")
    itl = sorted(x * 1e3 for r in ok for x in r.itls())
    if itl:
        b.plot(itl, [i / len(itl) for i in range(len(itl))])
    b.set_xlabel("inter-token latency (ms)")
    b.set_ylabel("fraction of tokens")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def records_json(records: list[Record]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.loadgen --url ...``: loads a running server, prints TTFT / ITL
    percentiles, draws them (PNG); exit status 1 if a request failed."""
    import argparse
    import sys

    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(prog="python -m bench.loadgen",
                                 description="load a running server; TTFT/ITL percentiles "
                                 "and a plot")  # fmt: skip
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="default: the server's first model")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rate", type=float, default=None, help="requests/s (Poisson) instead")
    ap.add_argument("--prompt-words", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--plot", default="kvserve-bench.png", help="PNG path ('' for none)")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    console = Console()
    ps = prompts(args.requests, args.prompt_words)
    records, wall = asyncio.run(http_load(
        args.url.rstrip("/"), args.model, ps, args.max_tokens,
        None if args.rate else args.concurrency, args.rate, args.api_key,
    ))  # fmt: skip
    summary = summarize(records, wall)
    table = Table(title=f"{summary['ok']}/{summary['requests']} requests in {wall:.1f} s: "
                        f"{summary['output_tok_s']:.0f} output tok/s")  # fmt: skip
    table.add_column("latency")
    for q in ("p50", "p90", "p99"):
        table.add_column(q, justify="right")
    for name in ("ttft_s", "itl_s", "e2e_s"):
        table.add_row(
            name.removesuffix("_s"),
            *(f"{summary[name][q] * 1e3:.1f} ms" for q in ("p50", "p90", "p99")),
        )
    console.print(table)
    for err in summary["errors"]:
        console.print(f"[red]error:[/red] {err}")
    if args.plot:
        load = f"rate {args.rate}/s" if args.rate else f"concurrency {args.concurrency}"
        plot(records, Path(args.plot), f"{args.url}: {load}")
        console.print(f"[dim]plot: {args.plot}[/dim]")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary["ok"] == summary["requests"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
