"""One engine instance in a child process: the step loop alone with its interpreter.

``EngineProcess`` offers a colocated replica what ``AsyncEngine`` offers (``generate``,
``abort``, ``stats``, ``check_health``, ``shutdown``, and ``engine``: the tokenizer and
the figures the API needs), but the ``LLMEngine`` and its step loop run in a child
process (``cluster.engine_core``, started by the replica). The replica's process keeps
the API: HTTP, gRPC, SSE events, metrics. Each process has its own GIL, so the
per-token work of many streams no longer delays the next step (vLLM V1 splits its API
server and engine core the same way). ``attach`` links further API processes to the
same core (``EngineProcess(listen=...)``; ``ServeConfig.ingress = "api"``): each is an
``EngineLink`` of its own, as the replica's ``EngineProcess`` is.

Protocol, pickled messages (``multiprocessing.connection``; the replica's two pipes, or
one TCP connection per attached process):

- client → core: ``("add", rid, prompt, params, resume)``, ``("abort", rid)``,
  ``("stop",)`` (the replica's only).
- core → client: ``("ready", info)`` once loaded or attached (or ``("failed",
  message)``); ``("added", rid, error)`` for each add (``error``: the ``ValueError`` of
  bad input, or None); ``("out", deltas, stats, hashes, sent_at)`` after each step that
  advanced one of the client's requests, and about once a second while it has none
  (``deltas`` empty; ``sent_at``: the core's ``time.monotonic()`` as it sends);
  ``("dead", message)`` when a step raised.

A step's outputs travel as deltas: per request and sample, the token ids, text and
logprobs added since the last message (``_Sent`` keeps what each side has), so a
message's size does not grow with the outputs' length. The client rebuilds the
cumulative ``RequestOutput`` that ``AsyncEngine`` would have handed out.

The core stops when the replica says so or its pipe closes (the replica's process
died). If the core dies, every open stream raises ``EngineDeadError`` and
``check_health`` fails (Serve replaces the replica). TP = 1 and the colocated role
only: a worker group's rank actors (TP > 1) and the KV transfer of the disaggregated
pools need the engine in the replica's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cluster.async_engine import (
    EngineDeadError,
    _set_exception,
    _set_result,
    _Stream,
    consume,
    hand_over,
    post,
)
from engine.llm_engine import EngineArgs, render_chat, tokenize
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading a model (GGUF dequantization, a large checkpoint)


@dataclass(slots=True)
class _SampleDelta:
    """What one sample gained since the last message (``text_cut``: the receiver keeps
    that much of its text before appending ``text``; it is the whole length unless the
    visible text changed before its end)."""

    index: int
    token_ids: list[int]
    text_cut: int
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None


@dataclass(slots=True)
class _Delta:
    request_id: str
    finished: bool
    num_cached_tokens: int
    metrics: dict[str, float]
    samples: list[_SampleDelta]
    prompt: str | None = None  # the first message of a request only
    prompt_token_ids: list[int] = field(default_factory=list)  # likewise


@dataclass(slots=True)
class _Sent:
    """Per sample: tokens, text and logprobs one side holds of a request."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] | None = None


def encode(out: RequestOutput, sent: dict[str, list[_Sent]]) -> _Delta:
    """``out`` as the delta from what ``sent`` holds of it (which it updates)."""
    have = sent.get(out.request_id)
    first = have is None
    if have is None:
        have = sent[out.request_id] = [_Sent() for _ in out.outputs]
    samples = []
    for c, h in zip(out.outputs, have, strict=True):
        ntok, nlp = len(h.tokens), len(h.logprobs or ())
        cut = len(h.text) if c.text.startswith(h.text) else 0
        samples.append(_SampleDelta(c.index, c.token_ids[ntok:], cut, c.text[cut:],
                                    c.finish_reason, c.stop_reason, c.cumulative_logprob,
                                    None if c.logprobs is None else c.logprobs[nlp:]))  # fmt: skip
        h.tokens, h.text, h.logprobs = c.token_ids, c.text, c.logprobs
    if out.finished:
        del sent[out.request_id]
    return _Delta(out.request_id, out.finished, out.num_cached_tokens, out.metrics, samples,
                  out.prompt if first else None, out.prompt_token_ids if first else [])  # fmt: skip


