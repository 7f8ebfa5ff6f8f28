"""TCP connections on plain non-blocking sockets, driven with `anyio.wait_readable` /
`wait_writable`, so they run on asyncio and trio alike.

Why not anyio's own TCP streams: on asyncio they sit on a transport, whose write buffer
the channel cannot see, so every frame has to go through a writer task and a checkpoint
before it reaches the kernel. Owning the socket lets the channel hand the first frame of
a loop turn to the kernel at once (`try_send`): one task switch less on each side of a
call, which is most of what a call costs with one call in flight. Frames that follow in
the same turn are still joined into one write.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute

RECEIVE_SIZE = 65536

# errors that mean the connection is gone (as opposed to "try again later")
_GONE = (ConnectionError, BrokenPipeError, TimeoutError)


_local = threading.local()


def _receive_buffer() -> bytearray:
    """The buffer this thread's connections read into, one for all of them: a fresh
    64 KiB bytes per read costs the allocator (here, system calls) more than copying out
    what arrived, and a buffer per connection would cost 64 KiB per idle connection."""
    buffer: bytearray | None = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = bytearray(RECEIVE_SIZE)
    return buffer


def _broken(exc: OSError) -> anyio.BrokenResourceError:
    error = anyio.BrokenResourceError(f"connection lost: {exc.strerror or exc}")
    error.__cause__ = exc
    return error


class SocketByteStream(anyio.abc.ByteStream):
    """One TCP connection on a socket this object owns (and closes)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False
        self._more = False  # the last read filled the buffer: more is probably waiting

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        sock = self._sock
        return {
            SocketAttribute.raw_socket: lambda: sock,
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.local_address: sock.getsockname,
            SocketAttribute.remote_address: sock.getpeername,
        }

    async def receive(self, max_bytes: int = RECEIVE_SIZE) -> bytes:
        sock = self._sock
        size = min(max_bytes, RECEIVE_SIZE)
        if not self._more:
            # the peer usually has not answered yet: wait first rather than make a
            # read that fails
            await self._wait_readable()
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            buffer = _receive_buffer()
            try:
                received = sock.recv_into(buffer, size)
            except (BlockingIOError, InterruptedError):
                await self._wait_readable()
                continue
            except OSError as exc:
                if self._closed:
                    raise anyio.ClosedResourceError from None
                raise _broken(exc) from None
            if not received:
                raise anyio.EndOfStream
            self._more = received == size
            return bytes(memoryview(buffer)[:received])  # copied out before any await

    async def _wait_readable(self) -> None:
        try:
            await anyio.wait_readable(self._sock)
        except OSError as exc:  # the socket was closed under us
            raise anyio.ClosedResourceError from exc

    def try_send(self, data: bytes) -> int:
        """Write what the kernel takes of `data` now, without waiting: the number of
        bytes written (0 when its buffer is full). Raises `BrokenResourceError` when the
        connection is gone."""
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise _broken(exc) from None

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        sock = self._sock
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_writable(sock)
                continue
            except OSError as exc:
                if self._closed:
                    raise anyio.ClosedResourceError from None
                raise _broken(exc) from None
            view = view[sent:]

    async def send_eof(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise _broken(exc) from None

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # wake whoever waits on the socket (they get ClosedResourceError) and drop its
            # event-loop registrations before the descriptor can be reused
            anyio.notify_closing(self._sock)
            self._sock.close()
        await anyio.lowlevel.checkpoint()


async def connect(host: str, port: int) -> SocketByteStream:
    """A connected stream to (host, port): each resolved address in turn, the first that
    accepts; the last error if none does. The caller bounds the time."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"{host} resolves to no address")
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            try:
                sock.connect(address)
            except (BlockingIOError, InterruptedError):
                await _connected(sock)
        except OSError as exc:
            anyio.notify_closing(sock)
            sock.close()
            last = exc
            continue
        except BaseException:
            anyio.notify_closing(sock)
            sock.close()
            raise
        return SocketByteStream(sock)
    raise last


async def _connected(sock: socket.socket) -> None:
    """Wait for a non-blocking connect to finish; its error, if it failed."""
    await anyio.wait_writable(sock)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def accept(listening: socket.socket) -> SocketByteStream:
    """The next connection on a listening socket (non-blocking, owned by its listener)."""
    while True:
        try:
            sock, _address = listening.accept()
        except (BlockingIOError, InterruptedError):
            await anyio.wait_readable(listening)
            continue
        except _GONE:
            continue  # the peer gave up before we took its connection
        return SocketByteStream(sock)
