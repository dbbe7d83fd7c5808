"""Diagnostics of an API process's event loop: where a request waits before the API
sees it, and what the loop runs while it is late. Off unless ``KVSERVE_TRACE_FRONT``
names a folder (a bench sets it; nothing here runs in a normal deployment).

- ``stamp_http_reads()``: uvicorn's httptools protocol stamps each request's scope with
  when its first bytes were parsed (``scope[HTTP_READ_KEY]``, ``time.monotonic()``), so
  ``timing_ms`` can split the client → API time at the HTTP server (``http_wait``: from
  that parse to the API's route). A patch of uvicorn's internals: a diagnostic only.
- ``StallSampler``: a thread that, whenever the loop's heartbeat (``beat()``, called by
  a timer on the loop) is older than ``STALL_S``, samples the loop thread's Python stack;
  the counts of the stacks seen go to ``<folder>/stalls-<pid>.json`` every few seconds.
  A stack seen often is what the loop ran while requests waited, or where it gave up
  the GIL and waited to take it back; the other threads' stacks, sampled at the same
  moments (``others``), show who else was running Python then.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

TRACE_DIR = os.environ.get("KVSERVE_TRACE_FRONT") or None
HTTP_READ_KEY = "kvserve.http_read_at"
STALL_S = 0.008  # a heartbeat older than this (the timer runs every 5 ms) is a stall
SAMPLE_EVERY_S = 0.001
WRITE_EVERY_S = 5.0
STACK_DEPTH = 12


def stamp_http_reads() -> bool:
    """Patches uvicorn's httptools protocol (once) so a request's scope records when its
    first bytes were parsed. False when tracing is off or uvicorn's layout differs."""
    if TRACE_DIR is None:
        return False
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return False
    if getattr(HttpToolsProtocol, "_kvserve_stamped", False):
        return True
    begin = HttpToolsProtocol.on_message_begin

    def on_message_begin(self: Any) -> None:
        begin(self)
        self.scope[HTTP_READ_KEY] = time.monotonic()

    HttpToolsProtocol.on_message_begin = on_message_begin  # type: ignore[method-assign]
    HttpToolsProtocol._kvserve_stamped = True  # type: ignore[attr-defined]
    return True


def _stack(frame: Any, depth: int = STACK_DEPTH) -> str:
    parts: list[str] = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        parts.append(f"{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})")
        frame = frame.f_back
    return " <- ".join(parts)


class StallSampler:
    """Samples the loop thread's stack while its heartbeat is late (see the module)."""

    def __init__(self, loop_thread: int) -> None:
        assert TRACE_DIR is not None
        self.loop_thread = loop_thread
        self.last_beat = time.monotonic()
        self.stacks: collections.Counter[str] = collections.Counter()
        self.others: collections.Counter[str] = collections.Counter()
        self.stalls = 0  # heartbeats late by more than STALL_S
        self.samples = 0
        self.path = Path(TRACE_DIR) / f"stalls-{os.getpid()}.json"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvserve-stall-sampler",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        in_stall = False
        written = time.monotonic()
        while not self._stop.wait(SAMPLE_EVERY_S):
            now = time.monotonic()
            if now - self.last_beat > STALL_S:
                if not in_stall:
                    self.stalls += 1
                    in_stall = True
                frames = sys._current_frames()
                frame = frames.pop(self.loop_thread, None)
                if frame is not None:
                    self.stacks[_stack(frame)] += 1
                    self.samples += 1
                    names = {t.ident: t.name for t in threading.enumerate()}
                    me = threading.get_ident()
                    for ident, f in frames.items():
                        if ident != me:
                            self.others[f"{names.get(ident, ident)}: {_stack(f, 4)}"] += 1
            else:
                in_stall = False
            if now - written > WRITE_EVERY_S:
                written = now
                self._write()

    def _write(self) -> None:
        data = {"pid": os.getpid(), "stalls": self.stalls, "samples": self.samples,
                "stall_s": STALL_S, "sample_every_s": SAMPLE_EVERY_S,
                "stacks": self.stacks.most_common(60),
                "others": self.others.most_common(40)}  # fmt: skip
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(data, indent=1))
        except OSError:
            pass
