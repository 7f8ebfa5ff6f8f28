"""The pool and the routing function, without sockets or an event loop: connections
are handshaken sans I/O (protocol sessions back to back) and carry frames nowhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from forkcore import Affinity, AffinityMode, GrainId, InterfaceInfo, ServerView
from forkcore.builtins import HighestVersion
from forkcore.client.connection import ClientConnection
from forkcore.client.pool import Pool
from forkcore.client.routing import route
from forkcore.errors import ForkcoreError, NoServerAvailable
from forkcore.protocol.messages import PROTOCOL_VERSION, Welcome
from forkcore.protocol.session import ClientSession, ServerSession


class Parked:
    """A channel that keeps what is sent to it (these tests never deliver it)."""

    peer = "parked"
    secure = False
    received_at = 0.0

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, body: bytes, delivery: str = "reliable") -> None:
        self.sent.append(body)

    async def drain(self) -> None:
        pass

    async def receive(self) -> bytes:
        raise AssertionError("not read in these tests")

    async def aclose(self) -> None:
        pass


def connection(server_id: str, *offers: tuple[str, int]) -> ClientConnection:
    welcome = Welcome(PROTOCOL_VERSION, server_id, None, {},
                      tuple(InterfaceInfo(name, version, frozenset({"m"}))
                            for name, version in offers))
    client = ClientSession(server_id, client_id="c")
    server = ServerSession("c", None, welcome=welcome)
    server.receive(client.hello())
    client.receive(server.accept())
    return ClientConnection(Parked(), f"{server_id}:1", client)  # type: ignore[arg-type]


class First:
    def select(self, grain_id: GrainId, servers: Sequence[ServerView]) -> str:
        return servers[0].id


class Broken:
    def select(self, grain_id: GrainId, servers: Sequence[ServerView]) -> str:
        return "nobody"


def pool_of(*conns: ClientConnection) -> Pool:
    pool = Pool(HighestVersion().resolve)
    for conn in conns:
        pool.attach(conn)
    return pool


GRAIN = GrainId("game", "k")


def test_candidates_are_healthy_servers_of_the_highest_version() -> None:
    pool = pool_of(connection("s1", ("game", 1)), connection("s2", ("game", 2)),
                   connection("s3", ("game", 2), ("chat", 1)))
    assert [v.id for v in pool.candidates("game")] == ["s2", "s3"]
    assert [v.id for v in pool.candidates("chat")] == ["s3"]
    assert pool.candidates("nope") == []


def test_the_candidate_list_keeps_its_identity_until_it_changes() -> None:
    a, b = connection("s1", ("game", 1)), connection("s2", ("game", 1))
    pool = pool_of(a, b)
    first = pool.candidates("game")
    assert pool.candidates("game") is first
    b.set_responsive(False)  # heartbeats stopped: the pool hears of it
    second = pool.candidates("game")
    assert second is not first and [v.id for v in second] == ["s1"]
    assert pool.candidates("game") is second
    b.on_goodbye("draining")
    b.set_responsive(True)
    assert [v.id for v in pool.candidates("game")] == ["s1"]  # draining: no new calls
    assert pool.states["s2"].view.state == "draining"


def test_route_runs_candidates_affinity_strategy() -> None:
    pool = pool_of(connection("s1", ("game", 1)), connection("s2", ("game", 1)))
    args: dict[str, Any] = {"policy": None, "strategy": First(), "strategy_name": "first"}
    assert route(pool, GRAIN, None, **args).view.id == "s1"
    # the reference's affinity wins over the strategy, preferred or required
    for mode in (AffinityMode.PREFERRED, AffinityMode.REQUIRED):
        assert route(pool, GRAIN, Affinity("s2", mode), **args).view.id == "s2"
    # a preferred server that cannot serve falls through to the strategy ...
    assert route(pool, GRAIN, Affinity("s9", AffinityMode.PREFERRED), **args).view.id == "s1"
    # ... a required one fails, saying why
    with pytest.raises(NoServerAvailable, match="required server 's9' \\(unknown\\)"):
        route(pool, GRAIN, Affinity("s9", AffinityMode.REQUIRED), **args)
    # the policy gives the affinity when the reference has none
    args["policy"] = lambda grain_id, servers: Affinity("s2", AffinityMode.PREFERRED)
    assert route(pool, GRAIN, None, **args).view.id == "s2"


def test_route_explains_when_nothing_can_serve() -> None:
    pool = pool_of(connection("s1", ("chat", 1)))
    with pytest.raises(NoServerAvailable, match="no server declares game"):
        route(pool, GRAIN, None, policy=None, strategy=First(), strategy_name="first")


def test_a_strategy_choosing_outside_the_candidates_is_reported() -> None:
    pool = pool_of(connection("s1", ("game", 1)))
    with pytest.raises(ForkcoreError, match="strategy 'broken' chose 'nobody'"):
        route(pool, GRAIN, None, policy=None, strategy=Broken(), strategy_name="broken")


def test_the_least_busy_connection_of_a_server_is_chosen() -> None:
    busy, idle = connection("s1", ("game", 1)), connection("s1", ("game", 1))
    pool = pool_of(busy, idle)
    busy.pending[1] = object()  # type: ignore[assignment]
    assert pool.states["s1"].best_connection() is idle
    idle.close("reset")
    assert pool.states["s1"].best_connection() is busy
