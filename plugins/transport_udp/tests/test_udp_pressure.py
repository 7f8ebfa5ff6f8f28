"""Transport `udp` under pressure, against real `forkcore serve` processes (issue 12):
large messages after a burst, timers after hundreds of connections, a client that never
reads, and liveness while a large answer is on its way. Every wait has a deadline."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from forkcore_transport_udp.options import UdpOptions
from udp_grains import IGame
from udp_relay import LossyRelay

import forkcore
import forkcore.plugins
from forkcore.errors import ConnectError
from forkcore.protocol.connection import ProtocolConnection
from forkcore.protocol.messages import PROTOCOL_VERSION, Hello, Welcome

HERE = Path(__file__).resolve().parent
ROOT_TESTS = HERE.parents[2] / "tests"
sys.path.insert(0, str(ROOT_TESTS))  # the repository's process helpers
from serving import ServeProcess, start_server  # noqa: E402

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX signals")]

CLIENT_OPTIONS = {"insecure": True}  # the servers generate their certificates at start
ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT_TESTS), str(HERE)])}
KiB, MiB = 1024, 1024 * 1024


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start `forkcore serve` over udp with the test grains; every one is killed after."""
    started: list[ServeProcess] = []

    def start(transport_options: str = "{}") -> ServeProcess:
        proc = start_server(tmp_path, f"udp{len(started)}", grains='["udp_grains"]', env=ENV,
                            extra=f'transport = "udp"\ntransport_options = '
                                  f'{transport_options}\n')
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.signal(signal.SIGCONT)
            proc.stop()


def client(endpoint: str, **options: Any) -> forkcore.Client:
    options.setdefault("request_timeout", 30.0)
    return forkcore.Client(servers=[endpoint], transport="udp",
                           transport_options=CLIENT_OPTIONS, **options)


def udp_transport() -> Any:
    return forkcore.plugins.create("transport", "udp", CLIENT_OPTIONS, "test")


@asynccontextmanager
async def relayed(endpoint: str, **relay_options: Any) -> AsyncIterator[LossyRelay]:
    relay = LossyRelay(endpoint, **relay_options)
    async with anyio.create_task_group() as tg:
        await tg.start(relay.run)
        try:
            yield relay
        finally:
            tg.cancel_scope.cancel()


async def burst_then_echo(endpoint: str, sizes: list[int], timeout: float) -> None:
    """100 concurrent calls, then one echo of each size, each within `timeout`."""
    async with client(endpoint, request_timeout=timeout) as c:
        results: list[int] = []

        async def add(i: int) -> None:
            results.append(await c.get_grain(IGame, f"burst{i % 10}").add(1))

        with anyio.fail_after(timeout):
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(add, i)
        assert len(results) == 100
        game = c.get_grain(IGame, "big")
        for size in sizes:
            payload = os.urandom(size)
            with anyio.fail_after(timeout):
                assert await game.echo(payload) == payload


# -- 1: a large message after a burst ------------------------------------------------------


async def test_burst_then_echoes_of_256k_1m_4m_complete(serve: Any) -> None:
    server = serve()
    await burst_then_echo(server.endpoint, [256 * KiB, 1 * MiB, 4 * MiB], timeout=20.0)


async def test_burst_then_4m_echo_through_a_lossy_relay(serve: Any) -> None:
    """10% loss, duplicates and reordering each way: only loss recovery (timers) can get
    the 4 MiB through."""
    server = serve()
    async with relayed(server.endpoint, seed=21) as relay:
        await burst_then_echo(relay.endpoint, [4 * MiB], timeout=30.0)
    assert relay.up.dropped and relay.down.dropped and relay.down.reordered


# -- 2: timers keep firing -----------------------------------------------------------------


