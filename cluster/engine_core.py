"""The engine core: one ``LLMEngine`` and its step loop in a process of its own.

Started by its replica (``cluster.engine_process.EngineProcess``) as ``python -m
cluster.engine_core CMD_FD OUT_FD``: the replica's two pipes are its primary client.
With ``listen`` in its start message, the core also takes further clients over TCP
(on the given host, a random port; ``multiprocessing.connection``'s key challenge with
the replica's authkey): the API processes of ``ServeConfig.ingress = "api"``
(``cluster.api``), each attached with ``cluster.engine_process.attach``.

Every client speaks the protocol that ``cluster.engine_process`` documents. A request
belongs to the client that added it: its ``added`` answer and its deltas go to that
client only, while every client gets the engine's figures (and the prefix hashes)
with each message. A secondary client whose connection closes (its process died, it
shut down) has its requests aborted, so their blocks return to the pool; the primary
client's pipe closing ends the core (the replica is gone).

Contract of the loop (``_Core.run``): commands of every client first, then a step
while any request is unfinished; a client gets a message when a step produced deltas
of its requests, and at least every ``IDLE_REPORT_S``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from typing import Any

from cluster.async_engine import FAULT_STEP_DELAY_S, engine_stats, freeze_heap
from cluster.engine_process import (
    HANDSHAKE_TIMEOUT_S,
    _Delta,
    _Sent,
    encode,
    hang_up,
    io_timeout,
    tune_socket,
)
from engine.llm_engine import EngineArgs

logger = logging.getLogger(__name__)

IDLE_REPORT_S = 1.0  # the core's stats while no request runs, at most this stale
HASHES_EVERY_S = 1.0  # prefix-cache hashes (for the router's placement) this often
PREFIX_REPORT_MAX = 256  # at most this many hashes per report (cluster.affinity's cap)
CLIENT_IO_TIMEOUT_S = 2.0  # a secondary client's blocked read or write: it is dropped


class ClientGone(Exception):
    """A secondary client's connection broke (read or write)."""


@dataclass(eq=False)
class _Client:
    """One caller of the core: where its commands come from and its messages go (one
    duplex connection for an attached API process; the replica's two pipes for the
    primary), and the requests it owns."""

    recv: Connection
    send: Connection
    primary: bool
    name: str
    rids: set[str] = field(default_factory=set)
    reported_at: float = 0.0

    def put(self, msg: tuple[Any, ...]) -> None:
        try:
            self.send.send(msg)
        except OSError as e:
            if self.primary:
                raise
            raise ClientGone(self.name) from e