@dataclass(slots=True)
class _Built:
    """The receiver's cumulative view of one request."""

    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sent]
    stamps: dict[str, float] | None = None  # when its first tokens were sent and read


def decode(d: _Delta, built: dict[str, _Built]) -> RequestOutput:
    """The cumulative ``RequestOutput`` after delta ``d`` (``built``: what came before)."""
    b = built.get(d.request_id)
    if b is None:
        b = built[d.request_id] = _Built(d.prompt, d.prompt_token_ids,
                                         [_Sent(logprobs=[]) for _ in d.samples])  # fmt: skip
    outs = []
    for s, h in zip(d.samples, b.samples, strict=True):
        h.tokens.extend(s.token_ids)
        h.text = h.text[: s.text_cut] + s.text
        if s.logprobs is not None and h.logprobs is not None:
            h.logprobs.extend(s.logprobs)
        outs.append(CompletionOutput(s.index, h.text, list(h.tokens), s.finish_reason,
                                     s.stop_reason, s.cumulative_logprob,
                                     None if s.logprobs is None else list(h.logprobs or ())))  # fmt: skip
    if d.finished:
        del built[d.request_id]
    return RequestOutput(d.request_id, b.prompt, b.prompt_token_ids, outs, d.finished,
                         d.num_cached_tokens, d.metrics)  # fmt: skip


# --- the replica's side ------------------------------------------------------------------
class EngineView:
    """What the API reads of the engine (``AsyncEngine.engine``'s attributes it uses):
    the tokenizer, loaded in this process too, and the core's figures."""

    def __init__(self, args: EngineArgs, info: dict[str, Any], owner: EngineLink) -> None:
        from transformers import AutoTokenizer

        self.args = args
        self.model_dir = Path(info["model_dir"])
        self.prefix_key: bytes = info["prefix_key"]
        self.scheduler_config = info["scheduler_config"]
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.model_dir)
        self.executor = None  # no worker group: the core runs the model itself
        self._owner = owner

    def tokenize(self, prompt: str) -> list[int]:
        return tokenize(self.tokenizer, prompt)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        return render_chat(self.tokenizer, messages)

    def prefix_hashes(self, limit: int) -> list[bytes]:
        """The newest prefix-cache hashes of the core's last report (≤ 1 s old)."""
        return self._owner.hashes[-limit:] if limit > 0 else []