def half_open_handshake(endpoint: str) -> socket.socket:
    """Send a ClientHello from a socket of its own and never continue; the socket is
    returned open (and never read), so the server hears no ICMP error either."""
    host, port = endpoint.rsplit(":", 1)
    configuration = QuicConfiguration(is_client=True, alpn_protocols=["forkcore/1"])
    configuration.verify_mode = ssl.CERT_NONE
    quic = QuicConnection(configuration=configuration)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    now = time.monotonic()
    quic.connect((host, int(port)), now=now)
    for data, addr in quic.datagrams_to_send(now=now):
        sock.sendto(data, addr)
    return sock


async def can_connect(endpoint: str, timeout: float) -> bool:
    try:
        async with udp_transport().connect(endpoint, timeout=timeout):
            return True
    except ConnectError:
        return False


def start_process(script: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(script), *args], env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)


async def server_connections(observer: forkcore.Client) -> int:
    stats = await observer.server_stats(timeout=2.0)
    (values,) = stats.values()
    return int(values["connections"])


async def test_timers_fire_after_hundreds_of_connections(serve: Any, tmp_path: Path) -> None:
    """Hundreds of short connections, then calls a few milliseconds apart (after each,
    the server's deadline falls back to its ping timer and leaves a stale entry in the
    engine's timer heap: hundreds of them within a ping interval get the heap pruned),
    then half-open handshakes up to the per-address limit: they must time out, so a fresh
    client gets in; and a SIGKILLed client must be dropped after the idle timeout."""
    idle, handshake = 2.0, 2.0
    server = serve(f"{{ idle_timeout = {idle}, handshake_timeout = {handshake} }}")
    endpoint = server.endpoint
    transport = udp_transport()
    with anyio.fail_after(120):
        for _ in range(200):
            async with transport.connect(endpoint, timeout=5.0):
                pass
        async with client(endpoint) as c:
            game = c.get_grain(IGame, "paced")
            for n in range(1, 301):
                assert await game.add(1) == n
                await anyio.sleep(0.003)
        sockets = [half_open_handshake(endpoint)
                   for _ in range(UdpOptions().max_handshakes_per_address)]
        try:
            assert not await can_connect(endpoint, 0.5), "the half-open handshakes did not count"
            deadline = anyio.current_time() + handshake + 5.0
            while not await can_connect(endpoint, 1.0):
                assert anyio.current_time() < deadline, \
                    "locked out: the half-open handshakes never timed out"
        finally:
            for sock in sockets:
                sock.close()

        script = tmp_path / "holder.py"
        script.write_text(
            "import sys, anyio, forkcore\nfrom udp_grains import IGame\n"
            "async def main():\n"
            f"    async with forkcore.Client(servers=[sys.argv[1]], transport='udp', "
            f"transport_options={CLIENT_OPTIONS!r}) as c:\n"
            "        await c.get_grain(IGame, 'held').add(1)\n"
            "        print('ready', flush=True)\n"
            "        await anyio.sleep(120)\n"
            "anyio.run(main)\n")
        holder = start_process(script, endpoint)
        try:
            async with client(endpoint) as observer:
                assert holder.stdout is not None
                line = await anyio.to_thread.run_sync(holder.stdout.readline)
                assert line == b"ready\n", line
                assert await server_connections(observer) == 2
                holder.kill()
                holder.wait(timeout=10)
                killed = anyio.current_time()
                while await server_connections(observer) != 1:
                    assert anyio.current_time() - killed < idle + 5.0, \
                        "the server never dropped the SIGKILLed client"
                    await anyio.sleep(0.1)
        finally:
            holder.kill()
            holder.wait(timeout=10)


