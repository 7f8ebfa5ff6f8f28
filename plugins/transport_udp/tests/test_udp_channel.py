"""Transport `udp` below the runtime: delivery modes, sizes, limits, junk, handshakes."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from forkcore_transport_udp import envelope
from forkcore_transport_udp.sequencing import DatagramQueue, SequenceFilter
from udp_relay import LossyRelay

import forkcore.plugins
from forkcore.errors import ConnectError
from forkcore.protocol import codec
from forkcore.protocol.messages import OneWay, to_wire

pytestmark = pytest.mark.anyio
WAIT = 5.0


def udp(**options: Any) -> Any:
    return forkcore.plugins.create("transport", "udp", options, "test")


class Accepted:
    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[Any](16)

    async def handler(self, channel: Any) -> None:
        await self.send.send(channel)
        await anyio.sleep_forever()

    async def next(self) -> Any:
        with anyio.fail_after(WAIT):
            return await self.receive.receive()


@asynccontextmanager
async def pair(server: Any = None, client: Any = None, *, relay: dict[str, Any] | None = None
               ) -> AsyncIterator[tuple[Any, Any, Any]]:
    """(client channel, server channel, listener) over udp, optionally through a relay."""
    server = server or udp()
    accepted = Accepted()
    async with server.listen("127.0.0.1:0") as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, accepted.handler)
        endpoint = listener.endpoint
        if relay is not None:
            endpoint = await tg.start(LossyRelay(endpoint, **relay).run)
        async with (client or udp()).connect(endpoint, timeout=WAIT) as channel:
            yield channel, await accepted.next(), listener
        tg.cancel_scope.cancel()


async def collect(channel: Any, until: float = 0.5, limit: int = 100000) -> list[bytes]:
    """Everything that arrives until nothing has for `until` seconds."""
    got: list[bytes] = []
    with anyio.fail_after(WAIT * 2):
        while len(got) < limit:
            with anyio.move_on_after(until) as idle:
                got.append(await channel.receive())
            if idle.cancelled_caught:
                break
    return got


def one_way(key: Any, method: str, n: int) -> bytes:
    return codec.encode(to_wire(OneWay("game.player", key, method, [n], {})))


# -- delivery modes -------------------------------------------------------------------------


async def test_every_delivery_mode_reaches_the_peer() -> None:
    async with pair() as (client, server, _):
        for mode in ("reliable", "reliable_unordered", "unreliable", "sequenced"):
            client.send(mode.encode(), mode)
            server.send(mode.encode(), mode)
        expected = {b"reliable", b"reliable_unordered", b"unreliable", b"sequenced"}
        with anyio.fail_after(WAIT):
            assert {await server.receive() for _ in range(4)} == expected
            assert {await client.receive() for _ in range(4)} == expected


async def test_sequenced_keys_come_from_the_one_way_call() -> None:
    a1, a2 = one_way("alice", "move", 1), one_way("alice", "move", 2)
    assert envelope.sequence_key(a1) == envelope.sequence_key(a2) != 0
    assert envelope.sequence_key(one_way("bob", "move", 1)) != envelope.sequence_key(a1)
    assert envelope.sequence_key(one_way("alice", "turn", 1)) != envelope.sequence_key(a1)
    assert envelope.sequence_key(one_way(7, "move", 1)) != envelope.sequence_key(
        one_way("7", "move", 1))
    assert envelope.sequence_key(b"not cbor at all") == 0


def test_sender_keeps_only_the_newest_pending_value_and_bounds_its_queue() -> None:
    queue = DatagramQueue(limit=4)
    for n in range(10):
        queue.push(envelope.SEQUENCED, one_way("p", "move", n))
    assert len(queue) == 1
    _, message = queue.pop()
    assert envelope.decode(message)[3] == one_way("p", "move", 9)
    for n in range(10):
        queue.push(envelope.UNRELIABLE, b"%d" % n)
    assert len(queue) == 4 and queue.dropped == 6
    assert [envelope.decode(queue.pop()[1])[3] for _ in range(4)] == [b"6", b"7", b"8", b"9"]


def test_sequence_filter_drops_older_per_key_across_wraparound() -> None:
    accept = SequenceFilter().accept
    seqs = [65530, 65533, 65531, 2, 65535, 5, 3, 40]
    assert [accept(1, s) for s in seqs] == [True, True, False, True, False, True, False, True]
    assert accept(2, 4)  # another key has its own last value
    assert not accept(1, 40)  # a duplicate is not newer


async def test_sequenced_over_a_reordering_relay_never_goes_backwards() -> None:
    async with pair(relay={"seed": 3, "loss": 0.1, "duplicate": 0.1, "jitter": 0.01}) \
            as (client, server, _):
        keys = ["a", "b", "c"]
        for n in range(150):
            for key in keys:
                client.send(one_way(key, "move", n), "sequenced")
            await anyio.sleep(0.001)
        got = await collect(server)
    by_key: dict[Any, list[int]] = {}
    for body in got:
        message = codec.decode(body)
        by_key.setdefault(message[2], []).append(message[4][0])
    assert set(by_key) == set(keys)
    for values in by_key.values():
        assert values == sorted(set(values))
        assert len(values) > 25  # 10% are lost, and many overtaken (10 ms jitter) dropped


async def test_a_message_too_big_for_a_datagram_goes_on_a_stream_and_blocks_nothing() -> None:
    big = os.urandom(40000)  # bigger than a packet, even on loopback
    async with pair() as (client, server, _):
        for n in range(5):
            client.send(b"small %d" % n, "unreliable")
        client.send(big, "unreliable")
        client.send(one_way("p", "move", 1), "sequenced")
        client.send(b"x" * 30000 + one_way("p", "move", 2), "sequenced")
        for n in range(5, 10):
            client.send(b"small %d" % n, "unreliable")
        got = await collect(server)
    assert big in got
    assert [b for b in got if b.startswith(b"small")] == [b"small %d" % n for n in range(10)]
    assert len(got) == 13


async def test_datagram_payload_limit_follows_packet_size() -> None:
    async with pair(udp(max_datagram_size=1200), udp(max_datagram_size=1200)) as (client, _, _):
        assert 1150 <= client.quic.max_datagram_payload() <= 1170
    async with pair() as (client, _, _):  # loopback default
        assert client.quic.max_datagram_payload() > 16000


async def test_two_mebibyte_frames_both_ways_with_1200_byte_packets() -> None:
    big = random.Random(1).randbytes(2 * 1024 * 1024)
    options = {"max_datagram_size": 1200}
    async with pair(udp(**options), udp(**options)) as (client, server, _):
        client.send(big)
        with anyio.fail_after(20):
            assert await server.receive() == big
            server.send(big[::-1])
            assert await client.receive() == big[::-1]


# -- bounded resources ----------------------------------------------------------------------


async def test_a_reader_that_does_not_read_holds_back_the_sender() -> None:
    """Flow control follows what the application took: a server that stops reading makes
    the client's data wait in the client, not pile up in the server."""
    options = {"max_frame_size": 1024}
    async with pair(udp(**options), udp(**options)) as (client, server, _):
        frames = [os.urandom(1000) for _ in range(2000)]
        for body in frames:
            client.send(body)
        await anyio.sleep(0.5)
        window = 2 * (1024 + 4 + 65536)
        unread = sum(size for _, _, size in server._frames)
        assert unread <= window
        assert client._backlog() > 1000 * 1000  # the rest waits at the sender
        with anyio.fail_after(WAIT * 2):
            assert [await server.receive() for _ in frames] == frames


