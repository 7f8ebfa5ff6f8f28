"""One Channel/Listener test suite, run against every stream transport (`memory`, `tcp`).

Each test builds its transport through the plugin registry, listens on an ephemeral
127.0.0.1 endpoint and talks to it through `Transport.connect`. The server side of a
connection is handed to the test by a "parking" handler that keeps the connection open
until the test releases it. Every wait is bounded with `anyio.fail_after`.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

import forkcore.plugins
from forkcore.errors import ConnectError, ProtocolError
from forkcore.protocol.framing import PREAMBLE

pytestmark = pytest.mark.anyio

TRANSPORTS = ["memory", "tcp", "udp"]
WAIT = 5.0  # generous bound for anything that should happen at once
PROMPT = 2.0  # bound for "promptly": a close must be noticed well within this
MAX_SMALL = 1024


@pytest.fixture(params=TRANSPORTS)
def transport_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_transport(name: str, **options: Any) -> Any:
    return forkcore.plugins.create("transport", name, options, "test")


class Parked:
    """The server side of one accepted connection, held open until `release` is set."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.release = anyio.Event()


class Served:
    def __init__(self, listener: Any, accepted: MemoryObjectReceiveStream[Parked]) -> None:
        self.listener = listener
        self.endpoint: str = listener.endpoint
        self._accepted = accepted

    async def accept(self) -> Parked:
        with anyio.fail_after(WAIT):
            return await self._accepted.receive()


@asynccontextmanager
async def serving(
    transport: Any, handler: Callable[[Any], Awaitable[None]] | None = None
) -> AsyncIterator[Served]:
    """Listen on 127.0.0.1:0 and serve with `handler` (default: park each connection)."""
    send_accepted, accepted = anyio.create_memory_object_stream[Parked](1000)

    async def park(channel: Any) -> None:
        parked = Parked(channel)
        await send_accepted.send(parked)
        await parked.release.wait()

    async with transport.listen("127.0.0.1:0") as listener:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handler or park)
            try:
                yield Served(listener, accepted)
            finally:
                tg.cancel_scope.cancel()


async def echo(channel: Any) -> None:
    """Handler: send every frame back until the peer goes away."""
    while True:
        try:
            body = await channel.receive()
        except ConnectError:
            return
        channel.send(body)


async def receive_n(channel: Any, n: int) -> list[bytes]:
    out = []
    with anyio.fail_after(WAIT):
        for _ in range(n):
            out.append(await channel.receive())
    return out


