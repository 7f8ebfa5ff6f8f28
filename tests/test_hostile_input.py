"""Hostile peers against a real TCP server, while a well-behaved client keeps calling.

Every attack runs on raw `anyio.connect_tcp` sockets against a `forkcore.Server` on
127.0.0.1, concurrently with a `forkcore.Client` whose calls must keep succeeding. Each
hostile connection must be closed by the server: we read it until EOF (or reset) with a
deadline. Unless a test says otherwise the server keeps its default handshake timeout
(5 s) and the deadline is shorter, so a connection closed in time was closed because of
what it sent, not by the handshake timer.

The property tests at the end feed arbitrary bytes to the sans-IO layer: the only
failure it may raise is `ProtocolError`.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import logging
import random
import struct
import time
import typing
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import attrs
import cbor2
import pytest
from grains_sample import Counter, ICounter, Point
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forkcore
from forkcore.errors import ProtocolError
from forkcore.protocol import codec
from forkcore.protocol.connection import ProtocolConnection
from forkcore.protocol.framing import DEFAULT_MAX_FRAME_SIZE, PREAMBLE, FrameDecoder
from forkcore.protocol.messages import (
    PROTOCOL_VERSION,
    Goodbye,
    Hello,
    Message,
    OneWay,
    Ping,
    Request,
    Response,
    Welcome,
    to_wire,
)
from forkcore.server.catalog import activation_slot

WAIT = 5.0  # bound for anything that should happen at once
CLOSE_DEADLINE = 3.0  # a hostile connection must be closed within this (< handshake timeout)
WORKERS = 4  # concurrent well-behaved callers
MESSAGE_TYPES = typing.get_args(Message)


# -- helpers -------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


async def connect_raw(endpoint: str) -> anyio.abc.SocketStream:
    """A raw connection that has sent the preamble (section 2 of docs/protocol.md), so
    what a test sends next is judged as frames and messages."""
    stream = await anyio.connect_tcp(*split(endpoint))
    await stream.send(PREAMBLE)
    return stream


def body_of(msg: Any) -> bytes:
    """The frame body for `msg`, bypassing the state machine (a hostile peer may send
    anything at any time)."""
    return codec.encode(to_wire(msg))


def hello(version: int = PROTOCOL_VERSION, client_id: str = "hostile") -> Hello:
    return Hello(version, client_id, ())


def split(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host, int(port)


class GoodLoad:
    """Well-behaved callers, each adding 1 to its own counter in a loop and checking the
    running total, so a lost, duplicated or failed call is noticed."""

    def __init__(self, client: forkcore.Client) -> None:
        self.client = client
        self.ok = 0
        self.errors: list[str] = []
        self.stop = anyio.Event()

    async def worker(self, index: int) -> None:
        grain = self.client.get_grain(ICounter, f"good-{index}")
        expected = 0
        try:
            while not self.stop.is_set():
                with anyio.fail_after(WAIT):
                    value = await grain.add(1)
                expected += 1
                if value != expected:
                    self.errors.append(f"worker {index}: add returned {value}, expected {expected}")
                    return
                self.ok += 1
                await anyio.sleep(0.002)
        except Exception as exc:  # recorded; the test asserts there are none
            self.errors.append(f"worker {index}: {type(exc).__name__}: {exc}")

    async def progress(self, calls: int) -> None:
        """Wait until `calls` more calls have succeeded (or a worker failed)."""
        target = self.ok + calls
        with anyio.fail_after(WAIT):
            while self.ok < target and not self.errors:
                await anyio.sleep(0.005)
        assert not self.errors, self.errors


@asynccontextmanager
async def target_server(**options: Any) -> AsyncIterator[forkcore.Server]:
    async with forkcore.Server(id="hostile-target", transport="tcp", grains=[Counter],
                               **options) as server:
        yield server


async def under_attack(
    server: forkcore.Server, attack: Callable[[str], Awaitable[None]]
) -> None:
    """Run `attack(endpoint)` while a good client calls the server the whole time; check
    the good calls all succeed, before, during and after, and the server stays up."""
    assert server.endpoint is not None
    endpoint = server.endpoint
    async with forkcore.Client(servers=[endpoint], request_timeout=WAIT) as client:
        load = GoodLoad(client)
        async with anyio.create_task_group() as tg:
            for i in range(WORKERS):
                tg.start_soon(load.worker, i)
            await load.progress(WORKERS)
            await attack(endpoint)
            await load.progress(2 * WORKERS)
            load.stop.set()
        assert load.errors == []
        # every good call landed exactly once
        totals = [await client.get_grain(ICounter, f"good-{i}").get() for i in range(WORKERS)]
        assert sum(totals) == load.ok
    # the server is up and serves a brand-new client
    async with forkcore.Client(servers=[endpoint], request_timeout=WAIT) as fresh:
        with anyio.fail_after(WAIT):
            assert await fresh.get_grain(ICounter, "fresh").add(5) == 5


async def read_until_closed(stream: anyio.abc.SocketStream, deadline: float,
                            what: str) -> bytes:
    """Everything the server sends until it closes the connection (EOF or reset)."""
    data = bytearray()
    with anyio.move_on_after(deadline):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return bytes(data)
    raise AssertionError(f"the server kept the connection open for {deadline}s after {what}")


async def send_expect_close(endpoint: str, payload: bytes, what: str,
                            deadline: float = CLOSE_DEADLINE) -> bytes:
    async with await connect_raw(endpoint) as stream:
        try:
            await stream.send(payload)
        except anyio.BrokenResourceError:
            return b""  # already closed by the server
        return await read_until_closed(stream, deadline, what)


async def handshake(stream: anyio.abc.SocketStream) -> Welcome:
    """Do a correct handshake on a raw socket; the server's Welcome."""
    proto = ProtocolConnection("client")
    await stream.send(frame(proto.encode(hello())))
    decoder = FrameDecoder(preamble=True)
    with anyio.fail_after(WAIT):
        while True:
            frames = decoder.feed(await stream.receive())
            if frames:
                break
    assert len(frames) == 1 and decoder.buffered == 0
    welcome = proto.decode(frames[0])
    assert isinstance(welcome, Welcome)
    return welcome


