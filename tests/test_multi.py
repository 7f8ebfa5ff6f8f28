"""Multi-mode client: pool, manifests, routing pipeline, affinity, membership changes."""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from grains_sample import IWhere, located

import forkcore
from forkcore.errors import ConfigError, ConnectError, NoServerAvailable

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "tcp", "udp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Hosts:
    """Servers run in their own tasks so a test can stop and restart them."""

    def __init__(self, tg: anyio.abc.TaskGroup, transport: str) -> None:
        self.tg = tg
        self.transport = transport
        self.stops: dict[str, anyio.Event] = {}
        self.endpoints: dict[str, str] = {}

    async def start(self, server_id: str, grains: Sequence[Any] | None = None,
                    listen: str = "127.0.0.1:0", **options: Any) -> str:
        stop = anyio.Event()
        self.stops[server_id] = stop
        endpoint = await self.tg.start(self._run, server_id, grains, listen, stop, options)
        self.endpoints[server_id] = endpoint
        return str(endpoint)

    async def _run(self, server_id: str, grains: Sequence[Any] | None, listen: str,
                   stop: anyio.Event, options: dict[str, Any], *,
                   task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        async with forkcore.Server(id=server_id, listen=listen, transport=self.transport,
                                   grains=grains or [located(server_id)],
                                   drain_timeout=0.2, **options) as server:
            task_status.started(server.endpoint or "")
            await stop.wait()

    def stop(self, server_id: str) -> None:
        self.stops[server_id].set()


@asynccontextmanager
async def hosts(transport: str) -> AsyncIterator[Hosts]:
    async with anyio.create_task_group() as tg:
        h = Hosts(tg, transport)
        try:
            yield h
        finally:
            for stop in h.stops.values():
                stop.set()


def multi(transport: str, endpoints: Sequence[str], **options: Any) -> forkcore.Client:
    options.setdefault("strategy", "consistent_hash")
    return forkcore.Client(mode="multi", servers=list(endpoints), transport=transport,
                           reconnect_initial_delay=0.02, reconnect_max_delay=0.1,
                           request_timeout=5.0, **options)


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


async def test_pool_connects_to_every_server_with_n_connections(transport: str) -> None:
    async with hosts(transport) as h:
        eps = [await h.start(f"s{i}") for i in range(3)]
        async with multi(transport, eps, connections_per_server=2) as client:
            views = sorted(client.servers, key=lambda v: v.id)
            assert [v.id for v in views] == ["s0", "s1", "s2"]
            for view, ep in zip(views, eps, strict=True):
                assert view.healthy and view.state == "healthy"
                assert view.endpoint == ep
                assert view.interfaces == frozenset({"test.where"})
                assert view.versions["test.where"].version == 1
                assert view.in_flight == 0
                assert view.zone is None and dict(view.metadata) == {}


async def test_calls_land_where_route_says(transport: str) -> None:
    async with hosts(transport) as h:
        eps = [await h.start(f"s{i}") for i in range(3)]
        async with multi(transport, eps) as client:
            landed: Tally[str] = Tally()
            for key in range(60):
                expected = client.route(IWhere, key)
                actual = await client.get_grain(IWhere, key).where()
                assert actual == expected
                landed[actual] += 1
            assert set(landed) == {"s0", "s1", "s2"}


async def test_two_endpoints_announcing_one_id_are_one_server(
        transport: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "forkcore.client")
    async with hosts(transport) as h:
        first = await h.start("same", grains=[located("same")])
        twin = await h.start("twin", grains=[located("same")])
        async with anyio.create_task_group() as tg:
            stop = anyio.Event()

            async def impostor(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
                async with forkcore.Server(id="same", transport=transport,
                                           grains=[located("same")]) as server:
                    task_status.started(server.endpoint)
                    await stop.wait()

            second = await tg.start(impostor)
            async with multi(transport, [first, second, twin]) as client:
                assert sorted(v.id for v in client.servers) == ["same", "twin"]
                assert "both announce server id 'same'" in caplog.text
            stop.set()


async def test_interface_hosted_by_one_server_is_routed_there(transport: str) -> None:
    class IOnly(forkcore.GrainInterface, name="test.only"):
        async def ping(self) -> str: ...

    class Only(forkcore.Grain, IOnly):
        async def ping(self) -> str:
            return "pong"

    async with hosts(transport) as h:
        eps = [await h.start("s0"), await h.start("s1", grains=[located("s1"), Only]),
               await h.start("s2")]
        async with multi(transport, eps, strategy="round_robin") as client:
            for key in range(30):
                assert client.route(IOnly, key) == "s1"
                assert await client.get_grain(IOnly, key).ping() == "pong"


def versioned(version: int, methods: Sequence[str] = ("version",)) -> type[forkcore.Grain]:
    namespace: dict[str, Any] = {}
    for name in methods:
        async def stub(self: Any) -> int: ...
        namespace[name] = stub
    iface = type("IVersioned", (forkcore.GrainInterface,), namespace, name="test.versioned",
                 version=version)

    impl: dict[str, Any] = {}
    for name in methods:
        async def method(self: Any, _v: int = version) -> int:
            return _v
        impl[name] = method
    return type(f"Versioned{version}", (forkcore.Grain, iface), impl)


@pytest.mark.parametrize(("resolver", "expected"), [
    ("highest_version", {2}), ("union", {1, 2})])
async def test_conflict_resolvers_with_versions_1_and_2(
        transport: str, resolver: str, expected: set[int]) -> None:
    async with hosts(transport) as h:
        eps = [await h.start("old", grains=[versioned(1)]),
               await h.start("new", grains=[versioned(2)])]
        async with multi(transport, eps, strategy="round_robin",
                         conflict_resolver=resolver) as client:
            seen = {await client.call("test.versioned", k, "version") for k in range(40)}
            assert seen == expected


async def test_strict_resolver_excludes_servers_whose_methods_differ(
        transport: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with hosts(transport) as h:
        eps = [await h.start("a", grains=[versioned(1)]),
               await h.start("b", grains=[versioned(1)]),
               await h.start("odd", grains=[versioned(1, ("version", "extra"))])]
        async with multi(transport, eps, strategy="round_robin",
                         conflict_resolver="strict") as client:
            routed = {client.route("test.versioned", k) for k in range(40)}
            assert routed == {"a", "b"}
            assert "odd" in caplog.text and "excluded" in caplog.text


async def test_no_server_available_explains_itself(transport: str) -> None:
    async with hosts(transport) as h:
        eps = [await h.start("s0"), await h.start("s1")]
        async with multi(transport, eps) as client:
            with pytest.raises(NoServerAvailable) as info:
                await client.call("test.missing", "k", "f")
            message = str(info.value)
            assert "test.missing" in message
            assert "s0 (healthy; offers test.where v1)" in message
            assert "s1 (healthy" in message
            h.stop("s0")
            h.stop("s1")
            await wait_until(lambda: all(v.state == "unhealthy" for v in client.servers))
            start = anyio.current_time()
            with pytest.raises(NoServerAvailable) as info:
                await client.get_grain(IWhere, "k").where()
            assert anyio.current_time() - start < 0.5
            assert "unhealthy" in str(info.value) and "test.where" in str(info.value)


async def test_required_affinity_fails_fast_while_its_server_is_down(transport: str) -> None:
    async with hosts(transport) as h:
        eps = [await h.start("s0"), await h.start("s1")]
        async with multi(transport, eps) as client:
            pinned = client.get_grain(IWhere, "k", server="s1", affinity="required")
            preferred = client.get_grain(IWhere, "k", server="s1")
            assert await pinned.where() == "s1"
            assert await preferred.where() == "s1"
            assert client.route(IWhere, "k", server="s1", affinity="required") == "s1"
            h.stop("s1")
            await wait_until(lambda: not {v.id: v for v in client.servers}["s1"].healthy)
            start = anyio.current_time()
            with pytest.raises(NoServerAvailable, match="required server 's1'"):
                await pinned.where()
            assert anyio.current_time() - start < 0.5
            assert await preferred.where() == "s0"  # falls back through the pipeline
            with pytest.raises(NoServerAvailable, match="required server 'nope'"):
                await client.get_grain(IWhere, "k", server="nope", affinity="required").where()


async def test_add_and_remove_server_move_only_their_keys(transport: str) -> None:
    keys = range(300)
    async with hosts(transport) as h:
        eps = [await h.start(f"s{i}") for i in range(3)]
        async with multi(transport, eps) as client:
            before = {k: client.route(IWhere, k) for k in keys}
            new_ep = await h.start("s3")
            assert await client.add_server(new_ep) == "s3"
            assert await client.add_server(new_ep) == "s3"  # already known
            after_add = {k: client.route(IWhere, k) for k in keys}
            moved = {k for k in keys if before[k] != after_add[k]}
            assert moved and all(after_add[k] == "s3" for k in moved)
            for k in list(moved)[:5]:
                assert await client.get_grain(IWhere, k).where() == "s3"

            await client.remove_server("s1")
            after_remove = {k: client.route(IWhere, k) for k in keys}
            moved = {k for k in keys if after_add[k] != after_remove[k]}
            assert moved == {k for k in keys if after_add[k] == "s1"}
            assert "s1" not in {v.id for v in client.servers}
            with pytest.raises(ConfigError, match="no such server"):
                await client.remove_server("s1")


async def test_removed_server_finishes_calls_in_flight(transport: str) -> None:
    async with hosts(transport) as h:
        eps = [await h.start("s0"), await h.start("s1")]
        async with multi(transport, eps) as client:
            pinned = client.get_grain(IWhere, "k", server="s1", affinity="required")
            result: list[str] = []
            async with anyio.create_task_group() as tg:
                async def call() -> None:
                    result.append(await pinned.sleep_where(0.3))

                tg.start_soon(call)
                await anyio.sleep(0.1)
                await client.remove_server("s1")
                with pytest.raises(NoServerAvailable):
                    await pinned.where()
            assert result == ["s1"]


async def test_add_server_that_is_not_there_is_connect_error(transport: str) -> None:
    async with hosts(transport) as h:
        eps = [await h.start("s0")]
        async with multi(transport, eps, connect_timeout=0.5) as client:
            with pytest.raises(ConnectError, match="add_server"):
                await client.add_server("127.0.0.1:9")
            assert [v.id for v in client.servers] == ["s0"]


async def test_reconnecting_server_manifest_replaces_the_old_one(transport: str) -> None:
    async with hosts(transport) as h:
        ep = await h.start("up", grains=[versioned(1)])
        other = await h.start("other")
        async with multi(transport, [ep, other]) as client:
            assert await client.call("test.versioned", "k", "version") == 1
            h.stop("up")
            await wait_until(lambda: not {v.id: v for v in client.servers}["up"].healthy)
            await h.start("up", grains=[versioned(2)], listen=ep)  # upgraded in place
            await wait_until(lambda: {v.id: v for v in client.servers}["up"].healthy)
            view = {v.id: v for v in client.servers}["up"]
            assert view.versions["test.versioned"].version == 2
            assert await client.call("test.versioned", "k", "version") == 2


async def test_multi_client_with_no_reachable_server_is_connect_error(transport: str) -> None:
    with anyio.fail_after(5), pytest.raises(ConnectError, match="could not connect"):
        async with multi(transport, ["127.0.0.1:9", "127.0.0.1:10"], connect_timeout=0.5):
            pass


async def test_multi_client_starts_with_some_servers_down(transport: str) -> None:
    async with hosts(transport) as h:
        ep = await h.start("s0")
        async with multi(transport, [ep, "127.0.0.1:9"], connect_timeout=0.5) as client:
            assert [v.id for v in client.servers] == ["s0"]
            assert await client.get_grain(IWhere, 1).where() == "s0"


async def test_calls_use_the_least_busy_connection(transport: str) -> None:
    async with hosts(transport) as h:
        ep = await h.start("s0")
        async with multi(transport, [ep], connections_per_server=3) as client:
            async with anyio.create_task_group() as tg:
                for key in range(9):
                    tg.start_soon(client.get_grain(IWhere, key).sleep_where, 0.2)
                await anyio.sleep(0.1)
                assert {v.id: v for v in client.servers}["s0"].in_flight == 9
                connections = client._pool.states["s0"].connections
                assert sorted(len(c.pending) for c in connections) == [3, 3, 3]


async def test_sticky_keeps_grains_where_they_first_ran_when_servers_join(
        transport: str) -> None:
    keys = range(200)
    async with hosts(transport) as h:
        eps = [await h.start(f"s{i}") for i in range(3)]
        async with multi(transport, eps, affinity="sticky") as client:
            first = {k: await client.get_grain(IWhere, k).where() for k in keys}
            await client.add_server(await h.start("s3"))
            # consistent hashing alone would move some keys onto s3; sticky keeps them
            assert any(client.strategy.select(forkcore.GrainId("test.where", k),
                                              client._pool.candidates("test.where")) == "s3"
                       for k in keys)
            assert {k: await client.get_grain(IWhere, k).where() for k in keys} == first
            assert await client.get_grain(IWhere, "brand-new").where() in {"s0", "s1", "s2",
                                                                           "s3"}
            # once a grain's server is gone, sticky lets go
            h.stop("s1")
            await wait_until(lambda: not {v.id: v for v in client.servers}["s1"].healthy)
            moved = [k for k in keys if first[k] == "s1"]
            for k in moved[:10]:
                assert await client.get_grain(IWhere, k).where() != "s1"


async def test_zone_affinity_prefers_servers_of_the_grains_zone(transport: str) -> None:
    async with hosts(transport) as h:
        eps = [await h.start("eu-a", zone="eu"), await h.start("eu-b", zone="eu"),
               await h.start("us-a", zone="us")]
        zones = {"player-eu": "eu", "player-us": "us", "7": "us"}
        async with multi(transport, eps, affinity="zone",
                         affinity_options={"zones": zones}) as client:
            assert {v.id: v.zone for v in client.servers} == {
                "eu-a": "eu", "eu-b": "eu", "us-a": "us"}
            for _ in range(5):
                assert await client.get_grain(IWhere, "player-us").where() == "us-a"
                assert await client.get_grain(IWhere, 7).where() == "us-a"
                assert await client.get_grain(IWhere, "player-eu").where() in {"eu-a", "eu-b"}
            h.stop("us-a")
            await wait_until(lambda: not {v.id: v for v in client.servers}["us-a"].healthy)
            # no server of the grain's zone is left: the pipeline falls back
            assert await client.get_grain(IWhere, "player-us").where() in {"eu-a", "eu-b"}


async def test_bad_affinity_options_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="affinity_options"):
        multi("memory", ["127.0.0.1:1"], affinity="sticky",
              affinity_options={"no_such_option": 1})
