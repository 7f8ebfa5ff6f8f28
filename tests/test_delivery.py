"""`delivery` reaches the transport for calls that wait for their result too: a
`reliable_unordered` method's Request is handed to the channel as such (on udp: its own
QUIC stream), through a real transport plugin that records what it is asked to send."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import forkcore
from forkcore.interfaces import Channel, RegisterTransport
from forkcore.plugins import get_plugin_manager
from forkcore.protocol import codec
from forkcore.transport import MemoryTransport

pytestmark = pytest.mark.anyio


class IDelivery(forkcore.GrainInterface, name="delivery.test"):
    async def ordered(self, n: int) -> int: ...

    @forkcore.rpc(delivery="reliable_unordered")
    async def unordered(self, n: int) -> int: ...


class Delivery(forkcore.Grain, IDelivery):
    async def ordered(self, n: int) -> int:
        return n

    async def unordered(self, n: int) -> int:
        return -n


class RecordingChannel:
    """A channel that sends through another and records (message code, delivery)."""

    def __init__(self, inner: Channel, sent: list[tuple[Any, str]]) -> None:
        self._inner = inner
        self._sent = sent
        self.peer = inner.peer
        self.secure = inner.secure

    @property
    def received_at(self) -> float:
        return self._inner.received_at

    def send(self, body: bytes, delivery: str = "reliable") -> None:
        self._sent.append((codec.decode(body)[0], delivery))
        self._inner.send(body, delivery)

    async def drain(self) -> None:
        await self._inner.drain()

    async def receive(self) -> bytes:
        return await self._inner.receive()

    async def aclose(self) -> None:
        await self._inner.aclose()


class RecordingTransport:
    name = "recording"
    sent: list[tuple[Any, str]] = []

    def __init__(self) -> None:
        self._memory = MemoryTransport()

    @asynccontextmanager
    async def connect(self, endpoint: str, *, timeout: float) -> AsyncIterator[Channel]:
        async with self._memory.connect(endpoint, timeout=timeout) as channel:
            yield RecordingChannel(channel, self.sent)

    def listen(self, endpoint: str) -> Any:
        listener: Any = self._memory.listen(endpoint)
        return listener


class Plugin:
    @forkcore.hookimpl
    def forkcore_register_transports(self, register: RegisterTransport) -> None:
        register("recording", RecordingTransport)


@pytest.fixture
def recording() -> Iterator[list[tuple[Any, str]]]:
    plugin = Plugin()
    get_plugin_manager().register(plugin, name="test-delivery")
    RecordingTransport.sent = []
    try:
        yield RecordingTransport.sent
    finally:
        get_plugin_manager().unregister(plugin)


async def test_an_awaited_reliable_unordered_call_is_sent_unordered(
        recording: list[tuple[Any, str]]) -> None:
    async with forkcore.Server(id="d1", transport="memory", grains=[Delivery]) as server:
        assert server.endpoint is not None
        async with forkcore.Client(servers=[server.endpoint], transport="recording") as client:
            grain = client.get_grain(IDelivery, "g")
            with anyio.fail_after(5):
                assert await grain.ordered(2) == 2
                assert await grain.unordered(3) == -3  # it waits for its result
    requests = [delivery for code, delivery in recording if code == 3]
    assert requests == ["reliable", "reliable_unordered"]


def test_the_recording_transport_is_a_transport() -> None:
    transport: forkcore.interfaces.Transport = RecordingTransport()  # mypy checks it
    assert isinstance(transport, forkcore.interfaces.Transport)
