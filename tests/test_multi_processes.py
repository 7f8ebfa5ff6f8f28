"""The multi-server client against real `forkcore serve` processes over TCP."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from grains_sample import IWhere
from serving import ServeProcess, start_server

import forkcore
from forkcore.errors import NoServerAvailable

pytestmark = pytest.mark.anyio

WHERE = '["grains_where"]'


class Fleet:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: dict[str, ServeProcess] = {}

    def start(self, server_id: str, *, version: int = 1, listen: str = "127.0.0.1:0") -> str:
        proc = start_server(self.directory, server_id, grains=WHERE, listen=listen,
                            env={"FORKCORE_TEST_SERVER_ID": server_id,
                                 "FORKCORE_TEST_VERSION": str(version)})
        self.procs[server_id] = proc
        return proc.endpoint

    def kill(self, server_id: str) -> None:
        proc = self.procs[server_id]
        proc.signal(signal.SIGKILL)
        proc.proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.stop_all()


def multi(endpoints: list[str], **options: Any) -> forkcore.Client:
    options.setdefault("strategy", "consistent_hash")
    return forkcore.Client(mode="multi", servers=endpoints, transport="tcp",
                           reconnect_initial_delay=0.02, reconnect_max_delay=0.2,
                           request_timeout=5.0, **options)


def view(client: forkcore.Client, server_id: str) -> forkcore.ServerView:
    return {v.id: v for v in client.servers}[server_id]


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


async def test_every_call_lands_where_route_said(fleet: Fleet) -> None:
    endpoints = [fleet.start(f"p{i}") for i in range(3)]
    async with multi(endpoints) as client:
        landed = set()
        for key in range(90):
            expected = client.route(IWhere, key)
            assert await client.get_grain(IWhere, key).where() == expected
            landed.add(expected)
        assert landed == {"p0", "p1", "p2"}


@pytest.mark.parametrize(("resolver", "expected"), [
    ("highest_version", {2}), ("union", {1, 2})])
async def test_versions_1_and_2_with_each_resolver(
        fleet: Fleet, resolver: str, expected: set[int]) -> None:
    endpoints = [fleet.start("v1", version=1), fleet.start("v2", version=2)]
    async with multi(endpoints, strategy="round_robin", conflict_resolver=resolver) as client:
        seen = {await client.call("test.versioned", k, "version") for k in range(40)}
        assert seen == expected


async def test_add_and_remove_server_move_only_their_keys(fleet: Fleet) -> None:
    keys = range(400)
    endpoints = [fleet.start(f"p{i}") for i in range(3)]
    async with multi(endpoints) as client:
        before = {k: client.route(IWhere, k) for k in keys}
        assert await client.add_server(fleet.start("p3")) == "p3"
        after = {k: client.route(IWhere, k) for k in keys}
        moved = [k for k in keys if before[k] != after[k]]
        assert moved and all(after[k] == "p3" for k in moved)
        for k in moved[:10]:
            assert await client.get_grain(IWhere, k).where() == "p3"
        await client.remove_server("p0")
        final = {k: client.route(IWhere, k) for k in keys}
        assert {k for k in keys if after[k] != final[k]} == \
            {k for k in keys if after[k] == "p0"}


async def test_affinity_when_the_server_dies(fleet: Fleet) -> None:
    endpoints = [fleet.start("a"), fleet.start("b")]
    async with multi(endpoints) as client:
        required = client.get_grain(IWhere, "k", server="b", affinity="required")
        preferred = client.get_grain(IWhere, "k", server="b", affinity="preferred")
        assert await required.where() == "b"
        assert await preferred.where() == "b"
        fleet.kill("b")
        await wait_until(lambda: not view(client, "b").healthy)
        start = anyio.current_time()
        with pytest.raises(NoServerAvailable, match="required server 'b'"):
            await required.where()
        assert anyio.current_time() - start < 0.5
        assert await preferred.where() == "a"


async def test_killed_server_restarted_with_same_id_gets_its_keys_back(fleet: Fleet) -> None:
    keys = range(300)
    endpoints = [fleet.start(f"p{i}") for i in range(3)]
    async with multi(endpoints) as client:
        before = {k: client.route(IWhere, k) for k in keys}
        fleet.kill("p1")
        await wait_until(lambda: not view(client, "p1").healthy)
        during = {k: client.route(IWhere, k) for k in keys}
        assert {k for k in keys if before[k] != during[k]} == \
            {k for k in keys if before[k] == "p1"}
        fleet.start("p1", listen=endpoints[1])
        await wait_until(lambda: view(client, "p1").healthy)
        assert {k: client.route(IWhere, k) for k in keys} == before
        assert await client.get_grain(IWhere, next(k for k in keys if before[k] == "p1"))\
            .where() == "p1"