@contextmanager
def dead_tcp_endpoint() -> Any:
    """A 127.0.0.1 port that is bound (so nobody else takes it) but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# -- ordering ----------------------------------------------------------------------------


async def test_frames_round_trip_in_order_both_directions(transport_name: str) -> None:
    transport = make_transport(transport_name)
    async with serving(transport) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            server = (await served.accept()).channel
            for round_ in range(20):
                # one frame at a time, waiting for each, in both directions
                client.send(b"c%d" % round_)
                with anyio.fail_after(WAIT):
                    assert await server.receive() == b"c%d" % round_
                server.send(b"s%d" % round_)
                with anyio.fail_after(WAIT):
                    assert await client.receive() == b"s%d" % round_
            # a batch each way, interleaved with the other side's batch
            to_server = [b"up-%d-" % i + bytes([i % 256]) * i for i in range(200)]
            to_client = [b"down-%d-" % i + bytes([(i * 7) % 256]) * (200 - i) for i in range(200)]
            for a, b in zip(to_server, to_client, strict=True):
                client.send(a)
                server.send(b)
            assert await receive_n(server, len(to_server)) == to_server
            assert await receive_n(client, len(to_client)) == to_client


async def test_many_sends_in_one_loop_turn_all_arrive_in_order(transport_name: str) -> None:
    transport = make_transport(transport_name)
    rng = random.Random(1234)
    frames = [rng.randbytes(rng.randrange(0, 300)) for _ in range(5000)]
    async with serving(transport) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            server = (await served.accept()).channel
            # no checkpoint between these sends: all of them are queued in one loop turn
            for body in frames:
                client.send(body)
            assert await receive_n(server, len(frames)) == frames
            for body in reversed(frames):
                server.send(body)
            assert await receive_n(client, len(frames)) == list(reversed(frames))
            # and the channel is still usable afterwards
            client.send(b"after")
            with anyio.fail_after(WAIT):
                assert await server.receive() == b"after"


async def test_large_and_empty_frames_round_trip(transport_name: str) -> None:
    transport = make_transport(transport_name)
    big = random.Random(99).randbytes(2 * 1024 * 1024)
    frames = [b"", big, b"", b"x", big[::-1], b""]
    async with serving(transport, echo) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            for body in frames:
                client.send(body)
            got = await receive_n(client, len(frames))
            assert [len(b) for b in got] == [len(b) for b in frames]
            assert got == frames
            # one at a time too, waiting for each echo
            for body in frames:
                client.send(body)
                with anyio.fail_after(WAIT):
                    assert await client.receive() == body


# -- frame size limit ----------------------------------------------------------------------


async def test_frame_at_the_limit_passes(transport_name: str) -> None:
    transport = make_transport(transport_name, max_frame_size=MAX_SMALL)
    async with serving(transport, echo) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            body = b"\x5a" * MAX_SMALL
            client.send(body)
            with anyio.fail_after(WAIT):
                assert await client.receive() == body


async def test_oversized_frame_is_a_protocol_error_at_the_server(transport_name: str) -> None:
    transport = make_transport(transport_name, max_frame_size=MAX_SMALL)
    async with serving(transport) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            server = (await served.accept()).channel
            client.send(b"ok")
            with anyio.fail_after(WAIT):
                assert await server.receive() == b"ok"
            client.send(b"\x01" * (MAX_SMALL + 1))
            with anyio.fail_after(WAIT), pytest.raises(ProtocolError):
                await server.receive()


async def test_oversized_frame_is_a_protocol_error_at_the_client(transport_name: str) -> None:
    transport = make_transport(transport_name, max_frame_size=MAX_SMALL)
    async with serving(transport) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            server = (await served.accept()).channel
            server.send(b"\x02" * (4 * MAX_SMALL))
            with anyio.fail_after(WAIT), pytest.raises(ProtocolError):
                await client.receive()


# -- closing -------------------------------------------------------------------------------


async def test_client_close_is_seen_by_the_server(transport_name: str) -> None:
    transport = make_transport(transport_name)
    async with serving(transport) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            server = (await served.accept()).channel
            client.send(b"last words")
            with anyio.fail_after(WAIT):
                assert await server.receive() == b"last words"
            async with anyio.create_task_group() as tg:
                result: list[BaseException] = []

                async def blocked_receive() -> None:
                    try:
                        await server.receive()
                    except BaseException as exc:  # recorded and checked below
                        result.append(exc)
                        if not isinstance(exc, Exception):
                            raise

                tg.start_soon(blocked_receive)
                await anyio.sleep(0)  # let the server side block in receive()
                await client.aclose()
                with anyio.fail_after(PROMPT):
                    while not result:
                        await anyio.sleep(0.01)
            assert len(result) == 1 and isinstance(result[0], ConnectError), result
            with anyio.fail_after(PROMPT), pytest.raises(ConnectError):
                await server.receive()


async def test_leaving_connect_block_is_seen_by_the_server(transport_name: str) -> None:
    transport = make_transport(transport_name)
    async with serving(transport) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            server = (await served.accept()).channel
            client.send(b"bye")
        # the frame sent just before leaving is flushed, then the close is seen
        with anyio.fail_after(PROMPT):
            assert await server.receive() == b"bye"
        with anyio.fail_after(PROMPT), pytest.raises(ConnectError):
            await server.receive()


async def test_server_close_is_seen_by_the_client(transport_name: str) -> None:
    transport = make_transport(transport_name)
    async with serving(transport) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            parked = await served.accept()
            parked.channel.send(b"from server")
            with anyio.fail_after(WAIT):
                assert await client.receive() == b"from server"
            parked.release.set()  # the handler returns: the server closes the connection
            with anyio.fail_after(PROMPT), pytest.raises(ConnectError):
                await client.receive()


async def test_server_aclose_is_seen_by_the_client(transport_name: str) -> None:
    transport = make_transport(transport_name)
    async with serving(transport) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            parked = await served.accept()
            await parked.channel.aclose()
            with anyio.fail_after(PROMPT), pytest.raises(ConnectError):
                await client.receive()


async def test_send_after_close_raises_connect_error(transport_name: str) -> None:
    transport = make_transport(transport_name)
    async with serving(transport) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            await served.accept()
            await client.aclose()
            with pytest.raises(ConnectError):
                client.send(b"too late")


# -- listener robustness -----------------------------------------------------------------


async def test_failing_handler_does_not_stop_the_listener(transport_name: str) -> None:
    transport = make_transport(transport_name)
    connections = 0

    async def handler(channel: Any) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await channel.receive()
            raise RuntimeError("handler blew up (on purpose, in a test)")
        await echo(channel)

    async with serving(transport, handler) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as first:
            first.send(b"trigger")
            # the failure ends that one connection...
            with anyio.fail_after(PROMPT), pytest.raises(ConnectError):
                await first.receive()
        # ...and nothing else: new connections are accepted and served
        for attempt in range(3):
            async with transport.connect(served.endpoint, timeout=WAIT) as again:
                again.send(b"still there %d" % attempt)
                with anyio.fail_after(WAIT):
                    assert await again.receive() == b"still there %d" % attempt
        assert connections == 4


async def test_connect_where_nothing_listens_raises_connect_error(transport_name: str) -> None:
    transport = make_transport(transport_name)
    if transport_name == "tcp":
        with dead_tcp_endpoint() as endpoint:
            with anyio.fail_after(WAIT), pytest.raises(ConnectError):
                async with transport.connect(endpoint, timeout=WAIT):
                    pass
    # an endpoint that was listened on and is not any more (for tcp the bound-but-not-
    # listening port above is the exact case: a closed port could be reused by anyone)
    if transport_name != "tcp":
        async with transport.listen("127.0.0.1:0") as listener:
            endpoint = listener.endpoint
        with anyio.fail_after(WAIT), pytest.raises(ConnectError):
            async with transport.connect(endpoint, timeout=WAIT):
                pass


async def test_stop_accepting_refuses_new_connections_keeps_existing(transport_name: str) -> None:
    transport = make_transport(transport_name)
    handled: list[str] = []
    serve_returned = anyio.Event()

    async def handler(channel: Any) -> None:
        handled.append(channel.peer)
        await echo(channel)

    async with transport.listen("127.0.0.1:0") as listener:
        endpoint = listener.endpoint

        async def run_serve() -> None:
            await listener.serve(handler)
            serve_returned.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_serve)
            async with transport.connect(endpoint, timeout=WAIT) as existing:
                existing.send(b"before")
                with anyio.fail_after(WAIT):
                    assert await existing.receive() == b"before"
                assert len(handled) == 1

                listener.stop_accepting()

                # New connections are refused. The listening socket of a network
                # transport closes once the accept loop has seen the request, so a
                # connection may still be set up by the kernel in between: such a
                # connection must never reach the handler, and must die promptly.
                refused = False
                with anyio.fail_after(WAIT):
                    while not refused:
                        try:
                            async with transport.connect(endpoint, timeout=WAIT) as late:
                                late.send(b"let me in")
                                with anyio.fail_after(PROMPT), pytest.raises(ConnectError):
                                    await late.receive()
                        except ConnectError:
                            refused = True
                        else:
                            await anyio.sleep(0.01)
                assert len(handled) == 1

                # the existing connection keeps working, both ways, many times
                for i in range(50):
                    existing.send(b"after %d" % i)
                assert await receive_n(existing, 50) == [b"after %d" % i for i in range(50)]
                assert not serve_returned.is_set()
            # once the accepted connection has ended, serve() returns
            with anyio.fail_after(WAIT):
                await serve_returned.wait()
            assert len(handled) == 1


# -- tcp: the bytes on the wire -------------------------------------------------------------


async def test_tcp_wire_format_and_coalesced_burst() -> None:
    """Frames are a 4-byte big-endian length and the body; a burst of sends made in one
    loop turn arrives complete and in order on a raw socket."""
    transport = make_transport("tcp")
    frames = [b"frame-%d" % i * (i % 5) for i in range(1000)]
    expected = PREAMBLE + b"".join(struct.pack(">I", len(f)) + f for f in frames)
    async with serving(transport) as served:
        host, port = served.endpoint.rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as raw:
            server = (await served.accept()).channel
            for body in frames:
                server.send(body)
            received = bytearray()
            with anyio.fail_after(WAIT):
                while len(received) < len(expected):
                    received += await raw.receive()
            assert bytes(received) == expected


async def test_tcp_frames_sent_while_a_large_one_is_still_going_out_stay_in_order() -> None:
    """tcp writes the first frame of a loop turn at once when the writer task is idle.
    A frame the kernel takes only part of (the rest waits for the writer) must not be
    overtaken by, or mixed with, frames sent in later loop turns while it goes out to a
    reader that keeps up only slowly."""
    transport = make_transport("tcp")
    rng = random.Random(7)
    frames: list[bytes] = []
    for i in range(8):
        frames.append(rng.randbytes(rng.randrange(3, 6) * 1024 * 1024))
        frames.append(b"small-%d" % i)
    async with serving(transport) as served:
        async with transport.connect(served.endpoint, timeout=WAIT) as client:
            server = (await served.accept()).channel
            got: list[bytes] = []

            async def read_slowly() -> None:
                with anyio.fail_after(WAIT * 4):
                    while len(got) < len(frames):
                        got.append(await server.receive())
                        await anyio.sleep(0.01)

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_slowly)
                for body in frames:
                    client.send(body)
                    await anyio.sleep(0.002)  # each send in a loop turn of its own
            assert [len(b) for b in got] == [len(b) for b in frames]
            assert got == frames


class _TrickleStream:
    """A byte stream that takes at most `take` bytes at once through `try_send`, and
    whose `send` (the writer task's) waits until `release` is set: what StreamChannel
    wrote, in order, is in `wire`."""

    def __init__(self, take: int) -> None:
        self.take = take
        self.wire = bytearray()
        self.release = anyio.Event()
        self.sending = anyio.Event()

    def try_send(self, data: bytes) -> int:
        taken = data[:self.take]
        self.wire += taken
        return len(taken)

    async def send(self, data: bytes) -> None:
        self.sending.set()
        await self.release.wait()
        self.wire += data

    async def receive(self) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


async def test_a_frame_written_in_part_is_not_overtaken() -> None:
    """StreamChannel writes the first frame of a loop turn at once (`try_send`) when the
    writer task is idle; the rest of a frame the stream took only in part goes through
    the writer, and frames sent meanwhile wait behind it instead of cutting in."""
    from forkcore.transport import HEADER, StreamChannel

    stream = _TrickleStream(take=10)
    frames = [b"A" * 1000, b"B" * 20, b"C" * 30]
    with anyio.fail_after(WAIT):
        async with StreamChannel.open(stream, "fake") as channel:
            channel.send(frames[0])  # 10 bytes go at once, the rest to the writer
            await stream.sending.wait()  # the writer is inside send() with the rest
            channel.send(frames[1])  # a new loop turn, and nothing queued: still waits
            await anyio.lowlevel.checkpoint()
            channel.send(frames[2])
            stream.release.set()
    assert bytes(stream.wire) == PREAMBLE + b"".join(HEADER.pack(len(f)) + f for f in frames)


async def test_tcp_frames_split_across_writes_are_reassembled() -> None:
    transport = make_transport("tcp")
    frames = [b"", b"a", b"hello world", bytes(range(256)) * 10]
    wire = PREAMBLE + b"".join(struct.pack(">I", len(f)) + f for f in frames)
    async with serving(transport) as served:
        host, port = served.endpoint.rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as raw:
            server = (await served.accept()).channel
            rng = random.Random(7)
            pos = 0
            while pos < len(wire):
                step = rng.randrange(1, 9)
                await raw.send(wire[pos:pos + step])
                pos += step
                await anyio.sleep(0)
            assert await receive_n(server, len(frames)) == frames


async def test_tcp_oversized_length_prefix_fails_before_the_body() -> None:
    """A 4 GB length prefix is refused as soon as its 4 bytes arrive: no body is needed."""
    transport = make_transport("tcp")
    async with serving(transport) as served:
        host, port = served.endpoint.rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as raw:
            server = (await served.accept()).channel
            await raw.send(PREAMBLE + b"\xff\xff\xff\xff")
            with anyio.fail_after(PROMPT), pytest.raises(ProtocolError):
                await server.receive()
