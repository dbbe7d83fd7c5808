"""The engine in a child process (cluster.engine_process): the same outputs as the
engine in process, bad input refused, an abort frees the blocks, a dead core fails its
streams; the delta encoding round-trips."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.async_engine import EngineDeadError
from cluster.engine_process import EngineProcess, _Built, _Sent, attach, decode, encode
from engine import LLM
from engine.llm_engine import EngineArgs
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

MAX_LEN = 256


@pytest.fixture(scope="module")
def tiny(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama3"]


class Harness:
    """The engine in a child process (``process``: ``EngineProcess``) or on a thread of
    this one (``in-process``: ``AsyncEngine``), and one event loop for its callers
    (``run`` runs a coroutine there) across a test's calls."""

    def __init__(self, args: EngineArgs, mode: str) -> None:
        from cluster.async_engine import AsyncEngine

        self.loop = asyncio.new_event_loop()
        self.engine: Any = AsyncEngine(args) if mode == "in-process" else EngineProcess(args)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.close()


@pytest.fixture(scope="module")
def harness(tiny: Path) -> Any:
    h = Harness(EngineArgs(model=str(tiny), device="cpu", max_model_len=MAX_LEN), "process")
    yield h
    h.close()


async def _settled(engine: Any, since: float = 0.0) -> dict[str, Any]:
    """The engine's figures once nothing runs or waits (newer than ``since``, wall
    time), polled where its messages are read."""
    deadline = time.monotonic() + 10
    while True:
        s: dict[str, Any] = engine.stats()
        if s["time"] >= since and s["running"] == 0 and s["waiting"] == 0:
            return s
        assert time.monotonic() < deadline, s
        await asyncio.sleep(0.1)


def _key(out: RequestOutput) -> list[tuple[Any, ...]]:
    return [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs,
             c.cumulative_logprob) for c in out.outputs]  # fmt: skip


def _same(got: RequestOutput, ref: RequestOutput) -> None:
    """Equal samples; logprobs to float tolerance (a batch of other shapes runs them)."""
    assert len(got.outputs) == len(ref.outputs)
    for g, r in zip(got.outputs, ref.outputs, strict=True):
        assert (g.index, g.text, g.token_ids, g.finish_reason, g.stop_reason) == (
            r.index, r.text, r.token_ids, r.finish_reason, r.stop_reason)  # fmt: skip
        assert (g.logprobs is None) == (r.logprobs is None)
        for gl, rl in zip(g.logprobs or [], r.logprobs or [], strict=True):
            assert gl.keys() == rl.keys()
            assert all(abs(gl[k] - rl[k]) < 1e-4 for k in gl), (gl, rl)
        if r.cumulative_logprob is None:
            assert g.cumulative_logprob is None
        else:
            assert g.cumulative_logprob == pytest.approx(r.cumulative_logprob, abs=1e-3)


async def _run(engine: EngineProcess, prompt: str, params: SamplingParams) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params)]


def test_same_outputs_as_in_process(tiny: Path, harness: Harness) -> None:
    """Greedy, a stop string, seeded sampling with n = 2 and logprobs: the core's
    outputs, rebuilt from its deltas, equal the in-process engine's; each stream's
    outputs grow and end with the one finished output."""
    llm = LLM(tiny, device="cpu", max_model_len=MAX_LEN)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = llm.generate(["w1 w2 w3", "w7 w8"], greedy)
    stop = base[0].outputs[0].text.split()[3]  # a word the greedy text reaches
    cases = [
        ("w1 w2 w3", greedy),
        ("w7 w8", greedy),
        ("w1 w2 w3", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,))),
        ("w5 w6 w4", SamplingParams(temperature=0.9, top_p=0.9, max_tokens=20, n=2, seed=7,
                                    logprobs=2, ignore_eos=True)),
    ]  # fmt: skip
    refs = [llm.generate([p], sp)[0] for p, sp in cases]

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(_run(harness.engine, p, sp) for p, sp in cases))

    streams = harness.run(main())
    for ref, outs in zip(refs, streams, strict=True):
        last = outs[-1]
        assert last.finished and not any(o.finished for o in outs[:-1])
        _same(last, ref)
        assert last.prompt_token_ids == ref.prompt_token_ids
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and lengths[0] >= 1
    assert refs[2].outputs[0].finish_reason == "stop"  # the stop string matched