async def test_many_unordered_messages_with_few_streams_allowed() -> None:
    async with pair(udp(max_streams=2), udp(max_streams=2)) as (client, server, _):
        for n in range(200):
            client.send(b"%d" % n, "reliable_unordered")
        got = await collect(server)
    assert sorted(got, key=int) == [b"%d" % n for n in range(200)]
    assert server.quic._local_max_streams_uni.sent - server.quic.uni_released <= 2


async def test_junk_flood_does_not_stop_other_clients() -> None:
    rng = random.Random(9)
    async with pair() as (client, server, listener):
        host, port = listener.endpoint.rsplit(":", 1)
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        junk.setblocking(False)

        async def flood() -> None:
            for n in range(6000):
                size = rng.choice([1, 20, 100, 1200, 1300])
                data = bytearray(rng.randbytes(size))
                if n % 3 == 0 and size >= 1200:  # looks like a QUIC v1 Initial
                    data[0:5] = b"\xc0\x00\x00\x00\x01"
                    data[5] = 8
                try:
                    junk.sendto(bytes(data), (host, int(port)))
                except BlockingIOError:
                    await anyio.sleep(0.001)
                if n % 50 == 0:
                    await anyio.sleep(0)

        async def echo() -> None:
            while True:
                server.send(await server.receive())

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(echo)
                tg.start_soon(flood)
                for n in range(200):
                    client.send(b"call %d" % n)
                    assert await client.receive() == b"call %d" % n
                tg.cancel_scope.cancel()
        junk.close()
        assert listener.dropped > 1000
        assert listener.connection_count == 1


