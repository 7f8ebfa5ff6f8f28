"""TCP transport: anyio TCP streams, TCP_NODELAY, frames via forkcore's StreamChannel
(length prefix, size limit checked before the body is read, writes of one loop turn
coalesced into one send)."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from forkcore.errors import ConfigError, ConnectError
from forkcore.protocol.framing import DEFAULT_MAX_FRAME_SIZE
from forkcore.transport import Handler, StreamChannel, join_endpoint, serve_guarded, split_endpoint

log = logging.getLogger("forkcore.transport.tcp")


def _nodelay(stream: anyio.abc.SocketStream) -> None:
    sock = stream.extra(SocketAttribute.raw_socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer(stream: anyio.abc.SocketStream) -> str:
    try:
        address: Any = stream.extra(SocketAttribute.remote_address)
        return join_endpoint(str(address[0]), int(address[1]))
    except Exception:
        return "unknown"


class TcpListener:
    def __init__(self, listener: anyio.abc.Listener[Any], endpoint: str, max_frame_size: int):
        self._listener = listener
        self.endpoint = endpoint
        self.max_frame_size = max_frame_size
        self._accepting = anyio.CancelScope()

    def stop_accepting(self) -> None:
        """Refuse new connections; those already accepted keep running."""
        self._accepting.cancel()

    async def serve(self, handler: Handler) -> None:
        """Accept forever; neither a failing handler nor a failing accept (say, out of file
        descriptors) stops the listener."""
        async def accepted(stream: anyio.abc.SocketStream) -> None:
            try:
                _nodelay(stream)
            except OSError:
                await stream.aclose()
                return
            await serve_guarded(handler, stream, _peer(stream), self.max_frame_size, log)

        async def accept_loop(listener: Any) -> None:
            while True:
                try:
                    stream = await listener.accept()
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                except OSError as exc:
                    log.warning("accept on %s failed: %s; retrying", self.endpoint, exc)
                    await anyio.sleep(0.1)
                    continue
                tg.start_soon(accepted, stream)

        async with anyio.create_task_group() as tg:
            with self._accepting:
                async with anyio.create_task_group() as accepting:
                    for listener in getattr(self._listener, "listeners", [self._listener]):
                        accepting.start_soon(accept_loop, listener)
            with anyio.CancelScope(shield=True):
                await self._listener.aclose()


class TcpTransport:
    """Transport `tcp`. Options: `max_frame_size` (bytes, default 16 MiB)."""

    name = "tcp"

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if isinstance(max_frame_size, bool) or not isinstance(max_frame_size, int) \
                or max_frame_size < 64:
            raise ConfigError("transport_options.max_frame_size must be an int >= 64")
        self.max_frame_size = max_frame_size

    @asynccontextmanager
    async def connect(self, endpoint: str, *, timeout: float) -> AsyncIterator[StreamChannel]:
        host, port = split_endpoint(endpoint)
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(host, port)
        except TimeoutError:
            raise ConnectError(
                f"connecting to {endpoint} timed out after {timeout:g}s: is the server up "
                "and reachable?"
            ) from None
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to {endpoint}: {exc.strerror or exc}; is a forkcore server "
                "listening there?"
            ) from None
        _nodelay(stream)
        async with StreamChannel.open(stream, endpoint, self.max_frame_size) as channel:
            yield channel

    @asynccontextmanager
    async def listen(self, endpoint: str) -> AsyncIterator[TcpListener]:
        host, port = split_endpoint(endpoint)
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise ConnectError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None
        async with listener:
            address: Any = listener.extra(SocketAttribute.local_address)
            yield TcpListener(listener, join_endpoint(str(address[0]), int(address[1])),
                              self.max_frame_size)