def test_bad_input_and_abort_free_blocks(harness: Harness) -> None:
    """A prompt over the context, or a request id in use, raises ValueError (the
    core's message) and disturbs no other stream; a stream left early aborts its
    request in the core (it stops stepping it, and every block is back in the pool)
    and leaves nothing behind in the replica's tables."""
    proc = harness.engine
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main() -> tuple[int, dict[str, Any]]:
        good = asyncio.ensure_future(
            _run(proc, "w1 w2", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        )
        with pytest.raises(ValueError, match=f"max_model_len is {MAX_LEN}"):
            await _run(proc, "w1 " * (MAX_LEN + 10), SamplingParams(max_tokens=4))
        assert (await good)[-1].finished

        gen = proc.generate("w3 " * 40, long, "taken")
        seen = 0
        async for out in gen:
            seen += 1
            assert not out.finished
            if seen == 1:
                dup = proc.generate("w4", SamplingParams(max_tokens=2), "taken")
                with pytest.raises(ValueError, match="already in use"):
                    await anext(dup)
            if seen == 3:
                break
        await gen.aclose()
        return int(proc.stats()["steps"]), await _settled(proc)

    left_at, s = harness.run(main())
    assert s["free_blocks"] == s["num_blocks"] > 0
    assert s["steps"] - left_at < 100, (left_at, s)  # not run on to its 200 tokens
    assert not proc._streams and not proc._adds and not proc._built
    proc.check_health()


@pytest.mark.parametrize("mode", ["in-process", "process"])
def test_cancel_while_admitting(tiny: Path, mode: str) -> None:
    """A caller cancelled while its request is being admitted (before any output):
    the engine aborts the request rather than run it to ``max_tokens`` (both engines:
    on a thread, in a process)."""
    h = Harness(EngineArgs(model=str(tiny), device="cpu", max_model_len=MAX_LEN), mode)
    engine = h.engine
    params = SamplingParams(temperature=0, max_tokens=MAX_LEN - 8, ignore_eos=True)

    async def main() -> dict[str, Any]:
        task = asyncio.ensure_future(anext(engine.generate("w1 w2", params)))
        await asyncio.sleep(0)  # the add is sent; its answer cannot run before the cancel
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Long enough for the request to run all its 248 steps had it not been aborted
        # (a step of the tiny model takes milliseconds); then figures newer than that.
        await asyncio.sleep(2.5)
        return await _settled(engine, time.time())

    try:
        s = h.run(main())
        assert s["free_blocks"] == s["num_blocks"], s
        assert s["steps"] < 60, s  # aborted early, not stepped to its 248 tokens
    finally:
        h.close()


def test_attached_links_share_the_core(tiny: Path) -> None:
    """API processes' links (``attach``) beside the replica's own: each caller gets its
    own requests' outputs, equal to offline ones, all run in one core; a wrong key is
    refused, and neither it nor a peer that connects and says nothing, or hangs up
    mid-handshake, keeps the core from taking the next; a link closed mid-stream has its
    request aborted there (its blocks back, not stepped on to its 200 tokens) while the
    other links' streams run on; a link that sends what the core cannot read is
    dropped alone."""
    import socket
    from multiprocessing import AuthenticationError

    llm = LLM(tiny, device="cpu", max_model_len=MAX_LEN)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["w1 w2 w3", "w7 w8", "w5 w6 w4"]
    refs = llm.generate(prompts, greedy)
    loop = asyncio.new_event_loop()
    proc = EngineProcess(EngineArgs(model=str(tiny), device="cpu", max_model_len=MAX_LEN),
                         listen="127.0.0.1")  # fmt: skip
    links = []
    try:
        assert proc.address is not None and proc.address[0] == "127.0.0.1"
        with pytest.raises(AuthenticationError):
            attach(proc.address, b"not the key", timeout_s=5)
        silent = socket.create_connection(proc.address)  # holds its handshake open
        socket.create_connection(proc.address).close()  # gone mid-handshake
        links = [attach(proc.address, proc.authkey, timeout_s=5) for _ in range(3)]
        silent.close()
        with links[2]._send_lock:
            links[2]._cmd.send_bytes(b"not a pickle")  # the core drops this link alone
        deadline = time.monotonic() + 10
        while not links[2].is_dead:
            assert time.monotonic() < deadline, "the core kept a client it cannot read"
            time.sleep(0.05)
        links = links[:2]
        callers = [proc, *links]
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

        async def left_early() -> int:
            seen = 0
            async for _ in links[1].generate("w3 " * 40, long):
                seen += 1
                if seen == 3:
                    links[1].shutdown()  # its connection closes: the core aborts it
                    break
            return int(proc.stats()["steps"])

        async def main() -> tuple[list[list[RequestOutput]], int, dict[str, Any]]:
            outs = await asyncio.gather(
                *(_run(c, p, greedy) for c, p in zip(callers, prompts, strict=True))
            )
            other = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
            left_at, tail = await asyncio.gather(left_early(), _run(links[0], "w2 w4", other))
            assert tail[-1].finished and len(tail[-1].outputs[0].token_ids) == 40
            return list(outs), left_at, await _settled(proc)

        outs, left_at, s = loop.run_until_complete(main())
        for ref, stream in zip(refs, outs, strict=True):
            _same(stream[-1], ref)
        assert s["free_blocks"] == s["num_blocks"] > 0
        assert s["steps"] - left_at < 100, (left_at, s)  # not run on to its 200 tokens
        assert not links[0]._streams and not links[0]._adds and not proc._streams
        proc.check_health()
        links[0].check_health()
    finally:
        for link in links:
            link.shutdown()
        proc.shutdown()
        loop.close()


def test_dead_core_fails_streams(tiny: Path) -> None:
    """The core killed mid-stream: the open stream raises EngineDeadError, health
    fails, and new requests are refused with it."""
    h = Harness(EngineArgs(model=str(tiny), device="cpu", max_model_len=MAX_LEN), "process")
    engine = h.engine
    params = SamplingParams(temperature=0, max_tokens=MAX_LEN - 8, ignore_eos=True)

    async def main() -> None:
        gen = engine.generate("w1", params)
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                engine._proc.kill()
        with pytest.raises(EngineDeadError):
            await _run(engine, "w2", params)

    try:
        h.run(main())
        with pytest.raises(EngineDeadError):
            engine.check_health()
        assert engine.stats()["dead"]
    finally:
        h.close()


_texts = st.text(alphabet="ab c", max_size=6)
_step = st.tuples(st.lists(st.integers(0, 9), max_size=3), _texts, st.integers(0, 3))


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(st.tuples(st.lists(st.lists(_step, min_size=1, max_size=6),
                                            min_size=1, max_size=2), st.booleans()),
                         min_size=1, max_size=2))  # fmt: skip