async def test_handshakes_per_address_are_bounded() -> None:
    server = udp(max_handshakes_per_address=3, handshake_timeout=0.5)
    async with server.listen("127.0.0.1:0") as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, Accepted().handler)
        host, port = listener.endpoint.rsplit(":", 1)
        address = (host, int(port))
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as sock:
            for _ in range(10):  # ten handshakes started, none finished, from one address
                quic = QuicConnection(configuration=QuicConfiguration(
                    is_client=True, alpn_protocols=["forkcore/1"]))
                quic.connect(address, anyio.current_time())
                for data, _ in quic.datagrams_to_send(anyio.current_time()):
                    await sock.sendto(data, *address)
            await anyio.sleep(0.1)
            assert listener.connection_count == 3
            # the address is not heard until they time out...
            with pytest.raises(ConnectError):
                async with udp().connect(listener.endpoint, timeout=0.3):
                    pass
            await anyio.sleep(0.5)
            assert listener.connection_count == 0
            # ...and then it is again
            async with udp().connect(listener.endpoint, timeout=WAIT):
                pass
        tg.cancel_scope.cancel()


# -- liveness --------------------------------------------------------------------------------


async def test_idle_connections_outlive_the_idle_timeout_thanks_to_pings() -> None:
    options = {"idle_timeout": 0.6, "ping_interval": 0.2}
    relay = {"seed": 1, "loss": 0.0, "duplicate": 0.0, "jitter": 0.0}
    async with pair(udp(**options), udp(**options), relay=relay) as (client, server, _):
        await anyio.sleep(1.0)  # idle, far past the idle timeout: the pings keep it up
        client.send(b"still here")
        with anyio.fail_after(WAIT):
            assert await server.receive() == b"still here"
        server.send(b"and here")
        with anyio.fail_after(WAIT):
            assert await client.receive() == b"and here"


# -- aioquic internals we rely on ---------------------------------------------------------------


def test_the_aioquic_internals_this_plugin_uses_exist() -> None:
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for name in ("_local_max_data", "_local_max_streams_bidi", "_local_max_streams_uni",
                 "_local_max_stream_data_bidi_local", "_local_max_stream_data_bidi_remote",
                 "_local_max_stream_data_uni", "_close_event", "_remote_max_datagram_frame_size",
                 "_datagrams_pending", "_streams", "_state", "_write_stream_limits",
                 "_write_connection_limits"):
        assert hasattr(quic, name), name
    assert {"value", "sent", "used"} <= set(vars(quic._local_max_data))
