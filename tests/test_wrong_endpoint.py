"""A client pointed at the wrong thing says what it found: not forkcore (with the first
bytes it sent), another protocol version, or another transport."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from grains_sample import ICounter

import forkcore
from forkcore.errors import ConnectError

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def answering(reply: bytes) -> AsyncIterator[str]:
    """A TCP server that answers whatever it is sent with `reply`, then closes."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_address)[1]

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                await stream.receive()
                await stream.send(reply)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield f"127.0.0.1:{port}"
        tg.cancel_scope.cancel()


async def until_closed(stream: anyio.abc.SocketStream) -> None:
    """Read (bounded) until the server closes the connection."""
    with anyio.fail_after(5):
        try:
            while await stream.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass


async def connect_error(endpoint: str, transport: str = "tcp") -> str:
    with pytest.raises(ConnectError) as caught:
        with anyio.fail_after(10):
            async with forkcore.Client(servers=[endpoint], transport=transport,
                                       connect_timeout=3):
                pass
    return str(caught.value)


async def test_an_http_server_is_not_a_forkcore_server() -> None:
    async with answering(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n") as endpoint:
        message = await connect_error(endpoint)
    assert f"{endpoint} is not a forkcore server (it sent 'HTTP/1.1 400 Bad Request')" \
        in message
    assert "max_frame_size" not in message


async def test_another_protocol_version_says_so() -> None:
    async with answering(b"FKC\x02" + b"\x00" * 8) as endpoint:
        message = await connect_error(endpoint)
    assert "speaks forkcore protocol version 2, this side speaks 1" in message
    assert "upgrade the older side" in message


async def test_a_forkcore_server_tells_a_stranger_apart(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "forkcore.server")
    async with forkcore.Server(id="w1", grains=["grains_sample"]) as server:
        host, port = (server.endpoint or "").rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await until_closed(stream)
        async with forkcore.Client(servers=[server.endpoint or ""]) as client:
            assert await client.get_grain(ICounter, "k").add(1) == 1  # still serving
    assert any("is not a forkcore client (it sent 'GET / HTTP/1.1')" in r.getMessage()
               for r in caplog.records)


async def test_a_client_of_another_version_is_told_apart_by_the_server(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "forkcore.server")
    async with forkcore.Server(id="w4", grains=["grains_sample"]) as server:
        host, port = (server.endpoint or "").rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(b"FKC\x07" + b"\x00" * 8)  # a future client's preamble
            await until_closed(stream)
    assert any("speaks forkcore protocol version 7, this side speaks 1" in r.getMessage()
               for r in caplog.records)


async def test_a_tcp_client_at_a_udp_server_hints_at_the_transport() -> None:
    async with forkcore.Server(id="w2", transport="udp", grains=["grains_sample"]) as server:
        message = await connect_error(server.endpoint or "")
    assert "set the same `transport` in [client]" in message


async def test_a_udp_client_at_a_tcp_server_hints_at_the_transport() -> None:
    async with forkcore.Server(id="w3", transport="tcp", grains=["grains_sample"]) as server:
        message = await connect_error(server.endpoint or "", transport="udp")
    assert "set the same `transport` in [client]" in message