async def handshake_then_expect_close(endpoint: str, payload: bytes, what: str,
                                      deadline: float = CLOSE_DEADLINE) -> bytes:
    async with await connect_raw(endpoint) as stream:
        welcome = await handshake(stream)
        assert welcome.server_id == "hostile-target"
        try:
            await stream.send(payload)
        except anyio.BrokenResourceError:
            return b""
        return await read_until_closed(stream, deadline, what)


async def all_expect_close(endpoint: str, payloads: Sequence[bytes], *,
                           after_handshake: bool = False) -> None:
    """Each payload on its own connection, all at once; every one must be closed."""
    attempt = handshake_then_expect_close if after_handshake else send_expect_close
    async with anyio.create_task_group() as tg:
        for i, payload in enumerate(payloads):
            tg.start_soon(attempt, endpoint, payload, f"hostile payload #{i} {payload[:40]!r}")


def judgeable(data: bytes, *, after_handshake: bool) -> bool:
    """Whether `data` alone is enough to see it breaks the protocol (as opposed to a
    stalled partial frame, which only a timer can end)."""
    proto = ProtocolConnection("server")
    if after_handshake:
        proto.decode(body_of(hello()))
        proto.encode(Welcome(PROTOCOL_VERSION, "x", None, {}, ()))
    try:
        frames = FrameDecoder(DEFAULT_MAX_FRAME_SIZE).feed(data)
    except ProtocolError:
        return True
    if not frames:
        return False
    try:
        msg = proto.decode(frames[0])
    except ProtocolError:
        return True
    raise AssertionError(f"test data decodes to a valid message by chance: {msg!r}")