# -- 3: a client that never reads ----------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
async def test_a_client_that_never_reads_is_stopped_by_flow_control(serve: Any) -> None:
    """8 KiB echo requests, never a read: QUIC flow control must block the sender before
    the server's memory grows, while a good client on another connection is served."""
    server = serve()
    pid = server.proc.pid
    proto = ProtocolConnection("client")
    payload = os.urandom(8 * KiB)
    good_calls = 0
    peak = baseline = 0.0
    sent = 0
    blocked = False

    async def good(c: forkcore.Client) -> None:
        nonlocal good_calls
        game = c.get_grain(IGame, "good")
        while True:
            with anyio.fail_after(10):
                await game.add(1)
            good_calls += 1
            await anyio.sleep(0.01)

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib(pid))
            await anyio.sleep(0.05)

    with anyio.fail_after(120):
        async with client(server.endpoint) as c, anyio.create_task_group() as tg:
            await c.get_grain(IGame, "good").add(1)
            baseline = peak = rss_mib(pid)
            tg.start_soon(good, c)
            tg.start_soon(watch)
            async with udp_transport().connect(server.endpoint, timeout=5.0) as channel:
                channel.send(proto.encode(Hello(PROTOCOL_VERSION, "never-reads", ())))
                assert isinstance(proto.decode(await channel.receive()), Welcome)
                stop_at = anyio.current_time() + 60
                while sent < 100_000 and anyio.current_time() < stop_at:
                    sent += 1
                    channel.send(proto.encode_request(sent, "udptest.game", "flood", "echo",
                                                      [payload], {}, 30.0))
                    with anyio.move_on_after(3.0) as waited:
                        await channel.drain()
                    if waited.cancelled_caught:
                        blocked = True
                        break
                served_before = good_calls
                await anyio.sleep(1.0)  # still blocked: the good client goes on
                assert good_calls > served_before, "the good client stopped being served"
            tg.cancel_scope.cancel()
    assert blocked, f"{sent} requests of 8 KiB went out without the sender being blocked"
    grown = peak - baseline
    print(f"blocked after {sent} requests; server RSS {baseline:.0f} -> {peak:.0f} MiB")
    assert grown < 48, f"server RSS grew by {grown:.0f} MiB ({baseline:.0f} -> {peak:.0f})"


# -- 4: liveness while a large answer is on its way ----------------------------------------


async def test_a_server_sending_16mb_stays_healthy_and_a_frozen_one_is_detected(
        serve: Any) -> None:
    """Through a 4 MiB/s bottleneck a 16 MB answer takes about 4 s, more than the 1.5 s
    of silence that marks a server unhealthy; bytes arriving must count as life. Then
    SIGSTOP: detected within the same 1.5 s (plus the heartbeat's tick and slack)."""
    interval, after = 0.5, 3
    server = serve()
    size = 16_000_000
    unhealthy: list[str] = []
    async with relayed(server.endpoint, loss=0.0, duplicate=0.0, jitter=0.0,
                       rate=4 * MiB) as relay:
        async with client(relay.endpoint, request_timeout=60.0,
                          health={"heartbeat_interval": interval,
                                  "unhealthy_after": after}) as c:
            game = c.get_grain(IGame, "big")
            assert await game.add(1) == 1
            (view,) = c.servers

            async def watch() -> None:
                while True:
                    if not view.healthy or view.state != "healthy":
                        unhealthy.append(f"{view.state}: {view.last_error}")
                    await anyio.sleep(0.05)

            start = anyio.current_time()
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                with anyio.fail_after(60):
                    answer = await game.blob(size)
                tg.cancel_scope.cancel()
            took = anyio.current_time() - start
            assert len(answer) == size
            assert took > interval * after, f"too fast ({took:.1f}s) to test anything"
            assert not unhealthy, f"marked unhealthy while receiving: {unhealthy[:3]}"

            server.signal(signal.SIGSTOP)
            stopped = anyio.current_time()
            with anyio.fail_after(interval * after + 2.0):
                while view.healthy:
                    await anyio.sleep(0.02)
            print(f"16 MB in {took:.1f}s; SIGSTOP detected after "
                  f"{anyio.current_time() - stopped:.2f}s")
            server.signal(signal.SIGCONT)
