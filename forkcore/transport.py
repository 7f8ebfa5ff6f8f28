"""What a transport is, the frame channel shared by stream transports, and `memory`.

A transport moves frame bodies (bytes) between a client and a server; the runtimes do
everything else. `StreamChannel` gives any byte stream length-prefixed framing, a frame
size limit and write coalescing (the frames sent during one event-loop turn go out in
one write; on a stream that can write without waiting, the first of them goes out at
once), so the TCP plugin and the in-process `memory` transport share it.

Backpressure: `drain()` waits while more than `HIGH_WATER` bytes are queued or being
written, so a caller that awaits it before producing more (the server does, before it
reads the next request) holds its memory to about that much per connection and leaves
the rest to the peer's TCP window. A channel given a `send_timeout` (the server side's)
closes when its peer takes nothing of a queued write for that long: a client that stops
reading for good is dropped instead of being held (nginx's `send_timeout`).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .clock import now as clock
from .errors import ConfigError, ConnectError, ProtocolError
from .interfaces import Channel, Handler, Listener, Transport
from .protocol.framing import DEFAULT_MAX_FRAME_SIZE, HEADER, PREAMBLE, FrameDecoder, WrongPeer

log = logging.getLogger("forkcore.transport")

__all__ = ["Channel", "Handler", "Listener", "MemoryTransport", "StreamChannel", "Transport",
           "join_endpoint", "serve_guarded", "split_endpoint"]

def split_endpoint(endpoint: str) -> tuple[str, int]:
    """`"host:port"` → (host, port), or a `ConfigError` saying what a good one looks like."""
    if not isinstance(endpoint, str):
        raise ConfigError(f"endpoint {endpoint!r} must be a string 'host:port'")
    host, sep, port_text = endpoint.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"endpoint {endpoint!r} is not 'host:port' (e.g. '127.0.0.1:11111')")
    return host, int(port_text)


def join_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StreamChannel:
    """Frames over a byte stream, with coalesced writes and a frame size limit."""

    HIGH_WATER = 4 * 1024 * 1024  # queued + being-written bytes above which drain() waits
    secure = False  # set by transports that wrap the stream in TLS (see Channel)
    FLUSH_TIMEOUT = 1.0  # seconds a closing channel may spend sending what is queued
    SEND_TIMEOUT = 30.0  # the server side's default send_timeout (see serve_guarded)
    # with a send_timeout, writes go out in pieces of at most this many bytes, each of
    # which the peer must take within the timeout (progress, not the whole batch, counts)
    SEND_PIECE = 256 * 1024

    def __init__(self, stream: Any, peer: str, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 send_timeout: float | None = None, side: str = "client"):
        self.peer = peer
        # each side starts with the preamble; what the other side is, for messages
        self._preamble_out = PREAMBLE
        self._other = "server" if side == "client" else "client"
        self.received_at = clock()
        self._send_timeout = send_timeout
        self._sending = False  # a piece is going out (read by the send watchdog)
        self._pieces_sent = 0
        self._stream = stream
        self._decoder = FrameDecoder(max_frame_size, preamble=True)
        self._frames: deque[bytes] = deque()
        self._pending: list[bytes] = []
        # bytes in `_pending` plus those of the write in progress (what drain() bounds)
        self._pending_bytes = 0
        self._wake = anyio.Event()
        # the backend's Event class, made directly (anyio.Event() looks the backend up)
        self._new_event: Any = type(self._wake)
        self._drained = anyio.Event()
        self._drained.set()
        self._closed = False
        self._closing = False
        self._writer_done = anyio.Event()
        self._error: BaseException | None = None
        # a stream that can write without waiting (`try_send(data) -> bytes written`)
        # gets the first frame of each loop turn at once: no task switch before the
        # kernel has it. The writer task sends the rest of the turn, joined.
        self._try_send: Any = getattr(stream, "try_send", None)
        self._sent_directly = False  # a frame went out directly since the writer last ran
        self._writing = False  # the writer is inside a send: nothing may overtake it

    @classmethod
    @asynccontextmanager
    async def open(
        cls, stream: Any, peer: str, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        send_timeout: float | None = None, side: str = "client",
    ) -> AsyncIterator[StreamChannel]:
        """Run the channel's writer for the duration of the block; flush, then close."""
        channel = cls(stream, peer, max_frame_size, send_timeout, side)
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(channel._write_loop)
            if send_timeout is not None:
                tg.start_soon(channel._watch_sends, send_timeout)
            try:
                yield channel
            except Exception as exc:
                error = exc  # re-raised below, not wrapped in the task group's group
            finally:
                with anyio.CancelScope(shield=True):
                    await channel._flush_and_close()
                tg.cancel_scope.cancel()
        if error is not None:
            raise error

    def send(self, body: bytes, delivery: str = "reliable") -> None:
        if self._closed:
            raise ConnectError(f"connection to {self.peer} is closed")
        pending = self._pending
        size = len(body)
        if self._preamble_out:  # the first frame of the connection
            pending.append(self._preamble_out + HEADER.pack(size))
            self._pending_bytes += len(self._preamble_out)
            self._preamble_out = b""
        else:
            pending.append(HEADER.pack(size))
        pending.append(body)
        self._pending_bytes += size + 4
        if len(pending) == 2:  # the first frame of this batch
            if self._try_send is not None and not self._sent_directly \
                    and not self._writing:
                self._sent_directly = True
                self._send_now()
            self._wake.set()

    def _send_now(self) -> None:
        pending = self._pending
        data = pending[0] + pending[1]
        try:
            sent = self._try_send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return  # the writer finds out too, and closes the channel
        pending.clear()
        if sent < len(data):
            pending.append(data[sent:])
        self._pending_bytes = len(data) - sent

    async def drain(self) -> None:
        while self._pending_bytes > self.HIGH_WATER and not self._closed:
            if self._drained.is_set():
                self._drained = self._new_event()
            await self._drained.wait()  # the writer sets it once below the mark
        if self._closed:
            raise ConnectError(f"connection to {self.peer} is closed")

    async def receive(self) -> bytes:
        frames = self._frames
        while not frames:
            if self._closed:
                raise ConnectError(f"connection to {self.peer} is closed")
            try:
                data = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                    OSError) as exc:
                self._closed = True
                self._wake.set()
                raise ConnectError(f"connection to {self.peer} closed") from exc
            try:
                frames.extend(self._decoder.feed(data))
                if not frames:
                    # bytes of a frame still arriving: proof the peer lives although no
                    # message came (a whole frame is the reader's proof, so a read that
                    # completes one skips the clock)
                    self.received_at = clock()
            except WrongPeer as exc:
                self._closed = True
                self._wake.set()
                message = exc.describe(self.peer, self._other)
                # a client was pointed at something else: it cannot connect there
                raise (ConnectError if self._other == "server" else ProtocolError)(
                    message) from None
            except ProtocolError:
                self._closed = True
                self._wake.set()
                raise
        return frames.popleft()

    async def aclose(self) -> None:
        self._closed = True
        self._wake.set()
        self._drained.set()
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()

    async def _write_loop(self) -> None:
        try:
            while True:
                self._sent_directly = False
                if not self._pending:
                    if self._closed or self._closing:
                        return
                    self._wake = self._new_event()
                    await self._wake.wait()
                    continue
                data = b"".join(self._pending)
                self._pending.clear()
                self._writing = True
                try:
                    if self._send_timeout is None:
                        await self._stream.send(data)
                        self._pending_bytes -= len(data)
                    elif len(data) <= self.SEND_PIECE:  # one piece (_send_in_pieces, inline)
                        self._sending = True
                        await self._stream.send(data)
                        self._sending = False
                        self._pieces_sent += 1
                        self._pending_bytes -= len(data)
                    else:
                        await self._send_in_pieces(data)
                finally:
                    self._writing = False
                if self._pending_bytes <= self.HIGH_WATER:
                    self._drained.set()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream,
                OSError) as exc:
            self._error = exc
            self._closed = True
            self._drained.set()
            await self._stream.aclose()
        finally:
            self._writer_done.set()

    async def _send_in_pieces(self, data: bytes) -> None:
        """Write `data` a piece at a time, each piece's start noted for the watchdog."""
        piece_size = self.SEND_PIECE
        for start in range(0, len(data), piece_size):
            piece = data if len(data) <= piece_size else data[start:start + piece_size]
            self._sending = True
            await self._stream.send(piece)
            self._sending = False
            self._pieces_sent += 1
            self._pending_bytes -= len(piece)
            if self._pending_bytes <= self.HIGH_WATER:
                self._drained.set()

    async def _watch_sends(self, timeout: float) -> None:
        """Close the stream when a piece has been going out for `timeout` seconds: the
        peer stopped reading. One task per channel that wakes a few times per timeout,
        instead of a cancel scope around every write (which would cost more than the
        rest of a small call)."""
        seen, since = -1, clock()
        while not self._closed:
            await anyio.sleep(min(timeout / 4, 1.0))
            now = clock()
            if not self._sending or self._pieces_sent != seen:
                seen, since = self._pieces_sent, now  # idle, or it made progress
            elif now - since > timeout:
                log.warning("closing connection to %s: it took none of the %d bytes queued "
                            "for it for %gs (send_timeout): it stopped reading", self.peer,
                            self._pending_bytes, timeout)
                self._error = _SendStalled(timeout)
                self._closed = True
                self._drained.set()
                with anyio.CancelScope(shield=True):
                    await self._stream.aclose()
                return

    async def _flush_and_close(self) -> None:
        """Let the writer send what is queued (bounded), then close the stream."""
        self._closing = True
        self._wake.set()
        with anyio.move_on_after(self.FLUSH_TIMEOUT):
            await self._writer_done.wait()
        self._closed = True
        self._drained.set()
        await self._stream.aclose()