class EngineLink:
    """A client of an engine core (``cluster.engine_core``) over its two connections
    (``cmd``: commands to the core; ``out``: its messages; one duplex connection for an
    attached API process). One lock (``_lock``) guards the request tables (``_adds``:
    sent, not yet answered; ``_streams``: admitted; ``_built``: their outputs so far)
    and ``_dead``, so that a caller leaving, the reader thread and a failure see each
    request in exactly one state.

    A thread of this process reads the core's messages: it unpickles and rebuilds a
    step's outputs while the event loop runs the streams. (Reading them on the event
    loop itself, ``add_reader``, made the loop's turns longer: at 64 streams on the GPU,
    median TTFT was 2-12 ms worse in each of three same-call runs.)"""

    def __init__(self, cmd: Connection, out: Connection, info: dict[str, Any],
                 id_prefix: str = "req", attached: bool = False) -> None:  # fmt: skip
        """``info``: the core's ``ready`` payload, read already. ``attached``: a TCP link
        of an API process (``attach``), which dies after ``LINK_SILENCE_S`` without a
        message (a core whose host went away sends no end-of-file)."""
        self._cmd, self._out = cmd, out
        self._silence_s = LINK_SILENCE_S if attached else None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._adds: dict[str, tuple[_Stream, asyncio.Future[str]]] = {}
        self._built: dict[str, _Built] = {}
        self._dead: EngineDeadError | None = None
        self._ids = itertools.count(1)
        self._id_prefix = id_prefix
        self._closing = False  # shutdown() asked: the core's exit is no failure
        self.hashes: list[bytes] = []
        self._stats: dict[str, Any] = info["stats"]
        self.address: tuple[str, int] | None = info.get("address")  # the core's listener
        self.engine = EngineView(info["args"], info, self)
        # No short GIL switch interval here (``KVSERVE_GIL_SWITCH_INTERVAL_S`` is for a
        # step thread): the GPU calls that had one here served TTFT p50 at 50-55 ms at 64
        # streams, the call without it 34 ms (docs/serving.md; not yet measured apart
        # from the first-output ordering that came with it).
        threading.Thread(target=self._read, name="kvserve-engine-pipe", daemon=True).start()

    def new_request_id(self, prefix: str = "") -> str:
        return f"{prefix or self._id_prefix}-{next(self._ids)}"

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        resume: Sequence[int] = (),
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """As ``AsyncEngine.generate``: cumulative outputs, the last one finished;
        ``ValueError`` for bad input (an id in use too); leaving early aborts it."""
        loop = asyncio.get_running_loop()
        rid = request_id or self.new_request_id()
        stream = _Stream(loop, asyncio.Queue())
        added: asyncio.Future[str] = loop.create_future()
        with self._lock:
            if self._dead is not None:
                raise self._dead
            if rid in self._adds or rid in self._streams:
                raise ValueError(f"request_id {rid!r} is already in use")
            self._adds[rid] = (stream, added)
        try:
            self._send(("add", rid, prompt, params, tuple(resume)))
        except OSError:
            with self._lock:
                self._adds.pop(rid, None)
            self.check_health()
            raise
        try:
            await added
        except asyncio.CancelledError:  # left before the core answered: drop it there too
            self.abort(rid)
            raise
        async for item in consume(stream.queue, lambda: self.abort(rid)):
            yield item

    def abort(self, request_id: str) -> None:
        """Forgets the request here and has the core abort it (a no-op there for one it
        does not run: finished, refused, or never added)."""
        with self._lock:
            self._adds.pop(request_id, None)
            self._streams.pop(request_id, None)
            self._built.pop(request_id, None)
            if self._dead is not None:
                return
        with contextlib.suppress(OSError):  # the core is gone: nothing runs there
            self._send(("abort", request_id))

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def check_health(self) -> None:
        """Raises ``EngineDeadError`` once the core failed, exited or closed the link."""
        if self._dead is not None:
            raise self._dead

    def stats(self) -> dict[str, Any]:
        """The core's figures as of its last message (each step, or ≤ 1 s when idle)."""
        return {**self._stats, "dead": self._dead is not None}

    def shutdown(self) -> None:
        """Leaves the core: it aborts this link's requests (the core runs on for its
        other clients). The reader thread wakes at the hang-up, fails what is still
        open here and closes the connection."""
        self._closing = True
        hang_up(self._cmd)

    # --- the pipe's reader thread -------------------------------------------------------
    def _send(self, msg: tuple[Any, ...]) -> None:
        """Writes one command; blocks while the pipe is full (the core drains it
        between steps, so at most about a step)."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self._cmd.send_bytes(data)

    def _read(self) -> None:
        try:
            while True:
                if self._silence_s is not None and not self._out.poll(self._silence_s):
                    self._broken()
                    self._die(f"no message from the engine core in {self._silence_s:.0f} s")
                    return
                msg = self._out.recv()
                kind = msg[0]
                if kind == "out":
                    _, deltas, self._stats, hashes, sent_at = msg
                    if hashes is not None:
                        self.hashes = hashes
                    self._publish(deltas, sent_at, time.monotonic())
                elif kind == "added":
                    self._admitted(msg[1], msg[2])
                elif kind == "dead":
                    self._die(msg[1])
                    return
        except (EOFError, OSError):
            self._die(self._gone())
        except BaseException as e:  # a message this side cannot take: no silent hang
            logger.exception("engine core link failed")
            self._broken()
            self._die(f"{type(e).__name__}: {e}")
        finally:
            self._out.close()

    def _gone(self) -> str:
        """Why the core's messages ended (read end-of-file)."""
        return "the engine core closed the connection"

    def _broken(self) -> None:
        """A message this side cannot take, or none came: the link is unusable."""
        hang_up(self._cmd)

    def _admitted(self, rid: str, err: BaseException | None) -> None:
        with self._lock:
            entry = self._adds.pop(rid, None)
            if entry is None:  # its caller left meanwhile (and sent an abort)
                return
            stream, fut = entry
            if err is None:
                self._streams[rid] = stream
        if err is None:
            post(stream.loop, _set_result, fut, rid)
        else:
            post(stream.loop, _set_exception, fut, err)

    def _publish(self, deltas: list[_Delta], sent_at: float, read_at: float) -> None:
        """A message's outputs to their streams (``hand_over``). An output carrying a
        request's first tokens goes first: its stream's task wakes before the others,
        so its first token is not sent after a step's worth of other streams' events.
        Its ``metrics``, and those of the request's later outputs (a stream that reads
        late sees only the newest), gain ``core_sent`` and ``pipe_read``
        (``time.monotonic()`` of that message's send and of its read here: the
        replica's ``timing_ms`` splits them)."""
        firsts: list[tuple[_Stream, Any]] = []
        rest: list[tuple[_Stream, Any]] = []
        with self._lock:
            for d in deltas:
                stream = self._streams.get(d.request_id)
                if stream is None:  # aborted here: the core drops it with the abort
                    self._built.pop(d.request_id, None)
                    continue
                had = self._built.get(d.request_id)
                stamps = had.stamps if had is not None else None  # set at the first tokens
                first = stamps is None and any(s.token_ids for s in d.samples)
                if first:  # (a prompt's first chunks may come before any token)
                    stamps = {"core_sent": sent_at, "pipe_read": read_at}
                out = decode(d, self._built)
                if stamps is not None:  # on every later output too: a reader behind
                    out.metrics.update(stamps)  # takes only the newest
                    if first and (b := self._built.get(d.request_id)) is not None:
                        b.stamps = stamps  # (gone with a finished request's entry)
                if d.finished:
                    del self._streams[d.request_id]
                (firsts if first else rest).append((stream, out))
        hand_over(firsts + rest)

    def _die(self, message: str) -> None:
        with self._lock:
            if self._dead is not None:
                return
            self._dead = EngineDeadError(f"engine failed: {message}")
            streams = list(self._streams.values())
            adds = list(self._adds.values())
            self._streams.clear()
            self._adds.clear()
            self._built.clear()
        log = logger.info if self._closing else logger.error
        log("engine process failed; the instance is dead: %s", message)
        for stream in streams:
            post(stream.loop, stream.queue.put_nowait, self._dead)
        for stream, fut in adds:
            post(stream.loop, _set_exception, fut, self._dead)


