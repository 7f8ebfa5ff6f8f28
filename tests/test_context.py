"""Call context end to end: `forkcore.call_context` entries reach
`forkcore.current_context()` in the grain, add up when nested, travel on with the calls a
grain makes, are refused at once beyond the limits, and cost nothing on the wire when
there are none (a Request stays 8 elements: seen through a recording TCP proxy)."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import cbor2
import pytest

import forkcore
from forkcore.context import MAX_BYTES, MAX_ENTRIES
from forkcore.protocol.framing import PREAMBLE
from forkcore.protocol.messages import ONE_WAY, REQUEST

pytestmark = pytest.mark.anyio

WAIT = 10.0  # bound for anything here: every call finishes well within it


class IContextReader(forkcore.GrainInterface, name="ctx.reader"):
    async def context(self) -> dict[str, Any]: ...
    async def context_after(self, seconds: float) -> dict[str, Any]: ...
    @forkcore.rpc(one_way=True)
    async def remember(self) -> None: ...
    async def remembered(self) -> list[dict[str, Any]]: ...


class ContextReader(forkcore.Grain, IContextReader):
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def context(self) -> dict[str, Any]:
        return dict(forkcore.current_context())

    async def context_after(self, seconds: float) -> dict[str, Any]:
        await anyio.sleep(seconds)
        return dict(forkcore.current_context())

    async def remember(self) -> None:
        self.seen.append(dict(forkcore.current_context()))

    async def remembered(self) -> list[dict[str, Any]]:
        return self.seen


class IContextRelay(forkcore.GrainInterface, name="ctx.relay"):
    async def relay(self, endpoint: str, transport: str, key: str,
                    extra: dict[str, Any]) -> dict[str, Any]: ...


class ContextRelay(forkcore.Grain, IContextRelay):
    """Calls a reader through a Client of its own, optionally inside a context of its
    own: what the reader sees is what the grain's outgoing call carried."""

    async def relay(self, endpoint: str, transport: str, key: str,
                    extra: dict[str, Any]) -> dict[str, Any]:
        async with forkcore.Client(servers=[endpoint], transport=transport,
                                   request_timeout=5.0) as client:
            reader = client.get_grain(IContextReader, key)
            if not extra:
                return await reader.context()
            with forkcore.call_context(**extra):
                return await reader.context()