class _SendStalled(Exception):
    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        self.timeout = timeout


async def serve_guarded(
    handler: Handler, stream: Any, peer: str, max_frame_size: int, logger: logging.Logger,
    send_timeout: float | None = StreamChannel.SEND_TIMEOUT,
) -> None:
    """Run `handler` on one accepted stream so no error in it reaches the listener; the
    channel drops a peer that takes nothing it is sent for `send_timeout` seconds."""
    try:
        async with StreamChannel.open(stream, peer, max_frame_size, send_timeout,
                                      "server") as channel:
            await handler(channel)
    except Exception:
        logger.exception("connection handler for %s failed", peer)


# -- the in-process `memory` transport ----------------------------------------------------


class _MemoryByteStream:
    """One end of an in-process byte pipe, bounded so a slow reader pushes back."""

    def __init__(self, send: MemoryObjectSendStream[bytes],
                 receive: MemoryObjectReceiveStream[bytes]) -> None:
        self._send = send
        self._receive = receive

    async def send(self, data: bytes) -> None:
        try:
            await self._send.send(data)
        except anyio.BrokenResourceError:
            raise anyio.BrokenResourceError from None

    async def receive(self) -> bytes:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._send.close()
        self._receive.close()


def _memory_pipe() -> tuple[_MemoryByteStream, _MemoryByteStream]:
    a_send, b_receive = anyio.create_memory_object_stream[bytes](64)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](64)
    return _MemoryByteStream(a_send, a_receive), _MemoryByteStream(b_send, b_receive)