class EngineProcess(EngineLink):
    """The replica's side: starts the core as its child process and is its primary
    client (``cluster.engine_core``)."""

    def __init__(self, args: EngineArgs, start_timeout_s: float = START_TIMEOUT_S,
                 listen: str | None = None) -> None:  # fmt: skip
        """Starts the core and waits until its engine is loaded; ``RuntimeError`` with
        its message if it fails to load, ``ValueError`` for TP > 1 or a Ray executor.
        ``listen``: a host the core also takes API processes on (``attach``; a random
        port, ``address``, and a random ``authkey``)."""
        if args.tensor_parallel_size != 1 or args.distributed_executor_backend == "ray":
            raise ValueError("an engine process runs TP = 1 on its own device only (rank "
                             "actors need the replica's process)")  # fmt: skip
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.engine_core", str(cmd_r), str(out_w)],
            pass_fds=(cmd_r, out_w), env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(cmd_r)
        os.close(out_w)
        cmd = Connection(cmd_w, readable=False)
        out = Connection(out_r, writable=False)
        self.authkey = os.urandom(32)
        try:
            start = ("args", args) if listen is None else ("args", args, (listen, self.authkey))
            cmd.send(start)
            if not out.poll(start_timeout_s):
                raise RuntimeError(f"the engine process did not load in {start_timeout_s:.0f} s")
            try:
                kind, payload = out.recv()
            except EOFError:
                kind, payload = "failed", f"it exited with {self._proc.wait()}"
            if kind != "ready":
                raise RuntimeError(f"the engine process failed to load: {payload}")
        except BaseException:
            self._proc.kill()
            self._proc.wait()
            cmd.close()
            out.close()
            raise
        super().__init__(cmd, out, payload)

    def check_health(self) -> None:
        """Raises ``EngineDeadError`` once the core failed or exited."""
        if self._dead is None and self._proc.poll() is not None:
            self._die(f"the engine process exited with {self._proc.returncode}")
        super().check_health()

    def shutdown(self) -> None:
        """Stops the core (its attached API processes see their links close)."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._send(("stop",))
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._cmd.close()

    def _gone(self) -> str:
        self._proc.wait()
        return f"the engine process exited with {self._proc.returncode}"

    def _broken(self) -> None:
        self._proc.kill()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()


HANDSHAKE_TIMEOUT_S = 10.0  # an attaching peer's connect and key challenge, at most
LINK_SILENCE_S = 30.0  # an attached link dies after this long without a message (the
# core sends each client one at least every second, and after every step of its requests)


@contextlib.contextmanager
def _socket_of(conn: Connection) -> Iterator[socket.socket]:
    """The socket under a link's connection (a duplicate of its descriptor: closing it
    leaves the connection's own open)."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        yield sock
    finally:
        sock.close()


