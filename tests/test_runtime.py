"""Grain calls end to end through the public API, over `memory` and `tcp`."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from grains_sample import (
    ClassReentrantGate,
    Counter,
    Gate,
    IClassReentrantGate,
    ICounter,
    IGate,
    IMethodReentrantGate,
    MethodReentrantGate,
    Point,
)

import forkcore
from forkcore.errors import (
    ConfigError,
    ConnectError,
    MethodNotFound,
    NoServerAvailable,
    RemoteError,
    RequestTimeout,
)

pytestmark = pytest.mark.anyio

TRANSPORTS = ["memory", "tcp", "udp"]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def cluster(transport: str) -> AsyncIterator[tuple[forkcore.Server, forkcore.Client]]:
    async with forkcore.Server(id="s1", transport=transport, grains=[Counter]) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport,
                                   request_timeout=5.0) as client:
            yield server, client


async def test_concurrent_adds_to_one_grain_lose_nothing(cluster: Any) -> None:
    _, client = cluster
    counter = client.get_grain(ICounter, "shared")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(counter.add, 1)
        assert await counter.get() == 200


async def test_300_grains_answer_concurrently(cluster: Any) -> None:
    server, client = cluster
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await client.get_grain(ICounter, i).add(i)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(one, i)
    assert results == {i: i for i in range(300)}
    assert server.activation_count == 300


@pytest.mark.parametrize("value", [
    None, True, False, 0, -1, 2**63 - 1, 2**80, -(2**70), 1.5, float("inf"), "", "héllo ✓",
    b"", b"\x00\xff", [1, "a", [None]], (1, (2, "x")), {"a": 1, "b": [1, 2], 3: "int key"},
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    datetime.datetime(2026, 11, 27, 12, 30, 1, 500, tzinfo=datetime.UTC),
    datetime.datetime(2026, 11, 27, 12, 30, 1),
    Point(3, -4), [Point(1, 2), {"p": Point(0, 0)}],
])
async def test_every_wire_type_round_trips(cluster: Any, value: Any) -> None:
    _, client = cluster
    result = await client.get_grain(ICounter, "echo").echo(value)
    assert result == value
    assert type(result) is type(value)


async def test_large_bytes_round_trip(cluster: Any) -> None:
    _, client = cluster
    blob = bytes(range(256)) * 800  # 200 KB
    assert await client.get_grain(ICounter, "blob").echo(blob) == blob


@pytest.mark.parametrize("key", ["text", 7, -7, uuid.UUID(int=5), b"\x01bytes"])
async def test_keys_of_every_type_reach_the_grain(cluster: Any, key: Any) -> None:
    _, client = cluster
    assert await client.get_grain(ICounter, key).key_of() == key
    assert await client.call("test.counter", key, "key_of") == key


async def test_keys_of_other_types_are_refused(cluster: Any) -> None:
    _, client = cluster
    for key in (1.5, None, True, [1]):
        with pytest.raises(ConfigError, match="grain key"):
            client.get_grain(ICounter, key)


async def test_grain_error_is_remote_error_and_connection_stays_usable(cluster: Any) -> None:
    _, client = cluster
    counter = client.get_grain(ICounter, "err")
    with pytest.raises(RemoteError) as info:
        await counter.fail("bad value")
    assert info.value.type_name == "ValueError"
    assert info.value.message == "bad value"
    assert await counter.add(2) == 2


async def test_unknown_method_and_interface(cluster: Any) -> None:
    _, client = cluster
    with pytest.raises(MethodNotFound, match="no method 'nope'"):
        await client.call("test.counter", "k", "nope")
    with pytest.raises(MethodNotFound, match="no interface 'missing'"):
        await client.call("missing", "k", "get")


async def test_unsendable_argument_fails_before_sending(cluster: Any) -> None:
    _, client = cluster
    with pytest.raises(forkcore.WireTypeError, match="cannot cross the wire"):
        await client.get_grain(ICounter, "k").echo(object())
    assert await client.get_grain(ICounter, "k").add(1) == 1


async def test_slow_call_times_out_promptly_and_server_cancels_it(transport: str) -> None:
    async with forkcore.Server(id="s1", transport=transport, grains=[Counter]) as server:
        async with forkcore.Client(servers=[server.endpoint or ""], transport=transport,
                                   request_timeout=0.3) as client:
            counter = client.get_grain(ICounter, "slow")
            start = anyio.current_time()
            with pytest.raises(RequestTimeout):
                await counter.sleep(5)
            assert anyio.current_time() - start < 2.0
            # the rpc(timeout=0.5) of `slow` overrides request_timeout
            assert await counter.slow(0.4) == "slept"
            # the timed-out call was cancelled on the server: the grain is free again
            with anyio.fail_after(2):
                assert await counter.add(1) == 1


async def test_turns_run_in_arrival_order(cluster: Any) -> None:
    _, client = cluster
    counter = client.get_grain(ICounter, "order")
    seen: list[int] = []

    async def add(i: int) -> None:
        seen.append(await counter.add(1))

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(add, i)
    assert sorted(seen) == list(range(1, 51))


async def test_one_way_call_returns_none_and_runs(cluster: Any) -> None:
    _, client = cluster
    counter = client.get_grain(ICounter, "oneway")
    assert await counter.bump(5) is None
    with anyio.fail_after(5):
        while await counter.get() != 5:
            await anyio.sleep(0.01)


async def test_on_activate_runs_before_first_call(cluster: Any) -> None:
    _, client = cluster
    before = Counter.activations
    counter = client.get_grain(ICounter, "fresh-activation")
    await counter.add(1)
    await counter.add(1)
    assert Counter.activations == before + 1


async def test_idle_activations_are_deactivated(transport: str) -> None:
    before = Counter.deactivations
    async with forkcore.Server(id="s1", transport=transport, grains=[Counter],
                               idle_timeout=0.1, collection_interval=0.05) as server:
        async with forkcore.Client(servers=[server.endpoint or ""],
                                   transport=transport) as client:
            await client.get_grain(ICounter, "idle").add(1)
            assert server.activation_count == 1
            with anyio.fail_after(5):
                while server.activation_count:
                    await anyio.sleep(0.02)
            assert Counter.deactivations == before + 1
            # the next call activates the grain afresh
            assert await client.get_grain(ICounter, "idle").add(1) == 1


async def test_server_stop_deactivates_grains(transport: str) -> None:
    before = Counter.deactivations
    async with forkcore.Server(id="s1", transport=transport, grains=[Counter]) as server:
        async with forkcore.Client(servers=[server.endpoint or ""],
                                   transport=transport) as client:
            for key in ("a", "b", "c"):
                await client.get_grain(ICounter, key).add(1)
    assert Counter.deactivations == before + 3


async def test_server_drains_calls_in_flight_on_exit(transport: str) -> None:
    result: list[str] = []
    stop = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as hosting:
            endpoint = await hosting.start(_host_at, "127.0.0.1:0", transport, stop)
            async with forkcore.Client(servers=[endpoint], transport=transport) as client:
                async with anyio.create_task_group() as tg:
                    async def call() -> None:
                        result.append(await client.get_grain(ICounter, "drain").sleep(0.3))

                    tg.start_soon(call)
                    await anyio.sleep(0.1)
                    stop.set()  # the server shuts down while the call runs
    assert result == ["slept"]


async def test_dropped_connection_fails_calls_at_once_and_client_reconnects(
        transport: str) -> None:
    async with anyio.create_task_group() as tg:
        stop = anyio.Event()

        async def host(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            async with forkcore.Server(id="s1", transport=transport, grains=[Counter],
                                       drain_timeout=0.05) as server:
                task_status.started(server.endpoint)
                await stop.wait()

        endpoint = await tg.start(host)
        async with forkcore.Client(servers=[endpoint], transport=transport,
                                   reconnect_initial_delay=0.02,
                                   reconnect_max_delay=0.1) as client:
            counter = client.get_grain(ICounter, "k")
            await counter.add(1)
            errors: list[BaseException] = []

            async def in_flight() -> None:
                try:
                    await counter.sleep(30)
                except (ConnectError, RequestTimeout) as exc:
                    errors.append(exc)

            start = anyio.current_time()
            async with anyio.create_task_group() as calls:
                calls.start_soon(in_flight)
                await anyio.sleep(0.1)
                stop.set()  # the server stops; its 0.05 s drain cannot finish a 30 s call
            assert anyio.current_time() - start < 3
            assert len(errors) == 1 and isinstance(errors[0], ConnectError)
            with pytest.raises(NoServerAvailable, match="reconnecting"):
                await counter.add(1)
            # the server comes back on the same endpoint: the client reconnects by itself
            stop = anyio.Event()
            again = await tg.start(_host_at, endpoint, transport, stop)
            assert again == endpoint
            with anyio.fail_after(5):
                while True:
                    try:
                        assert await counter.add(1) == 1
                        break
                    except NoServerAvailable:
                        await anyio.sleep(0.02)
            stop.set()


async def _host_at(endpoint: str, transport: str, stop: anyio.Event, *,
                   task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    async with forkcore.Server(id="s1", listen=endpoint, transport=transport,
                               grains=[Counter]) as server:
        task_status.started(server.endpoint)
        await stop.wait()


async def test_single_mode_uses_first_reachable_endpoint(transport: str) -> None:
    async with forkcore.Server(id="live", transport=transport, grains=[Counter]) as server:
        dead = "127.0.0.1:1" if transport == "tcp" else "127.0.0.1:9"
        async with forkcore.Client(servers=[dead, server.endpoint or ""], transport=transport,
                                   connect_timeout=1.0) as client:
            assert client.route(ICounter, "x") == "live"
            assert await client.get_grain(ICounter, "x").add(1) == 1
            [view] = client.servers
            assert view.id == "live" and view.healthy and view.endpoint == server.endpoint
            assert view.interfaces == frozenset({"test.counter"})


async def test_no_reachable_server_is_connect_error(transport: str) -> None:
    client = forkcore.Client(servers=["127.0.0.1:9"], transport=transport, connect_timeout=0.5)
    with anyio.fail_after(5), pytest.raises(ConnectError, match="could not connect"):
        async with client:
            pass


async def test_calling_before_connecting_says_what_to_do() -> None:
    client = forkcore.Client(servers=["127.0.0.1:9"], transport="memory")
    with pytest.raises(NoServerAvailable, match="async with"):
        await client.get_grain(ICounter, 1).get()


async def test_proxy_is_typed_as_its_interface(cluster: Any) -> None:
    _, client = cluster
    proxy = client.get_grain(ICounter, "typed")
    assert isinstance(proxy, ICounter)
    assert proxy.grain_id == forkcore.GrainId("test.counter", "typed")
    assert "test.counter" in repr(proxy)


@pytest.mark.parametrize(("interface", "reentrant"), [
    (IGate, False), (IMethodReentrantGate, True), (IClassReentrantGate, True)])
async def test_reentrancy_is_opt_in_per_method_and_per_class(
        transport: str, interface: Any, reentrant: bool) -> None:
    async with forkcore.Server(id="s1", transport=transport,
                               grains=[Gate, MethodReentrantGate, ClassReentrantGate]) as server:
        async with forkcore.Client(servers=[server.endpoint or ""],
                                   transport=transport) as client:
            gate = client.get_grain(interface, "g")
            outcome: list[str] = []

            async def wait() -> None:
                try:
                    outcome.append(await gate.wait_open())
                except RequestTimeout:
                    outcome.append("timeout")

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait)
                    await anyio.sleep(0.05)
                    await gate.open()
            assert outcome == (["opened"] if reentrant else ["timeout"])


async def test_idle_activation_keeps_no_mailbox(cluster: Any) -> None:
    """Memory per idle activation stays small: the mailbox exists only while calls wait."""
    server, client = cluster
    counter = client.get_grain(ICounter, "lean")
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(counter.add, 1)
    assert await counter.get() == 20
    [act] = [a for a in server.catalog.activations.values() if a.grain_id.key == "lean"]
    assert act.idle and act.mailbox is None


async def test_colliding_integer_keys_each_get_their_own_grain(cluster: Any) -> None:
    """Grains whose integer keys share one Python hash are still distinct grains."""
    _server, client = cluster
    m = 2**61 - 1
    for k in range(1, 51):
        assert await client.get_grain(ICounter, k * m).add(k) == k
    for k in range(1, 51):
        assert await client.get_grain(ICounter, k * m).get() == k


async def test_empty_tuples_come_back_as_tuples(cluster: Any) -> None:
    _, client = cluster
    counter = client.get_grain(ICounter, "odd")
    assert await counter.odd("empty tuple") == ()
    assert type(await counter.odd("empty tuple")) is tuple
    assert await counter.odd("nested tuple") == [()]


@pytest.mark.parametrize("kind", ["empty set", "empty frozenset", "zero decimal"])
async def test_a_result_that_cannot_cross_fails_that_call_only(cluster: Any,
                                                               kind: str) -> None:
    """The server refuses to send it (WireTypeError); the connection and the other calls
    on it are unharmed."""
    _, client = cluster
    counter = client.get_grain(ICounter, "odd")
    other = client.get_grain(ICounter, "bystander")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(other.sleep, 0.2)
            with pytest.raises(RemoteError) as caught:
                await counter.odd(kind)
            assert caught.value.type_name == "WireTypeError"
        assert await other.add(1) == 1


async def test_an_error_message_that_cannot_be_encoded_still_fails_its_call(
        cluster: Any) -> None:
    """The caller gets its RemoteError, and the calls queued behind it on the same grain
    still run."""
    _, client = cluster
    counter = client.get_grain(ICounter, "bad-error")
    outcomes: list[Any] = []

    async def failing() -> None:
        try:
            await counter.odd("bad error")
        except RemoteError as exc:
            outcomes.append((exc.type_name, exc.message))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(failing)
            await anyio.sleep(0)
            for _ in range(3):
                tg.start_soon(counter.add, 1)
        assert await counter.get() == 3
    assert outcomes == [("ValueError", "(the error message could not be encoded)")]


class IOrder(forkcore.GrainInterface, name="test.order"):
    async def stamp(self) -> int: ...


class Order(forkcore.Grain, IOrder):
    """Numbers calls in the order the server runs them (they never wait)."""

    ran = 0

    async def stamp(self) -> int:
        type(self).ran += 1
        return type(self).ran


async def test_a_long_run_of_calls_lets_other_grains_in(transport: str) -> None:
    """Calls that never wait, queued on one grain, run in pieces: a call to another grain
    sent right after them is not held up until every one of them is done (and answers go
    out while the rest still run)."""
    Order.ran = 0
    async with forkcore.Server(id="s1", transport=transport, grains=[Order]) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport,
                                   request_timeout=10.0) as client:
            busy = client.get_grain(IOrder, "busy")
            other = client.get_grain(IOrder, "other")
            stamps: list[int] = []

            async def stamp_other() -> None:
                stamps.append(await other.stamp())

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for _ in range(400):
                        tg.start_soon(busy.stamp)
                    tg.start_soon(stamp_other)
    assert Order.ran == 401
    assert stamps[0] < 200, f"the other grain ran only as call {stamps[0]} of 401"
