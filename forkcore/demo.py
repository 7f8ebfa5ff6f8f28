"""`forkcore demo`: two servers and a client in one process, on loopback.

It shows a call's path end to end, turn-based execution (concurrent increments lose
nothing), typed errors, and what happens when the client's server goes away: calls in
flight fail at once, and the client moves to the next server and carries on.
"""

from __future__ import annotations

import time

import anyio
import anyio.abc
import anyio.lowlevel

from .cli import render_servers
from .client.client import Client
from .errors import ConnectError, NoServerAvailable, RemoteError
from .grains import Grain, GrainInterface
from .plugins import registry
from .server.server import Server


class IDemoCounter(GrainInterface, name="demo.counter"):
    async def add(self, amount: int) -> int: ...
    async def where(self) -> str: ...
    async def fail(self) -> None: ...


class DemoCounter(Grain, IDemoCounter):
    server_id = "?"

    def __init__(self) -> None:
        self.total = 0

    async def add(self, amount: int) -> int:
        current = self.total
        await anyio.sleep(0)  # lets other calls try to interleave; turns keep them apart
        self.total = current + amount
        return self.total

    async def where(self) -> str:
        return self.server_id

    async def fail(self) -> None:
        raise ValueError("grains raise, callers get RemoteError")


def _grain_for(server_id: str) -> type[DemoCounter]:
    return type(f"DemoCounter_{server_id}", (DemoCounter,), {"server_id": server_id})


async def _host(server: Server, stop: anyio.Event, *,
                task_status: anyio.abc.TaskStatus[Server] = anyio.TASK_STATUS_IGNORED) -> None:
    async with server:
        task_status.started(server)
        await stop.wait()


async def run_demo(calls: int = 20) -> None:
    transport = "tcp" if "tcp" in registry("transport") else "memory"
    print("forkcore demo: two servers and one client in this process, "
          f"transport {transport}\n")
    started = time.perf_counter()
    stops = [anyio.Event(), anyio.Event()]
    async with anyio.create_task_group() as tg:
        hosted = [await tg.start(_host, Server(id=f"s{i + 1}", transport=transport,
                                               grains=[_grain_for(f"s{i + 1}")]), stops[i])
                  for i in range(2)]
        async with Client(servers=[s.endpoint or "" for s in hosted], transport=transport,
                          reconnect_initial_delay=0.02) as client:
            await _phase_one(client, calls)
            await _phase_two(client, calls, stops[0])
        stops[1].set()
    print(f"\ndone in {time.perf_counter() - started:.2f}s")


async def _phase_one(client: Client, calls: int) -> None:
    counter = client.get_grain(IDemoCounter, "player-1")
    print(f"1. {calls} concurrent add(1) calls to one grain (turn-based, nothing lost):")
    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(counter.add, 1)
    total = await counter.add(0)
    print(f"   total = {total} (expected {calls}), served by {await counter.where()}")
    try:
        await counter.fail()
    except RemoteError as exc:
        print(f"2. a grain error comes back typed: RemoteError({exc.type_name!r}, "
              f"{exc.message!r})")
    print("\n" + render_servers(client.servers) + "\n")


async def _phase_two(client: Client, calls: int, stop_first: anyio.Event) -> None:
    counter = client.get_grain(IDemoCounter, "player-1")
    print("3. server s1 shuts down (gracefully: its calls in flight finish first)")
    stop_first.set()
    served, refused = 0, 0
    with anyio.fail_after(10):
        while served < calls:
            try:
                await counter.add(1)
                served += 1
            except (ConnectError, NoServerAvailable):
                refused += 1
                await anyio.sleep(0.01)
    print(f"4. the client moved to the next server: {served} calls served by "
          f"{await counter.where()} ({refused} refused while it reconnected)")
    print(f"   the grain was activated afresh there: total = {await counter.add(0)}")
    print("\n" + render_servers(client.servers))