# -- attacks -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_random_bytes() -> None:
    rng = random.Random(20240611)

    def blobs(count: int, after_handshake: bool) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < count:
            blob = rng.randbytes(rng.randrange(4, 4096))
            # stalled partial frames are test_stalled_half_frames' business
            if judgeable(blob, after_handshake=after_handshake):
                out.append(blob)
        return out

    raw_before = blobs(16, after_handshake=False)
    raw_after = blobs(8, after_handshake=True)
    # random bodies inside well-formed frames: garbage CBOR, or CBOR that is not a message
    framed_before = [frame(rng.randbytes(rng.randrange(0, 2048))) for _ in range(16)]
    framed_after = [frame(rng.randbytes(rng.randrange(0, 2048))) for _ in range(8)]
    for blob in framed_before:
        assert judgeable(blob, after_handshake=False)
    for blob in framed_after:
        assert judgeable(blob, after_handshake=True)

    async def attack(endpoint: str) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(all_expect_close, endpoint, raw_before + framed_before)
            tg.start_soon(lambda: all_expect_close(endpoint, raw_after + framed_after,
                                                   after_handshake=True))

    async with target_server() as server:
        await under_attack(server, attack)


@pytest.mark.anyio
async def test_huge_length_prefix() -> None:
    payloads = [
        b"\xff\xff\xff\xff",
        struct.pack(">I", 4_000_000_000),
        struct.pack(">I", 4_000_000_000) + b"\x00" * 64,
        struct.pack(">I", DEFAULT_MAX_FRAME_SIZE + 1) + b"\x00" * 64,
    ]

    async def attack(endpoint: str) -> None:
        await all_expect_close(endpoint, payloads)
        await all_expect_close(endpoint, payloads, after_handshake=True)

    async with target_server() as server:
        await under_attack(server, attack)


