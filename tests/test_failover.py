"""Health, failover, draining and recovery against real `forkcore serve` processes and
real signals (SIGKILL, SIGSTOP/SIGCONT, SIGTERM)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from grains_sample import IWhere
from serving import ServeProcess, start_server

import forkcore
from forkcore.errors import ConnectError, ForkcoreError, NoServerAvailable
from forkcore.plugins import registry

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX signals")]

GRAINS = '["grains_where"]'
HEARTBEAT = 0.1
UNHEALTHY_AFTER = 3


TRANSPORTS = ["tcp", "udp"]


class Fleet:
    def __init__(self, directory: Path, transport: str) -> None:
        self.directory = directory
        self.transport = transport
        self.log = directory / "calls.log"
        self.log.write_text("")
        self.procs: dict[str, ServeProcess] = {}

    def start(self, server_id: str, listen: str = "127.0.0.1:0") -> str:
        proc = start_server(self.directory, server_id, grains=GRAINS, listen=listen,
                            extra=f'transport = "{self.transport}"\n',
                            env={"FORKCORE_TEST_SERVER_ID": server_id,
                                 "FORKCORE_TEST_LOG": str(self.log)})
        self.procs[server_id] = proc
        return proc.endpoint

    def signal(self, server_id: str, signum: int) -> None:
        self.procs[server_id].signal(signum)

    def kill(self, server_id: str) -> None:
        self.signal(server_id, signal.SIGKILL)
        self.procs[server_id].proc.wait(timeout=10)

    def records(self) -> list[tuple[str, str]]:
        return [tuple(line.split(" ", 1)) for line in self.log.read_text().splitlines()]  # type: ignore[misc]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.signal(signal.SIGCONT)
            proc.stop()


@pytest.fixture(params=TRANSPORTS)
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    if request.param not in registry("transport"):
        pytest.skip(f"transport {request.param} is not installed")
    f = Fleet(tmp_path, request.param)
    try:
        yield f
    finally:
        f.stop_all()


def multi(fleet: Fleet, endpoints: list[str], **options: Any) -> forkcore.Client:
    options.setdefault("request_timeout", 2.0)
    if fleet.transport == "udp":  # the servers generate their certificates at start
        options.setdefault("transport_options", {"insecure": True})
    return forkcore.Client(
        mode="multi", servers=endpoints, transport=fleet.transport,
        strategy="consistent_hash",
        reconnect_initial_delay=0.02, reconnect_max_delay=0.2,
        health={"heartbeat_interval": HEARTBEAT, "unhealthy_after": UNHEALTHY_AFTER},
        **options)


def view(client: forkcore.Client, server_id: str) -> forkcore.ServerView:
    return {v.id: v for v in client.servers}[server_id]


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


def key_on(client: forkcore.Client, server_id: str, interface: Any = IWhere) -> int:
    return next(k for k in range(10_000) if client.route(interface, k) == server_id)


async def test_sigkill_under_32_callers(fleet: Fleet) -> None:
    endpoints = [fleet.start(f"k{i}") for i in range(3)]
    timeout = 2.0
    idempotent_failures: list[BaseException] = []
    other_failures: list[BaseException] = []
    overruns: list[float] = []
    calls = 0
    async with multi(fleet, endpoints, request_timeout=timeout) as client:
        async def caller(n: int) -> None:
            nonlocal calls
            end = anyio.current_time() + 1.5
            i = 0
            while anyio.current_time() < end:
                grain = client.get_grain(IWhere, n * 1000 + i % 20)
                idempotent = i % 2 == 0
                start = anyio.current_time()
                try:
                    if idempotent:
                        await grain.sleep_where_idempotent(0.02)
                    else:
                        await grain.sleep_where(0.02)
                except BaseException as exc:
                    (idempotent_failures if idempotent else other_failures).append(exc)
                elapsed = anyio.current_time() - start
                if elapsed > timeout + 0.5:
                    overruns.append(elapsed)
                calls += 1
                i += 1

        doomed = [k for k in range(10_000) if client.route(IWhere, k) == "k1"][:8]
        long_results: list[Any] = []

        async def long_call(key: int, idempotent: bool) -> None:
            grain = client.get_grain(IWhere, key)
            method = grain.sleep_where_idempotent if idempotent else grain.sleep_where
            try:
                long_results.append((idempotent, await method(1.0)))
            except ForkcoreError as exc:
                long_results.append((idempotent, exc))

        async with anyio.create_task_group() as tg:
            for n in range(32):
                tg.start_soon(caller, n)
            for i, key in enumerate(doomed):
                tg.start_soon(long_call, key, i % 2 == 0)
            await anyio.sleep(0.5)
            fleet.kill("k1")
    assert calls > 100
    # calls in flight on k1 when it died: idempotent ones were resent and succeeded
    # elsewhere, the others failed at once with ConnectError
    assert len(long_results) == 8
    for idempotent, outcome in long_results:
        if idempotent:
            assert outcome in {"k0", "k2"}
        else:
            assert isinstance(outcome, ConnectError)
    assert idempotent_failures == []
    assert all(isinstance(e, ForkcoreError) for e in other_failures), other_failures
    assert overruns == []


async def test_sigstop_makes_a_server_unhealthy_and_sigcont_brings_it_back(
        fleet: Fleet) -> None:
    endpoints = [fleet.start(f"f{i}") for i in range(3)]
    keys = range(200)
    async with multi(fleet, endpoints) as client:
        before = {k: client.route(IWhere, k) for k in keys}
        frozen_key = key_on(client, "f2")
        fleet.signal("f2", signal.SIGSTOP)
        stopped = time.monotonic()
        await wait_until(lambda: not view(client, "f2").healthy)
        detected = time.monotonic() - stopped
        assert detected < HEARTBEAT * UNHEALTHY_AFTER + 0.5
        assert view(client, "f2").state == "unhealthy"
        # it gets no calls: its keys go elsewhere and are answered
        assert client.route(IWhere, frozen_key) != "f2"
        with anyio.fail_after(2):
            assert await client.get_grain(IWhere, frozen_key).where() != "f2"
        assert view(client, "f2").last_error == "stopped answering heartbeats"
        fleet.signal("f2", signal.SIGCONT)
        await wait_until(lambda: view(client, "f2").healthy)
        assert view(client, "f2").last_error is None  # recovered: nothing to report
        assert {k: client.route(IWhere, k) for k in keys} == before
        assert await client.get_grain(IWhere, frozen_key).where() == "f2"


@pytest.mark.parametrize("idempotent", [False, True])
async def test_call_in_flight_when_its_server_dies(fleet: Fleet, idempotent: bool) -> None:
    endpoints = [fleet.start(f"d{i}") for i in range(3)]
    async with multi(fleet, endpoints, request_timeout=5.0) as client:
        victim = "d0"
        key = next(k for k in range(10_000)
                   if client.route("test.recorder", k) == victim)
        grain = client.get_grain(_recorder(), key)
        method = grain.record_idempotent if idempotent else grain.record
        outcome: list[Any] = []

        async def call() -> None:
            try:
                outcome.append(await method("the-call", 1.0))
            except ForkcoreError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await wait_until(lambda: ("d0", "the-call") in fleet.records(), timeout=5)
            fleet.kill(victim)
        runs = [server for server, tag in fleet.records() if tag == "the-call"]
        if idempotent:
            assert outcome[0] in {"d1", "d2"}
            assert runs == ["d0", outcome[0]]
        else:
            assert isinstance(outcome[0], ConnectError)
            assert runs == ["d0"]  # never run again elsewhere


def _recorder() -> Any:
    from grains_where import IRecorder

    return IRecorder


async def test_every_server_frozen_fails_fast_then_recovers(fleet: Fleet) -> None:
    endpoints = [fleet.start(f"z{i}") for i in range(2)]
    async with multi(fleet, endpoints) as client:
        for sid in ("z0", "z1"):
            fleet.signal(sid, signal.SIGSTOP)
        await wait_until(lambda: not any(v.healthy for v in client.servers))
        start = time.monotonic()
        with pytest.raises(NoServerAvailable) as info:
            await client.get_grain(IWhere, 1).where()
        assert time.monotonic() - start < 1.0
        assert "z0 (unhealthy" in str(info.value) and "z1 (unhealthy" in str(info.value)
        fleet.signal("z1", signal.SIGCONT)
        await wait_until(lambda: view(client, "z1").healthy)
        with anyio.fail_after(2):
            assert await client.get_grain(IWhere, 1).where() == "z1"


async def test_draining_server_finishes_its_call_and_new_calls_go_elsewhere(
        fleet: Fleet) -> None:
    endpoints = [fleet.start(f"t{i}") for i in range(3)]
    async with multi(fleet, endpoints, request_timeout=5.0) as client:
        key = key_on(client, "t0")
        result: list[str] = []

        async def long_call() -> None:
            result.append(await client.get_grain(IWhere, key).sleep_where(1.0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_call)
            await anyio.sleep(0.2)
            fleet.signal("t0", signal.SIGTERM)
            await wait_until(lambda: view(client, "t0").state in ("draining", "unhealthy"))
            # from now on nothing new goes to t0, and new calls succeed elsewhere
            assert client.route(IWhere, key) != "t0"
            assert await client.get_grain(IWhere, key).where() != "t0"
        assert result == ["t0"]
        assert fleet.procs["t0"].proc.wait(timeout=10) == 0