def tune_socket(conn: Connection, timeout_s: float) -> None:
    """A new link's TCP options: ``TCP_NODELAY``, because ``Connection.send`` writes a
    message over 16 KiB as two writes (length, then payload) and the payload would wait
    for the peer's delayed acknowledgement of the length (on one H200 with 64 streams
    that held a step's message 19-29 ms at the median, against 2 ms on a pipe);
    keepalive; and ``timeout_s`` on blocking reads and writes (``io_timeout``)."""
    with _socket_of(conn) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    io_timeout(conn, timeout_s)


def io_timeout(conn: Connection, timeout_s: float) -> None:
    """Every blocking read and write of the link fails with ``OSError`` after
    ``timeout_s`` (0: never): the key challenge; a peer that stopped reading."""
    sec = int(timeout_s)
    tv = struct.pack("ll", sec, int((timeout_s - sec) * 1e6))
    with _socket_of(conn) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def hang_up(conn: Connection) -> None:
    """Shuts a link's socket down both ways: the peer reads end-of-file, and a thread of
    this process blocked reading it wakes (closing the descriptor would do neither)."""
    with contextlib.suppress(OSError), _socket_of(conn) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def attach(address: tuple[str, int], authkey: bytes, timeout_s: float = 30.0,
           id_prefix: str = "") -> EngineLink:  # fmt: skip
    """A link to the engine core listening at ``address`` (``EngineProcess(listen=)``):
    an API process's own client of it, on one duplex connection. Its requests are its
    own (ids prefixed ``id_prefix``, by default a random one, so that they differ from
    every other client's); closing it (``shutdown``, or this process dying) aborts them
    in the core. ``ConnectionError`` (an ``OSError``) if the core cannot be reached or
    does not answer in ``timeout_s``; ``multiprocessing.AuthenticationError`` for a
    wrong key."""
    from multiprocessing.connection import answer_challenge, deliver_challenge

    sock = socket.create_connection((str(address[0]), int(address[1])), timeout=timeout_s)
    sock.setblocking(True)  # Connection reads and writes the descriptor itself
    conn = Connection(sock.detach())
    try:
        tune_socket(conn, min(timeout_s, HANDSHAKE_TIMEOUT_S))
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
        if not conn.poll(timeout_s):
            raise ConnectionError(f"the engine core at {address} did not answer in {timeout_s} s")
        kind, payload = conn.recv()
        if kind != "ready":
            raise ConnectionError(f"the engine core at {address} answered {kind!r}: {payload}")
        io_timeout(conn, 0)  # none from here: the reader waits on poll()
    except BaseException:
        conn.close()
        raise
    return EngineLink(conn, conn, payload, id_prefix or f"api{os.urandom(4).hex()}", True)