@pytest.mark.anyio
async def test_truncated_cbor_in_a_valid_frame() -> None:
    hello_body = body_of(hello())
    request_body = body_of(Request(1, "test.counter", "k", "add", [1], {}, 5.0))
    before = [frame(hello_body[:cut]) for cut in (1, len(hello_body) // 2, len(hello_body) - 1)]
    after = [frame(request_body[:cut])
             for cut in (1, len(request_body) // 2, len(request_body) - 1)]

    async def attack(endpoint: str) -> None:
        await all_expect_close(endpoint, before)
        await all_expect_close(endpoint, after, after_handshake=True)

    async with target_server() as server:
        await under_attack(server, attack)


@pytest.mark.anyio
async def test_valid_frame_that_is_not_a_message() -> None:
    not_messages = [
        cbor2.dumps(42),
        cbor2.dumps("hello"),
        cbor2.dumps({"type": 1}),
        cbor2.dumps([]),
        cbor2.dumps([99, 1, 2]),
        cbor2.dumps([True, 1, "x", [], None]),
        cbor2.dumps([1.0, 1, "x", [], None]),
        cbor2.dumps([1, 1, "x"]),  # Hello with too few fields
        cbor2.dumps([1, "1", "x", [], None]),  # Hello with a string version
        cbor2.dumps([1, 1, "x", "features", None]),
        cbor2.dumps([3, 1, "test.counter", "k", "add"]),  # Request with too few fields
        cbor2.dumps([3, -1, "test.counter", "k", "add", [], {}, None]),  # bad request id
        cbor2.dumps([3, 1, "test.counter", None, "add", [], {}, None]),  # bad key
        cbor2.dumps([3, 1, "test.counter", "k", "add", [], {1: 2}, None]),  # bad kwargs
        cbor2.dumps(cbor2.CBORTag(6000, [1, 1, "x", [], None])),  # unknown tag
        cbor2.dumps([1, 1, cbor2.CBORTag(40000, ["os.system", {}]), [], None]),
        b"\x9f\x01\xff",  # indefinite-length array
        b"\x82\x01\x01\x00",  # a two-field "Hello", then a stray byte
    ]
    nested: Any = []
    for _ in range(500):  # nested far deeper than the server's max_depth
        nested = [nested]
    not_messages.append(cbor2.dumps([3, 1, "test.counter", "k", "echo", [nested], {}, None]))
    # messages a client must never send
    not_messages_after = [
        *not_messages,
        body_of(Welcome(PROTOCOL_VERSION, "fake", None, {}, ())),
        body_of(Response(1, "forged")),
        body_of(hello()),  # a second Hello
    ]

    async def attack(endpoint: str) -> None:
        await all_expect_close(endpoint, [frame(b) for b in not_messages])
        await all_expect_close(endpoint, [frame(b) for b in not_messages_after],
                               after_handshake=True)

    async with target_server() as server:
        await under_attack(server, attack)


def test_trailing_bytes_after_the_message_are_a_protocol_error() -> None:
    """A frame body is exactly one CBOR item: a valid message followed by more bytes is
    not a message (the sans-IO check behind the network test below)."""
    for extra in (b"\x00", b"\xff", body_of(Ping(1, 0.0))):
        with pytest.raises(ProtocolError):
            ProtocolConnection("server").decode(body_of(hello()) + extra)
        opened = ProtocolConnection("server")
        opened.decode(body_of(hello()))
        opened.encode(Welcome(PROTOCOL_VERSION, "x", None, {}, ()))
        with pytest.raises(ProtocolError):
            opened.decode(body_of(Ping(1, 0.0)) + extra)


@pytest.mark.anyio
async def test_valid_message_with_trailing_bytes_in_its_frame() -> None:
    extras = (b"\x00", b"\xff", body_of(Ping(1, 0.0)))
    before = [frame(body_of(hello()) + extra) for extra in extras]
    after = [frame(body_of(Ping(1, 0.0)) + extra) for extra in extras]

    async def attack(endpoint: str) -> None:
        await all_expect_close(endpoint, before)
        await all_expect_close(endpoint, after, after_handshake=True)

    async with target_server() as server:
        await under_attack(server, attack)


@pytest.mark.anyio
async def test_frames_before_handshake_run_nothing() -> None:
    smuggled = [
        body_of(Ping(1, 0.0)),
        body_of(Request(1, "test.counter", "smuggled", "add", [1000], {}, 5.0)),
        body_of(OneWay("test.counter", "smuggled", "bump", [1000], {})),
        body_of(Goodbye("bye")),
        body_of(Welcome(PROTOCOL_VERSION, "fake", None, {}, ())),
    ]
    payloads = [frame(b) for b in smuggled]
    # several frames in one write: the first one already breaks the handshake
    payloads.append(b"".join(frame(b) for b in smuggled[1:3]) + frame(body_of(hello())))

    async def attack(endpoint: str) -> None:
        await all_expect_close(endpoint, payloads)

    async with target_server() as server:
        await under_attack(server, attack)
        assert server.endpoint is not None
        async with forkcore.Client(servers=[server.endpoint]) as check:
            with anyio.fail_after(WAIT):
                assert await check.get_grain(ICounter, "smuggled").get() == 0


@pytest.mark.anyio
async def test_http_request() -> None:
    payloads = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello start
    ]

    async def attack(endpoint: str) -> None:
        await all_expect_close(endpoint, payloads)
        await all_expect_close(endpoint, payloads[:1], after_handshake=True)

    async with target_server() as server:
        await under_attack(server, attack)


@pytest.mark.anyio
async def test_wrong_protocol_version_hello() -> None:
    versions = [0, PROTOCOL_VERSION + 1, 999, -1, 2**40]
    payloads = [frame(body_of(hello(version=v))) for v in versions]

    async def attack(endpoint: str) -> None:
        await all_expect_close(endpoint, payloads)

    async with target_server() as server:
        await under_attack(server, attack)


@pytest.mark.anyio
async def test_stalled_half_frames() -> None:
    """50 connections each send a length prefix of 100 and 10 bytes, then nothing: the
    handshake timer closes them all, and meanwhile the good client is served."""
    handshake_timeout = 0.5
    payload = struct.pack(">I", 100) + b"\x00" * 10
    opened = 0

    async def stall(endpoint: str) -> None:
        nonlocal opened
        async with await connect_raw(endpoint) as stream:
            await stream.send(payload)
            opened += 1
            await read_until_closed(stream, handshake_timeout + CLOSE_DEADLINE,
                                    "a stalled half-frame")

    async def attack(endpoint: str) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(stall, endpoint)
        assert opened == 50

    async with target_server(handshake_timeout=handshake_timeout) as server:
        await under_attack(server, attack)


@pytest.mark.anyio
async def test_protocol_errors_do_not_crash_the_connection_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A protocol error is the peer's fault: the server closes that connection as its own
    code intends (a warning), instead of the handler failing with an exception that the
    listener logs as an error with a traceback, once per hostile connection."""
    before = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        frame(body_of(Ping(1, 0.0))),
        frame(body_of(hello(version=999))),
    ]
    after = [frame(b"\xff\x00garbage"), frame(cbor2.dumps([99]))]

    async def attack(endpoint: str) -> None:
        await all_expect_close(endpoint, before)
        await all_expect_close(endpoint, after, after_handshake=True)

    with caplog.at_level(logging.WARNING, logger="forkcore"):
        async with target_server() as server:
            await under_attack(server, attack)
    errors = [f"{r.name}: {r.getMessage()} ({r.exc_info[1]!r})" if r.exc_info else
              f"{r.name}: {r.getMessage()}"
              for r in caplog.records
              if r.name.startswith("forkcore") and r.levelno >= logging.ERROR]
    assert errors == []


# -- hash flooding ------------------------------------------------------------------------------
#
# Python does not randomize the hashes of ints (hash(n) == n % (2**61 - 1) for n >= 0), UUIDs
# (the hash of their int), tuples and attrs classes (combinations of their items' hashes).
# Thousands of distinct map keys sharing one hash make each dict insertion compare against
# all the others: before the guard, the UUID frame below took ~40 s to decode, the tuple
# frames ~15 s, the bignum frame ~7 s, blocking the server's event loop all along.

M61 = 2**61 - 1
FLOOD = 20_000  # keys per flooding map
FLOOD_DECODE_BOUND = 2.0  # seconds; a guarded decode of one flooding frame takes ~0.05 s


def _ones() -> list[int]:
    """The ints of at most 64 bits whose hash is 1."""
    return [1 + k * M61 for k in range(9)]


def _raw_map(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A CBOR map from already encoded (key, value) pairs."""
    return b"\xb9" + struct.pack(">H", len(pairs)) + b"".join(k + v for k, v in pairs)


def flooding_maps() -> dict[str, bytes]:
    """CBOR maps with thousands of distinct keys sharing one hash, one per kind of key
    (built from encoded keys: a Python dict of them would take as long as decoding)."""
    ones = _ones()
    small_tuples = list(itertools.product(ones, repeat=5))[:FLOOD]  # plain ints inside

    def flood(keys: Iterable[Any], encode: Callable[[Any], bytes] = codec.encode) -> bytes:
        zero = cbor2.dumps(0)
        return _raw_map([(encode(key), zero) for key in keys])

    return {
        "uuid": flood(uuid.UUID(int=k * M61) for k in range(1, FLOOD + 1)),
        "bignum": flood(2**64 + k * M61 for k in range(FLOOD)),
        "negative bignum": flood(-(2**64) - k * M61 for k in range(FLOOD)),
        "tuple": flood(small_tuples),
        "untagged array": flood(small_tuples, cbor2.dumps),  # cbor2 sends plain arrays
        "wire type": flood(Point(x, y) for x in ones for y in ones),
        "map": flood(({a: b} for a, b in itertools.product(ones, repeat=2)), cbor2.dumps),
    }


def _request_with(value: bytes) -> bytes:
    """A Request whose single argument is the (already encoded) `value`."""
    return b"\x88\x03\x01" + cbor2.dumps("test.counter") + cbor2.dumps("k") + \
        cbor2.dumps("echo") + b"\x81" + value + b"\xa0\xf6"


def test_flooding_map_decode_is_refused_at_once() -> None:
    for kind, data in flooding_maps().items():
        for body in (data, _request_with(data)):
            started = time.perf_counter()
            with pytest.raises(ProtocolError) as caught:
                codec.decode(body)
            took = time.perf_counter() - started
            assert took < FLOOD_DECODE_BOUND, f"{kind}: decode took {took:.2f}s"
            message = str(caught.value)
            if kind == "map":
                assert "a map is used as a map key" in message
            else:
                assert "identical hashes" in message and "hash flooding" in message, message


@pytest.mark.anyio
async def test_flooding_map_in_a_request_closes_the_connection_at_once() -> None:
    """Each flooding frame, sent after a correct handshake, is answered by a close well
    within the deadline, while the good client's calls keep succeeding."""
    payloads = [frame(_request_with(data)) for data in flooding_maps().values()]

    async def attack(endpoint: str) -> None:
        await all_expect_close(endpoint, payloads, after_handshake=True)

    async with target_server() as server:
        await under_attack(server, attack)


def test_keys_up_to_the_limit_per_hash_decode() -> None:
    limit = codec.MAX_KEYS_PER_HASH
    colliding = [uuid.UUID(int=k * M61) for k in range(1, limit + 2)]
    value = {u: i for i, u in enumerate(colliding[:limit])}
    assert codec.decode(codec.encode(value)) == value
    with pytest.raises(ProtocolError, match="hash flooding"):
        codec.decode(codec.encode({u: 0 for u in colliding}))
    # the limit is per message and counts distinct keys: the same 64 in many maps pass
    many = [value] * 50
    assert codec.decode(codec.encode(many)) == many


def test_ordinary_maps_with_hashable_keys_decode() -> None:
    rng = random.Random(20240611)

    def random_uuid() -> uuid.UUID:
        return uuid.UUID(int=rng.getrandbits(128))

    by_uuid = {random_uuid(): i for i in range(10_000)}
    by_tuple = {(rng.getrandbits(64), str(i), random_uuid()): i for i in range(10_000)}
    by_int = {rng.getrandbits(200) - 2**199: i for i in range(10_000)}
    by_point = {Point(rng.getrandbits(32), i): i for i in range(10_000)}
    when = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    by_datetime = {when + datetime.timedelta(seconds=i): i for i in range(1_000)}
    player = random_uuid()  # one UUID inside thousands of tuple keys: not a collision
    by_slot = {(player, slot): slot for slot in range(5_000)}
    mixed = {1: "a", "b": 2, b"c": 3, 4.5: 4, None: 5, False: 6, (): 7, (1, (2, 3)): 8,
             player: 9, -(2**70): 10, Point(1, 2): 11, when: 12}
    for value in (by_uuid, by_tuple, by_int, by_point, by_datetime, by_slot, mixed,
                  [by_uuid, by_tuple]):
        assert codec.decode(codec.encode(value)) == value


def test_array_keys_from_other_encoders_decode_as_tuples() -> None:
    """cbor2 (and forkcore's encoder, for a namedtuple) sends a tuple key as a plain
    array: it still arrives as a tuple, and is counted like one."""
    position = collections.namedtuple("position", "x y")
    assert codec.decode(codec.encode({position(1, 2): "a"})) == {(1, 2): "a"}
    assert codec.decode(cbor2.dumps({(1, (2, "x")): 0, (): 1})) == {(1, (2, "x")): 0, (): 1}
    assert codec.decode(cbor2.dumps([{(1, 2): 0}, {"k": {(3,): 1}}])) == \
        [{(1, 2): 0}, {"k": {(3,): 1}}]


@codec.wire_type(name="tests.hostile.Mutable")
@attrs.define
class Mutable:
    """Registered for the wire, but not hashable (attrs' eq without frozen)."""

    x: int


def test_unhashable_or_map_keys_are_a_protocol_error() -> None:
    assert codec.decode(codec.encode([Mutable(1)])) == [Mutable(1)]
    key = b"\xd9\x9c\x40\x82" + cbor2.dumps("tests.hostile.Mutable") + cbor2.dumps({"x": 1})
    unhashable = _raw_map([(key, cbor2.dumps(0))])
    with pytest.raises(ProtocolError, match="not hashable"):
        codec.decode(unhashable)
    for in_a_tuple in (b"\x82\x01" + key, b"\xd9\x9c\x41\x82\x01" + key):  # (1, Mutable)
        with pytest.raises(ProtocolError, match="not hashable"):
            codec.decode(_raw_map([(in_a_tuple, cbor2.dumps(0))]))
    with pytest.raises(ProtocolError, match="a map is used as a map key"):
        codec.decode(_raw_map([(cbor2.dumps({1: 2}), cbor2.dumps(0))]))
    with pytest.raises(ProtocolError, match="a map is used as a map key"):  # in a key's map
        codec.decode(codec.encode({"k": [1]}).replace(b"\x61\x6b", b"\xa1\xa0\x00"))


# -- properties of the sans-IO layer -----------------------------------------------------------

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def decode_or_protocol_error(proto: ProtocolConnection, data: bytes) -> None:
    try:
        msg = proto.decode(data)
    except ProtocolError:
        return
    assert isinstance(msg, MESSAGE_TYPES)


@PROPERTY
@given(st.binary(max_size=1024))
def test_decode_arbitrary_bytes_is_a_message_or_protocol_error(data: bytes) -> None:
    decode_or_protocol_error(ProtocolConnection("server"), data)
    decode_or_protocol_error(ProtocolConnection("client"), data)
    opened = ProtocolConnection("server")
    opened.decode(body_of(hello()))
    opened.encode(Welcome(PROTOCOL_VERSION, "x", None, {}, ()))
    decode_or_protocol_error(opened, data)


_cbor_leaves = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.builds(cbor2.CBORTag, st.integers(0, 2**64 - 1), st.integers() | st.text(max_size=8)
                | st.binary(max_size=17) | st.lists(st.integers(), max_size=3))
)
_cbor_values = st.recursive(
    _cbor_leaves,
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=12,
)


@PROPERTY
@given(st.integers(-1, 12), st.lists(_cbor_values, max_size=9))
def test_decode_message_shaped_cbor_is_a_message_or_protocol_error(
    code: int, fields: list[Any]
) -> None:
    data = cbor2.dumps([code, *fields])
    decode_or_protocol_error(ProtocolConnection("server"), data)
    decode_or_protocol_error(ProtocolConnection("client"), data)
    opened = ProtocolConnection("server")
    opened.decode(body_of(hello()))
    opened.encode(Welcome(PROTOCOL_VERSION, "x", None, {}, ()))
    decode_or_protocol_error(opened, data)


_hashable = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.binary(max_size=8) | st.uuids()
    | st.builds(Point, st.integers(), st.integers()),
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=6,
)
_wire_values = st.recursive(
    _hashable,
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(_hashable, inner, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(_wire_values)
def test_values_with_any_hashable_keys_round_trip(value: Any) -> None:
    """The hash-flooding guard refuses nothing forkcore sends: maps keyed by ints, UUIDs,
    tuples, wire types ... decode to what was encoded."""
    assert codec.decode(codec.encode(value)) == value


@PROPERTY
@given(st.lists(st.binary(max_size=2048), max_size=20))
def test_frame_decoder_arbitrary_chunks_give_frames_or_protocol_error(
    chunks: list[bytes]
) -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except ProtocolError:
            return
        assert isinstance(frames, list)
        for body in frames:
            assert isinstance(body, bytes) and len(body) <= 1024
        assert decoder.buffered <= 4 + 1024


@PROPERTY
@given(st.lists(st.binary(max_size=1024), max_size=12), st.data())
def test_frame_decoder_reassembles_frames_split_anywhere(
    bodies: list[bytes], data: st.DataObject
) -> None:
    wire = b"".join(frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    decoder = FrameDecoder(max_frame_size=1024)
    got: list[bytes] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        got += decoder.feed(wire[start:cut])
        start = cut
    assert got == bodies
    assert decoder.buffered == 0


def test_activation_slots_of_colliding_keys_do_not_collide() -> None:
    """Integer and UUID hashes are not randomized: grain keys chosen to share one hash
    must not share one hash in the server's activation table, else every new activation
    costs time in proportion to how many such activations exist."""
    m = 2**61 - 1  # Python hashes integers modulo this prime
    ints = [k * m for k in range(1, 2001)]
    assert len({hash(k) for k in ints}) == 1  # as integers they all collide
    assert len({hash(activation_slot("i", k)) for k in ints}) > 1990
    uuids = [uuid.UUID(int=k * m) for k in range(1, 2001)]
    assert len({hash(u) for u in uuids}) == 1
    assert len({hash(activation_slot("i", u)) for u in uuids}) > 1990
    # keys of different types or values never share a slot, huge integers included
    keys: list[Any] = ["1", b"1", 1, -1, 0, 256, -256, uuid.UUID(int=1), "", b"", 10**5000]
    assert len({activation_slot("i", k) for k in keys}) == len(keys)
    assert activation_slot("i", 7) != activation_slot("j", 7)



@pytest.mark.parametrize("timeout", [10**400, -(10**400), float("nan"), float("inf"), -1.0])
def test_a_request_with_an_impossible_timeout_is_a_protocol_error(timeout: Any) -> None:
    """Including integers too big for a float (they used to raise OverflowError)."""
    from forkcore.protocol.messages import REQUEST, from_wire, request_fields

    item = [REQUEST, 1, "test.counter", "k", "add", [1], {}, timeout]
    with pytest.raises(ProtocolError, match="timeout"):
        from_wire(item)
    with pytest.raises(ProtocolError, match="timeout"):
        request_fields(item)


_awkward = st.recursive(
    _hashable | st.datetimes() | st.sets(st.integers(), max_size=3)
    | st.frozensets(st.integers(), max_size=3) | st.decimals(allow_nan=False, places=2)
    | st.just(()) | st.just(set()) | st.text(alphabet="a\udc80", max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


def _outcome(encode: Callable[[], bytes]) -> bytes | type:
    try:
        return encode()
    except codec.WireTypeError:
        return codec.WireTypeError


@PROPERTY
@given(_awkward, _awkward)
def test_the_fast_encoding_path_matches_the_general_one(args: Any, result: Any) -> None:
    """Whatever the arguments or the result hold (empty tuples and sets included), the
    path that skips our encoders for plain values gives the bytes of the general path,
    or the same refusal."""
    request = [3, 1, "i", "k", "m", [args], {"kw": result}, 1.0]
    general = _outcome(lambda: codec._encode_general(request))
    assert _outcome(lambda: codec.encode_if_plain(request, [args], {"kw": result})) \
        == general
    assert _outcome(lambda: codec.encode(request)) == general
    response = [4, 1, result]
    assert _outcome(lambda: codec.encode_if_plain(response, result)) \
        == _outcome(lambda: codec._encode_general(response))