def test_delta_round_trip(
    requests: list[tuple[list[list[tuple[list[int], str, int]]], bool]],
) -> None:
    """Cumulative outputs of interleaved requests (n = 1 or 2 samples; tokens and
    logprobs, or no logprobs, append; the visible text grows and may change before its
    end) survive encode → decode unchanged, step by step; finished requests leave
    nothing behind on either side."""
    sent: dict[str, list[_Sent]] = {}
    built: dict[str, _Built] = {}
    state = {f"r{j}": [([], [], "") for _ in samples] for j, (samples, _) in enumerate(requests)}
    length = max(len(steps) for samples, _ in requests for steps in samples)
    for i in range(length):
        for j, (samples, with_lp) in enumerate(requests):
            rid = f"r{j}"
            if rid not in state:
                continue
            outs = []
            for k, steps in enumerate(samples):
                tokens, lps, text = state[rid][k]
                if i < len(steps):
                    new, tail, keep_back = steps[i]
                    tokens, lps = tokens + new, lps + [{t: -0.5} for t in new]
                    text = text[: max(0, len(text) - keep_back)] + tail
                    state[rid][k] = (tokens, lps, text)
                done = i >= len(steps) - 1
                outs.append(CompletionOutput(k, text, list(tokens), "length" if done else None,
                                             None, -1.0 if with_lp else None,
                                             list(lps) if with_lp else None))  # fmt: skip
            finished = all(o.finished for o in outs)
            out = RequestOutput(rid, "p", [1, j], outs, finished, 1, {"arrival": 1.0})
            got = decode(encode(out, sent), built)
            assert _key(got) == _key(out) and got.finished == finished
            assert got.prompt_token_ids == [1, j] and got.prompt == "p"
            if finished:
                del state[rid]
    assert not state and not sent and not built
