"""The link between an API process and an engine core: framed messages over TCP, on
asyncio streams, after a mutual key challenge. Torch-free.

    frame = 4-byte big-endian length + pickled message (a tuple)

Pickle is safe here only because both ends proved they hold the core's key first
(``handshake``: each side sends a random nonce, the other answers its HMAC-SHA256
under the key), as ``multiprocessing.connection`` does. Sockets get ``TCP_NODELAY``
(a step's message must not wait for the peer's delayed ACK: 19-29 ms at the median on
one H200 with 64 streams before it) and keepalive.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import pickle
import socket
import struct
from typing import Any

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


def send(writer: asyncio.StreamWriter, msg: tuple[Any, ...]) -> None:
    """Queues one message (the caller drains the writer when it must wait)."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LEN.pack(len(data)) + data)


async def recv(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """The next message; ``LinkClosed`` at end of stream or on a bad frame."""
    try:
        head = await reader.readexactly(_LEN.size)
        (n,) = _LEN.unpack(head)
        if n > MAX_FRAME_BYTES:
            raise LinkClosed(f"frame of {n} bytes is over the limit")
        msg = pickle.loads(await reader.readexactly(n))
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
        raise LinkClosed(f"{type(e).__name__}: {e}") from None
    except LinkClosed:
        raise
    except Exception as e:  # a frame that does not unpickle
        raise LinkClosed(f"unreadable message: {type(e).__name__}: {e}") from None
    if not isinstance(msg, tuple) or not msg:
        raise LinkClosed(f"unexpected message {type(msg).__name__}")
    return msg


async def connect(host: str, port: int, key: bytes) -> tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter]:  # fmt: skip
    """A link to the core listening at ``host:port``, after the key challenge."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                HANDSHAKE_TIMEOUT_S)  # fmt: skip
    except (TimeoutError, OSError) as e:
        raise LinkClosed(f"cannot reach the core at {host}:{port}: {e}") from None
    tune(writer)
    try:
        await handshake(reader, writer, key)
    except BaseException:
        writer.close()
        raise
    return reader, writer


def listening_socket(host: str) -> socket.socket:
    """A TCP socket listening on ``host``, a free port (``getsockname()``)."""
    return socket.create_server((host, 0))