class _Accepter:
    """The listener: a thread accepts connections on ``host`` (a random port), and one
    short thread per connection runs the key challenge (at most
    ``HANDSHAKE_TIMEOUT_S``: a peer that stalls it holds no one else up); a connection
    that passes is handed to the step loop, woken by a byte on ``wake_r``. A secondary
    client's socket then fails any read or write that blocks ``CLIENT_IO_TIMEOUT_S``
    (a peer that stopped reading would otherwise stall every step)."""

    def __init__(self, host: str, authkey: bytes) -> None:
        self._sock = socket.create_server((host, 0))
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._authkey = authkey
        self.wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._new: list[Connection] = []
        threading.Thread(target=self._accept, name="kvserve-core-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError as e:
                if self._sock.fileno() < 0:
                    return  # the listener closed
                logger.warning("engine core: accept failed: %s", e)
                time.sleep(0.1)
                continue
            sock.setblocking(True)
            threading.Thread(target=self._admit, args=(Connection(sock.detach()),),
                             name="kvserve-core-handshake", daemon=True).start()  # fmt: skip

    def _admit(self, conn: Connection) -> None:
        try:
            tune_socket(conn, HANDSHAKE_TIMEOUT_S)
            deliver_challenge(conn, self._authkey)
            answer_challenge(conn, self._authkey)
            io_timeout(conn, CLIENT_IO_TIMEOUT_S)
        except Exception as e:  # a wrong key, a peer gone or silent mid-handshake
            logger.warning("engine core refused a client: %s", e)
            conn.close()
            return
        with self._lock:
            self._new.append(conn)
        os.write(self._wake_w, b"x")

    def take(self) -> list[Connection]:
        os.read(self.wake_r, 4096)
        with self._lock:
            new, self._new = self._new, []
        return new


class _Core:
    def __init__(self, cmd: Connection, out: Connection) -> None:
        from engine.llm_engine import LLMEngine

        start = cmd.recv()
        args: EngineArgs = start[1]
        listen: tuple[str, bytes] | None = start[2] if len(start) > 2 else None
        self.engine = LLMEngine(args)
        self.primary = _Client(cmd, out, True, "replica")
        self.clients: list[_Client] = [self.primary]
        self.owner: dict[str, _Client] = {}  # live request → the client that added it
        self.sent: dict[str, list[_Sent]] = {}
        self.steps = 0
        self.hashes_at = 0.0
        self.hashes: list[bytes] | None = None
        self.accepter = _Accepter(*listen) if listen is not None else None

    def info(self) -> dict[str, Any]:
        e = self.engine
        info = {"model_dir": str(e.model_dir), "prefix_key": e.prefix_key,
                "scheduler_config": e.scheduler_config, "args": e.args,
                "stats": self.stats()}  # fmt: skip
        if self.accepter is not None:
            info["address"] = self.accepter.address
        return info

    def stats(self) -> dict[str, Any]:
        return engine_stats(self.engine, self.steps, False)

    def run(self) -> None:
        """See the module docstring; returns when the primary client says stop."""
        while True:
            busy = self.engine.has_unfinished_requests()
            conns: list[Any] = [c.recv for c in self.clients]
            if self.accepter is not None:
                conns.append(self.accepter.wake_r)
            for ready in wait(conns, timeout=0 if busy else IDLE_REPORT_S):
                if isinstance(ready, int):
                    self.adopt()
                elif not self.drain(self._client_of(ready)):
                    return
            by_client: dict[_Client, list[_Delta]] = {}
            if self.engine.has_unfinished_requests():
                for d in self.step():
                    by_client.setdefault(self.owner_of(d), []).append(d)
            self.report(by_client)

    def _client_of(self, conn: Any) -> _Client:
        return next(c for c in self.clients if c.recv is conn)

    def owner_of(self, d: _Delta) -> _Client:
        client = self.owner[d.request_id]
        if d.finished:
            del self.owner[d.request_id]
            client.rids.discard(d.request_id)
        return client

    def adopt(self) -> None:
        assert self.accepter is not None
        for conn in self.accepter.take():
            client = _Client(conn, conn, False, f"client-{len(self.clients)}")
            try:
                client.put(("ready", self.info()))
            except ClientGone:
                conn.close()
                continue
            self.clients.append(client)
            logger.info("engine core: %s attached (%d clients)", client.name, len(self.clients))

    def drain(self, client: _Client) -> bool:
        """Applies every command ``client`` has sent; False when the primary said stop.
        A secondary client whose connection closed is dropped (its requests aborted)."""
        try:
            while client.recv.poll():
                if not self.apply(client, client.recv.recv()):
                    return False
        except (EOFError, OSError, ClientGone):
            if client.primary:
                raise EOFError from None  # the replica is gone
            self.drop(client)
        except Exception:  # a secondary's message this core cannot take: it alone goes
            if client.primary:
                raise
            logger.exception("engine core: %s sent a bad message; dropping it", client.name)
            self.drop(client)
        return True

    def drop(self, client: _Client) -> None:
        """Forgets a secondary client: aborts its requests, closes its connection."""
        if client not in self.clients:
            return
        self.clients.remove(client)
        for rid in list(client.rids):
            self.abort(rid)
        hang_up(client.recv)
        client.recv.close()
        logger.info("engine core: %s left (%d clients)", client.name, len(self.clients))

    def report(self, by_client: dict[_Client, list[_Delta]]) -> None:
        """One message to each client with deltas of its own, and to any client not
        sent one for ``IDLE_REPORT_S`` (figures after aborts, hashes, stay fresh)."""
        now = time.monotonic()
        hashes = None
        if now - self.hashes_at >= HASHES_EVERY_S:  # then to every client
            self.hashes_at = now
            hashes = self.engine.prefix_hashes(PREFIX_REPORT_MAX)
        due = [c for c in self.clients if hashes is not None or c in by_client
               or now - c.reported_at >= IDLE_REPORT_S]  # fmt: skip
        if not due:
            return
        stats = self.stats()
        for c in due:
            try:
                c.put(("out", by_client.get(c, []), stats, hashes, time.monotonic()))
            except ClientGone:
                self.drop(c)
                continue
            c.reported_at = now

    def step(self) -> list[_Delta]:
        """One engine step; the deltas of the requests still live here."""
        if FAULT_STEP_DELAY_S:
            time.sleep(FAULT_STEP_DELAY_S)
        outputs = self.engine.step()
        self.steps += 1
        return [encode(o, self.sent) for o in outputs if o.request_id in self.owner]

    def apply(self, client: _Client, msg: tuple[Any, ...]) -> bool:
        """One command of ``client``; False on the primary's stop."""
        kind = msg[0]
        if kind == "add":
            _, rid, prompt, params, resume = msg
            try:
                self.engine.add_request(prompt, params, rid, resume)
            except Exception as e:  # bad input: the caller gets it, nothing queued
                client.put(("added", rid, _portable(e)))
                return True
            self.owner[rid] = client
            client.rids.add(rid)
            client.put(("added", rid, None))
        elif kind == "abort":
            if self.owner.get(msg[1]) is client:
                self.abort(msg[1])
        elif kind == "stop":
            return not client.primary
        return True

    def abort(self, rid: str) -> None:
        client = self.owner.pop(rid, None)
        if client is not None:
            client.rids.discard(rid)
            self.sent.pop(rid, None)
            self.engine.abort(rid)


def _portable(e: Exception) -> Exception:
    """``e`` if it survives pickling, else a ``ValueError`` with its message."""
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        return ValueError(str(e))
    return e


def _orphan_watch(parent: int, loaded: threading.Event) -> None:
    """While the engine loads (the pipes are not read then), exits the process once
    its replica is gone, rather than finish loading onto a device a new replica wants."""
    while not loaded.wait(1.0):
        if os.getppid() != parent:
            os._exit(0)


def main(cmd_fd: int, out_fd: int) -> int:
    """The core: reads its ``EngineArgs`` (and where to listen) from the command pipe,
    loads, then serves until told to stop or the replica's pipe closes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-core %(message)s")
    # Ctrl-C in a terminal reaches the whole process group; the core's life follows its
    # replica's pipe instead (end-of-file: the replica is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cmd = Connection(cmd_fd, writable=False)
    out = Connection(out_fd, readable=False)
    loaded = threading.Event()
    threading.Thread(target=_orphan_watch, args=(os.getppid(), loaded), daemon=True).start()
    try:
        core = _Core(cmd, out)
    except BaseException as e:
        with contextlib.suppress(OSError):
            out.send(("failed", f"{type(e).__name__}: {e}"))
        return 1
    finally:
        loaded.set()
    freeze_heap()  # the loaded engine: out of the collector's full passes
    try:
        out.send(("ready", core.info()))
        core.run()
    except (EOFError, BrokenPipeError):
        return 0  # the replica is gone
    except BaseException as e:
        logger.exception("engine step loop failed")
        for c in core.clients:
            with contextlib.suppress(OSError):
                c.send.send(("dead", f"{type(e).__name__}: {e}"))
        return 1
    finally:
        core.engine.shutdown()
    return 0


if __name__ == "__main__":
    # The module's own name, not __main__: its classes must be this module's.
    from cluster import engine_core

    sys.exit(engine_core.main(int(sys.argv[1]), int(sys.argv[2])))
