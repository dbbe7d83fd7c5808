"""The link between an API process and an engine core: two ends that pass
``cluster.core.messages`` messages in order. Torch-free.

One factory, ``connect(address, key)``, picks the transport by the address:

- ``tcp://host:port`` (serving): framed messages over TCP on asyncio streams, after a
  mutual key challenge (``handshake``: each side sends a random nonce, the other
  answers its HMAC-SHA256 under the key, as ``multiprocessing.connection`` does).
  ``frame = 4-byte big-endian length + pickled message``; pickle is safe here only
  because both ends proved they hold the core's key first. Sockets get ``TCP_NODELAY``
  (a step's message must not wait for the peer's delayed ACK: 19-29 ms at the median
  on one H200 with 64 streams before it) and keepalive.
- ``local://name`` (unit tests, one process): a pair of in-memory ends; each message
  crosses as a copy (pickled and read back), so what one side keeps changing after a
  send is not seen by the other, as on the wire. A core listens there by
  ``listen_local`` (its key is still checked).

Both ends have one interface (``End``): ``send`` queues a message, ``drain`` waits
until the peer can take more, ``recv`` is the next message (``LinkClosed`` once the
link is closed or broken), ``close`` ends the link (the peer's ``recv`` fails).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

from cluster.core.messages import Abort, Add, Added, Message, Out, Ready, Reset, ResetDone

HANDSHAKE_TIMEOUT_S = 10.0  # a peer's connect and key challenge, at most
NONCE_BYTES = 32
MAX_FRAME_BYTES = 256 * 1024 * 1024
_LEN = struct.Struct(">I")


class LinkClosed(ConnectionError):
    """The peer closed the link, or sent what this side cannot read."""


def tune(writer: asyncio.StreamWriter) -> None:
    """``TCP_NODELAY`` and keepalive on a link's socket."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _digest(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, nonce, hashlib.sha256).digest()


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    key: bytes) -> None:  # fmt: skip
    """Both sides prove they hold ``key`` (the same steps on both ends); ``LinkClosed``
    on a wrong key, a peer gone or silent for ``HANDSHAKE_TIMEOUT_S``."""

    async def run() -> None:
        mine = os.urandom(NONCE_BYTES)
        writer.write(mine)
        await writer.drain()
        theirs = await reader.readexactly(NONCE_BYTES)
        writer.write(_digest(key, theirs))
        await writer.drain()
        answer = await reader.readexactly(len(_digest(key, mine)))
        if not hmac.compare_digest(answer, _digest(key, mine)):
            raise LinkClosed("the peer does not hold the core's key")

    try:
        await asyncio.wait_for(run(), HANDSHAKE_TIMEOUT_S)
    except (TimeoutError, asyncio.IncompleteReadError, OSError) as e:
        raise LinkClosed(f"handshake failed: {type(e).__name__}: {e}") from None


def _checked(msg: object) -> Message:
    if not isinstance(msg, Add | Abort | Reset | Ready | Added | ResetDone | Out):
        raise LinkClosed(f"unexpected message {type(msg).__name__}")
    return msg


class End(Protocol):
    def send(self, msg: Message) -> None: ...

    async def drain(self) -> None: ...

    async def recv(self) -> Message: ...

    def close(self) -> None: ...


class SocketEnd:
    """One end of a TCP link (after the handshake)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, msg: Message) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_LEN.pack(len(data)) + data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def recv(self) -> Message:
        try:
            head = await self.reader.readexactly(_LEN.size)
            (n,) = _LEN.unpack(head)
            if n > MAX_FRAME_BYTES:
                raise LinkClosed(f"frame of {n} bytes is over the limit")
            msg = pickle.loads(await self.reader.readexactly(n))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            raise LinkClosed(f"{type(e).__name__}: {e}") from None
        except LinkClosed:
            raise
        except Exception as e:  # a frame that does not unpickle
            raise LinkClosed(f"unreadable message: {type(e).__name__}: {e}") from None
        return _checked(msg)

    def close(self) -> None:
        """Drops the connection at once (unsent data too): the peer sees it close."""
        self.writer.transport.abort()


class LocalEnd:
    """One end of an in-process link (``local_pair``)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[Message | LinkClosed] = asyncio.Queue()
        self.peer: LocalEnd | None = None
        self.closed = False

    def send(self, msg: Message) -> None:
        if self.closed or self.peer is None or self.peer.closed:
            raise ConnectionResetError("the in-process link is closed")
        self.peer.inbox.put_nowait(pickle.loads(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)))

    async def drain(self) -> None:
        if self.closed or self.peer is None or self.peer.closed:
            raise ConnectionResetError("the in-process link is closed")

    async def recv(self) -> Message:
        if self.closed:
            raise LinkClosed("this end is closed")
        item = await self.inbox.get()
        if isinstance(item, LinkClosed):
            self.closed = True
            raise item
        return _checked(item)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.inbox.put_nowait(LinkClosed("this end is closed"))
        if self.peer is not None:
            self.peer.inbox.put_nowait(LinkClosed("the peer closed the link"))


def local_pair() -> tuple[LocalEnd, LocalEnd]:
    a, b = LocalEnd(), LocalEnd()
    a.peer, b.peer = b, a
    return a, b


_SERVING: set[asyncio.Future[None]] = set()  # the cores' sides of in-process links
# name -> (key, what takes the core's end of each new in-process link)
_LOCAL: dict[str, tuple[bytes, Callable[[LocalEnd], Awaitable[None]]]] = {}


def listen_local(name: str, key: bytes, accept: Callable[[LocalEnd], Awaitable[None]]) -> str:
    """Has ``accept`` serve the core's end of every link made to ``local://name``;
    returns that address (``unlisten_local`` undoes it)."""
    _LOCAL[name] = (key, accept)
    return f"local://{name}"


def unlisten_local(name: str) -> None:
    _LOCAL.pop(name, None)


async def connect(address: str, key: bytes) -> End:
    """A link to the core at ``address`` (``tcp://host:port`` or ``local://name``),
    after the key check; ``LinkClosed`` when it cannot be reached or refuses the key."""
    scheme, sep, rest = address.partition("://")
    if scheme == "local" and sep:
        got = _LOCAL.get(rest)
        if got is None:
            raise LinkClosed(f"no engine core listens at {address}")
        if not hmac.compare_digest(got[0], key):
            raise LinkClosed("the peer does not hold the core's key")
        mine, theirs = local_pair()
        task = asyncio.ensure_future(got[1](theirs))
        _SERVING.add(task)
        task.add_done_callback(_SERVING.discard)
        return mine
    if scheme != "tcp" or not sep:
        raise LinkClosed(f"not a core address: {address!r} (tcp://host:port or local://name)")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)),
                                                HANDSHAKE_TIMEOUT_S)  # fmt: skip
    except (TimeoutError, OSError, ValueError) as e:
        raise LinkClosed(f"cannot reach the core at {address}: {e}") from None
    tune(writer)
    try:
        await handshake(reader, writer, key)
    except BaseException:
        writer.close()
        raise
    return SocketEnd(reader, writer)


def tcp_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def listening_socket(host: str) -> socket.socket:
    """A TCP socket listening on ``host``, a free port (``getsockname()``)."""
    return socket.create_server((host, 0))