@pytest.fixture(params=["memory", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def client(transport: str) -> AsyncIterator[forkcore.Client]:
    async with forkcore.Server(id="s1", transport=transport,
                               grains=[ContextReader, ContextRelay]) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport,
                                   request_timeout=5.0) as c:
            yield c


# -- entries reach the grain ------------------------------------------------------------


async def test_entries_reach_current_context_in_the_grain(client: forkcore.Client) -> None:
    reader = client.get_grain(IContextReader, "a")
    with anyio.fail_after(WAIT):
        assert await reader.context() == {}
        with forkcore.call_context(tenant="eu", request_id="r-17", n=3, raw=b"\x00"):
            assert dict(forkcore.current_context()) == {
                "tenant": "eu", "request_id": "r-17", "n": 3, "raw": b"\x00"}
            assert await reader.context() == {"tenant": "eu", "request_id": "r-17",
                                              "n": 3, "raw": b"\x00"}
            assert await client.call("ctx.reader", "a", "context") == {
                "tenant": "eu", "request_id": "r-17", "n": 3, "raw": b"\x00"}
        # the next call on the same activation carries nothing again
        assert await reader.context() == {}
    assert forkcore.current_context() == {}


async def test_nested_contexts_add_and_override(client: forkcore.Client) -> None:
    reader = client.get_grain(IContextReader, "nested")
    with anyio.fail_after(WAIT):
        with forkcore.call_context(a=1, b=2):
            with forkcore.call_context(b=3, c=4):
                assert await reader.context() == {"a": 1, "b": 3, "c": 4}
            assert await reader.context() == {"a": 1, "b": 2}
            with forkcore.call_context():
                assert await reader.context() == {"a": 1, "b": 2}


async def test_concurrent_calls_to_one_grain_each_carry_their_own(
        client: forkcore.Client) -> None:
    """Calls queued on one activation run one after another in one task: each must see
    its own entries (or none), not those of the call before it."""
    reader = client.get_grain(IContextReader, "busy")
    seen: dict[int, dict[str, Any]] = {}

    async def one(i: int) -> None:
        if i % 3 == 0:
            seen[i] = await reader.context()
            return
        with forkcore.call_context(i=i, **({"odd": True} if i % 2 else {})):
            seen[i] = await reader.context_after(0) if i % 5 == 0 else await reader.context()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(one, i)
    for i in range(60):
        expected: dict[str, Any] = {} if i % 3 == 0 else {"i": i, **(
            {"odd": True} if i % 2 else {})}
        assert seen[i] == expected, i


async def test_tasks_started_inside_the_block_carry_it(client: forkcore.Client) -> None:
    reader = client.get_grain(IContextReader, "tasks")
    seen: list[dict[str, Any]] = []

    async def call() -> None:
        seen.append(await reader.context())

    with anyio.fail_after(WAIT):
        with forkcore.call_context(job="j1"):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(call)
    assert seen == [{"job": "j1"}] * 3


async def test_one_way_calls_carry_the_context(client: forkcore.Client) -> None:
    reader = client.get_grain(IContextReader, "one-way")
    with anyio.fail_after(WAIT):
        with forkcore.call_context(event="e1"):
            await reader.remember()
        await reader.remember()
        # calls from one client to one grain run in arrival order
        assert await reader.remembered() == [{"event": "e1"}, {}]


# -- a grain's outgoing calls carry the context on --------------------------------------


async def test_a_grain_s_outgoing_calls_carry_the_context_on(transport: str) -> None:
    """The relay (on s1) calls a reader on s2, and on its own server, through a Client it
    makes: both see the caller's entries, with the relay's own context on top."""
    async with forkcore.Server(id="s1", transport=transport,
                               grains=[ContextReader, ContextRelay]) as s1, \
            forkcore.Server(id="s2", transport=transport, grains=[ContextReader]) as s2:
        assert s1.endpoint and s2.endpoint
        async with forkcore.Client(servers=[s1.endpoint], transport=transport,
                                   request_timeout=5.0) as client:
            relay = client.get_grain(IContextRelay, "r")
            with anyio.fail_after(WAIT):
                for endpoint in (s2.endpoint, s1.endpoint):
                    with forkcore.call_context(trace="t-1", user="ann"):
                        assert await relay.relay(endpoint, transport, "far", {}) == {
                            "trace": "t-1", "user": "ann"}
                        assert await relay.relay(endpoint, transport, "far",
                                                 {"user": "bob", "hop": 2}) == {
                            "trace": "t-1", "user": "bob", "hop": 2}
                    assert await relay.relay(endpoint, transport, "far", {}) == {}


# -- limits, checked when the context is entered ----------------------------------------


def test_64_entries_fit_and_65_raise_at_once() -> None:
    with forkcore.call_context(**{f"k{i}": i for i in range(MAX_ENTRIES)}) as entries:
        assert len(entries) == MAX_ENTRIES
    with pytest.raises(ValueError, match="at most 64"):
        with forkcore.call_context(**{f"k{i}": i for i in range(MAX_ENTRIES + 1)}):
            pytest.fail("the block ran")
    # nested: the sum counts
    with forkcore.call_context(**{f"a{i}": i for i in range(40)}):
        with pytest.raises(ValueError, match="65 entries"):
            with forkcore.call_context(**{f"b{i}": i for i in range(25)}):
                pytest.fail("the block ran")
        # overriding keys adds nothing
        with forkcore.call_context(**{f"a{i}": -i for i in range(40)}):
            assert len(forkcore.current_context()) == 40
        assert len(forkcore.current_context()) == 40
    assert forkcore.current_context() == {}


def test_more_than_8_kib_raises_at_once() -> None:
    with forkcore.call_context(blob="x" * (MAX_BYTES - 100)):
        pass
    with pytest.raises(ValueError, match="8192"):
        with forkcore.call_context(blob="x" * MAX_BYTES):
            pytest.fail("the block ran")
    with forkcore.call_context(first=b"y" * 5000):
        with pytest.raises(ValueError, match="bytes encoded"):
            with forkcore.call_context(second=b"z" * 5000):
                pytest.fail("the block ran")
        assert set(forkcore.current_context()) == {"first"}


def test_a_value_that_cannot_cross_the_wire_raises_at_once() -> None:
    with pytest.raises(forkcore.WireTypeError):
        with forkcore.call_context(handle=object()):
            pytest.fail("the block ran")
    with pytest.raises(forkcore.WireTypeError):
        with forkcore.call_context(ok=1, nested={"f": lambda: None}):
            pytest.fail("the block ran")
    assert forkcore.current_context() == {}


def test_current_context_is_read_only() -> None:
    with forkcore.call_context(a=1):
        entries: Any = forkcore.current_context()
        with pytest.raises(TypeError):
            entries["a"] = 2
        assert forkcore.current_context() == {"a": 1}


# -- the wire: no context, no headers ---------------------------------------------------


class Recorder:
    """A TCP proxy in front of a server that decodes every frame the client sends."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.messages: list[list[Any]] = []
        self.endpoint = ""

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.endpoint = f"127.0.0.1:{port}"
        task_status.started()
        async with listener:
            await listener.serve(self._relay)

    async def _relay(self, downstream: anyio.abc.SocketStream) -> None:
        async with downstream, await anyio.connect_tcp(*self.upstream) as upstream:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pipe, upstream, downstream, False)
                await self._pipe(downstream, upstream, True)
                tg.cancel_scope.cancel()

    async def _pipe(self, source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream,
                    record: bool) -> None:
        buffer = b""
        preamble = True  # the stream starts with forkcore's 4-byte preamble
        try:
            async for chunk in source:
                await sink.send(chunk)
                if not record:
                    continue
                buffer += chunk
                if preamble:
                    if len(buffer) < len(PREAMBLE):
                        continue
                    assert buffer.startswith(PREAMBLE)
                    buffer, preamble = buffer[len(PREAMBLE):], False
                while len(buffer) >= 4:
                    (size,) = struct.unpack(">I", buffer[:4])
                    if len(buffer) < 4 + size:
                        break
                    self.messages.append(cbor2.loads(buffer[4:4 + size]))
                    buffer = buffer[4 + size:]
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def of_type(self, code: int) -> list[list[Any]]:
        return [m for m in self.messages if isinstance(m, list) and m and m[0] == code]


async def test_calls_without_context_send_no_headers() -> None:
    async with forkcore.Server(id="s1", transport="tcp", grains=[ContextReader]) as server, \
            anyio.create_task_group() as tg:
        assert server.endpoint
        recorder = Recorder(server.endpoint)
        await tg.start(recorder.serve)
        async with forkcore.Client(servers=[recorder.endpoint], transport="tcp",
                                   request_timeout=5.0) as client:
            reader = client.get_grain(IContextReader, "wire")
            with anyio.fail_after(WAIT):
                assert await reader.context() == {}
                await reader.remember()
                with forkcore.call_context(tenant="eu"):
                    assert await reader.context() == {"tenant": "eu"}
                    await reader.remember()
                with forkcore.call_context():  # empty: nothing to carry
                    assert await reader.context() == {}
                assert await reader.remembered() == [{}, {"tenant": "eu"}]
        tg.cancel_scope.cancel()

    requests = [m for m in recorder.of_type(REQUEST) if m[4] in ("context", "remembered")]
    assert [len(m) for m in requests] == [8, 9, 8, 8]
    assert requests[1][8] == {"ctx": {"tenant": "eu"}}
    one_ways = recorder.of_type(ONE_WAY)
    assert [len(m) for m in one_ways] == [6, 7]
    assert one_ways[1][6] == {"ctx": {"tenant": "eu"}}


def test_limits_are_the_protocol_s() -> None:
    """The limits call_context checks are those a server checks on receipt."""
    from forkcore.protocol.messages import MAX_CONTEXT_ENTRIES

    assert MAX_ENTRIES == MAX_CONTEXT_ENTRIES == 64
