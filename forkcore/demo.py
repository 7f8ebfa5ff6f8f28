"""`forkcore demo`: three servers and a multi-server client in one process, on loopback.

It routes a workload of player grains with `consistent_hash`, shows calls and grains per
server, stops one server while calls continue (about a third of the grains move, all of
them from the stopped server), then brings it back and its grains return. Without the
strategies plugin it falls back to a single-mode tour.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import anyio
import anyio.abc

from .client.client import Client
from .client.views import ServerView
from .errors import ConnectError, NoServerAvailable, RemoteError
from .grains import Grain, GrainInterface, rpc
from .plugins import registry
from .report import Progress, render_servers
from .server.server import Server


class IDemoPlayer(GrainInterface, name="demo.player"):
    @rpc(idempotent=True)
    async def visit(self) -> str: ...
    async def add(self, amount: int) -> int: ...
    async def fail(self) -> None: ...


class DemoPlayer(Grain, IDemoPlayer):
    server_id = "?"

    def __init__(self) -> None:
        self.total = 0

    async def visit(self) -> str:
        return self.server_id

    async def add(self, amount: int) -> int:
        current = self.total
        await anyio.sleep(0)  # lets other calls try to interleave; turns keep them apart
        self.total = current + amount
        return self.total

    async def fail(self) -> None:
        raise ValueError("grains raise, callers get RemoteError")


def _hosted_on(server_id: str) -> type[DemoPlayer]:
    return type(f"DemoPlayer_{server_id}", (DemoPlayer,), {"server_id": server_id})


async def _host(server: Server, stop: anyio.Event, *,
                task_status: anyio.abc.TaskStatus[Server] = anyio.TASK_STATUS_IGNORED) -> None:
    async with server:
        task_status.started(server)
        await stop.wait()


class Cluster:
    """Demo servers in tasks of one task group, each stoppable and restartable."""

    def __init__(self, tg: anyio.abc.TaskGroup, transport: str) -> None:
        self.tg = tg
        self.transport = transport
        self.stops: dict[str, anyio.Event] = {}
        self.endpoints: dict[str, str] = {}

    async def start(self, server_id: str, listen: str = "127.0.0.1:0") -> str:
        self.stops[server_id] = anyio.Event()
        server = Server(id=server_id, listen=listen, transport=self.transport,
                        grains=[_hosted_on(server_id)], drain_timeout=1.0)
        await self.tg.start(_host, server, self.stops[server_id])
        self.endpoints[server_id] = server.endpoint or ""
        return self.endpoints[server_id]

    def stop(self, server_id: str) -> None:
        self.stops[server_id].set()

    def stop_all(self) -> None:
        for stop in self.stops.values():
            stop.set()


async def _workload(client: Client, keys: Sequence[int], label: str) -> Counter[str]:
    """One `visit` per player, 64 at a time; calls refused mid-failover are retried."""
    landed: Counter[str] = Counter()
    progress = Progress(label, len(keys))
    limiter = anyio.CapacityLimiter(64)

    async def visit(key: int) -> None:
        async with limiter:
            player = client.get_grain(IDemoPlayer, f"player-{key}")
            for attempt in range(50):
                try:
                    landed[await player.visit()] += 1
                    break
                except (ConnectError, NoServerAvailable):
                    await anyio.sleep(0.02 * (attempt + 1))
            progress.advance()

    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(visit, key)
    progress.finish()
    return landed


def _routes(client: Client, keys: Sequence[int]) -> dict[int, str]:
    return {k: client.route(IDemoPlayer, f"player-{k}") for k in keys}


async def _table(client: Client, routes: dict[int, str]) -> str:
    """The servers with CALLS as in `forkcore status` (served by each server since it
    started) and PLAYERS (the players routed to each server now)."""
    stats = await client.server_stats()
    players = Counter(routes.values())
    return render_servers(client.servers, {
        "CALLS": {sid: str(v.get("calls", "-")) for sid, v in stats.items()},
        "PLAYERS": {sid: str(n) for sid, n in players.items()},
    })


LEGEND = ("   CALLS: served by each server since it started (as in forkcore status); "
          "PLAYERS: routed to it now")


async def _wait_for(predicate: object, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await anyio.sleep(0.01)


async def run_demo(players: int = 300) -> None:
    transport = "tcp" if "tcp" in registry("transport") else "memory"
    if "consistent_hash" not in registry("strategy"):
        print("forkcore demo: the strategies plugin is not installed (it comes with the "
              "distribution forkcore-strategies: from a forkcore checkout, "
              "'pip install ./plugins/strategies'); showing single mode only\n")
        await _single_mode_tour(transport)
        return
    started = time.perf_counter()
    keys = range(players)
    print(f"forkcore demo: three servers and one multi-server client in this process "
          f"(transport {transport}, strategy consistent_hash)\n")
    async with anyio.create_task_group() as tg:
        cluster = Cluster(tg, transport)
        try:
            endpoints = [await cluster.start(f"s{i}") for i in (1, 2, 3)]
            async with Client(mode="multi", servers=endpoints, transport=transport,
                              strategy="consistent_hash", reconnect_initial_delay=0.02,
                              reconnect_max_delay=0.2, request_timeout=5.0) as client:
                await _tour(client, cluster, keys)
        finally:
            cluster.stop_all()
    print(f"\ndone in {time.perf_counter() - started:.2f}s. Next: docs/getting-started.md "
          "writes a grain of your own, serves it and calls it.")


async def _tour(client: Client, cluster: Cluster, keys: Sequence[int]) -> None:
    # warm-up: every server's first heartbeat answered before the burst, so the RTT shown
    # is the network's, not that of a ping queued behind 300 calls
    await _wait_for(lambda: all(v.rtt is not None for v in client.servers))
    print(f"1. {len(keys)} players, one call each, routed by consistent hashing:")
    routes = _routes(client, keys)
    await _workload(client, keys, "calls")
    print("\n" + await _table(client, routes) + "\n" + LEGEND + "\n")

    player = client.get_grain(IDemoPlayer, "player-0")
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(player.add, 1)
    print(f"2. 50 concurrent add(1) to one grain: total {await player.add(0)} "
          "(turn-based: no update lost)")
    try:
        await player.fail()
    except RemoteError as exc:
        print(f"   a grain's exception comes back typed: RemoteError({exc.type_name!r}, "
              f"{exc.message!r});\n   the server logs it with its traceback\n")

    print("3. server s2 stops while calls continue:")
    before = routes
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_later, cluster)
        calls = await _workload(client, keys, "calls during the stop")
    await _wait_for(lambda: not _view(client, "s2").healthy)
    print(f"   s2 said goodbye and drained; the client stopped routing to it and retried "
          f"the calls it refused on the others: all {calls.total()} calls answered")
    during = _routes(client, keys)
    moved = [k for k in keys if before[k] != during[k]]
    from_s2 = sum(1 for k in moved if before[k] == "s2")
    print(f"   {len(moved)} of {len(keys)} grains moved ({100 * len(moved) / len(keys):.0f}%), "
          f"{from_s2} of them from s2; the others stayed where they were")
    await _workload(client, keys, "calls after the stop")
    print("\n" + await _table(client, during) + "\n")

    print("4. s2 comes back on the same address:")
    await cluster.start("s2", listen=cluster.endpoints["s2"])
    await _wait_for(lambda: _view(client, "s2").healthy)
    after = _routes(client, keys)
    back = [k for k in moved if after[k] == "s2"]
    print(f"   {len(back)} of the {len(moved)} moved grains are routed to s2 again; "
          f"{sum(1 for k in keys if after[k] != before[k])} differ from the start")
    await _workload(client, keys, "calls")
    print("\n" + await _table(client, after))


async def _stop_later(cluster: Cluster) -> None:
    await anyio.sleep(0.005)
    cluster.stop("s2")


def _view(client: Client, server_id: str) -> ServerView:
    for view in client.servers:
        if view.id == server_id:
            return view
    raise LookupError(server_id)


async def _single_mode_tour(transport: str) -> None:
    async with anyio.create_task_group() as tg:
        cluster = Cluster(tg, transport)
        try:
            endpoints = [await cluster.start(f"s{i}") for i in (1, 2)]
            async with Client(servers=endpoints, transport=transport,
                              reconnect_initial_delay=0.02) as client:
                player = client.get_grain(IDemoPlayer, "player-1")
                async with anyio.create_task_group() as calls:
                    for _ in range(20):
                        calls.start_soon(player.add, 1)
                print(f"1. 20 concurrent add(1): total {await player.add(0)}, served by "
                      f"{await player.visit()}")
                print("2. s1 stops; the client moves to the next endpoint")
                cluster.stop("s1")
                with anyio.fail_after(10):
                    while True:
                        try:
                            print(f"   now served by {await player.visit()}")
                            break
                        except (ConnectError, NoServerAvailable):
                            await anyio.sleep(0.02)
                print("\n" + render_servers(client.servers))
        finally:
            cluster.stop_all()