_memory_listeners: dict[str, MemoryListener] = {}
_memory_ports = itertools.count(1)


class MemoryListener:
    def __init__(self, endpoint: str, max_frame_size: int) -> None:
        self.endpoint = endpoint
        self.max_frame_size = max_frame_size
        self._incoming, self._accept = anyio.create_memory_object_stream[
            tuple[_MemoryByteStream, str]
        ](256)

    def offer(self, stream: _MemoryByteStream, peer: str) -> None:
        try:
            self._incoming.send_nowait((stream, peer))
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            stream._send.close()
            raise ConnectError(f"memory endpoint {self.endpoint} refused the connection") from None

    async def serve(self, handler: Handler) -> None:
        async with anyio.create_task_group() as tg:
            async for stream, peer in self._accept:
                tg.start_soon(serve_guarded, handler, stream, peer, self.max_frame_size, log)

    def stop_accepting(self) -> None:
        if _memory_listeners.get(self.endpoint) is self:
            del _memory_listeners[self.endpoint]
        self._incoming.close()

    def close(self) -> None:
        self._incoming.close()
        self._accept.close()


class MemoryTransport:
    """In-process transport for tests and embedding: endpoints live in this process."""

    name = "memory"

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if isinstance(max_frame_size, bool) or not isinstance(max_frame_size, int) \
                or max_frame_size < 64:
            raise ConfigError("transport_options.max_frame_size must be an int >= 64")
        self.max_frame_size = max_frame_size

    @asynccontextmanager
    async def connect(self, endpoint: str, *, timeout: float) -> AsyncIterator[StreamChannel]:
        split_endpoint(endpoint)
        listener = _memory_listeners.get(endpoint)
        if listener is None:
            raise ConnectError(f"nothing listens on memory endpoint {endpoint}")
        client_end, server_end = _memory_pipe()
        local = f"memory-client:{next(_memory_ports)}"
        listener.offer(server_end, local)
        async with StreamChannel.open(client_end, endpoint, self.max_frame_size) as channel:
            yield channel

    @asynccontextmanager
    async def listen(self, endpoint: str) -> AsyncIterator[MemoryListener]:
        host, port = split_endpoint(endpoint)
        if port == 0:
            port = 40000 + next(_memory_ports)
        bound = join_endpoint(host, port)
        if bound in _memory_listeners:
            raise ConnectError(f"memory endpoint {bound} is already in use")
        listener = MemoryListener(bound, self.max_frame_size)
        _memory_listeners[bound] = listener
        try:
            yield listener
        finally:
            listener.stop_accepting()
            listener.close()
