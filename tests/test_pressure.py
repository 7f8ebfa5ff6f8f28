"""Transports under pressure, against real `forkcore serve` processes on tcp and tcp+TLS.

- Backpressure: a raw client that completes the handshake, then sends 8 KiB echo
  requests and never reads, is held up by TCP once the server's unsent answers pass the
  channel's high-water mark; the server's memory stays within tens of MB, and a good
  client on another connection keeps being served. A client that stops reading for good
  is dropped after `send_timeout`.
- Liveness: a server busy sending a ~16 MB answer through a relay that forwards at
  2 MiB/s is never marked unhealthy (the answer's bytes prove it alive while the Pongs
  wait behind it); a frozen one (SIGSTOP) still is, and once it is back its
  `last_error` is cleared.
"""

from __future__ import annotations

import datetime
import ipaddress
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grains_bulk import IBulk
from serving import ServeProcess, start_server

import forkcore
import forkcore.plugins
from forkcore.errors import ConnectError
from forkcore.protocol.connection import ProtocolConnection
from forkcore.protocol.messages import PROTOCOL_VERSION, Hello, Welcome
from forkcore.transport import Channel

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX signals")]

GRAINS = '["grains_bulk"]'
WAIT = 10.0  # bound for anything that should simply work
REQUESTS = 100_000  # 8 KiB echo requests the never-reading client tries to send
PAYLOAD = bytes(8192)
RATE = 10_000  # requests/s: what the server can answer, so most calls run (not refused)
FLOOD_SECONDS = 60.0  # the sending loop's bound in time
BLOCKED = 2.0  # seconds the sender waits on a full window before it counts as blocked
RSS_GROWTH_LIMIT = 64 * 1024  # KiB the server may grow by while flooded
BIG = 16_000_000  # bytes of the large answer
RELAY_RATE = 2 * 1024 * 1024  # bytes/s the relay forwards from the server
HEARTBEAT = 0.5
UNHEALTHY_AFTER = 3


# -- helpers --------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """The resident set size of process `pid` (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pressure test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def serve(directory: Path, tls: bool, **transport_options: Any) -> ServeProcess:
    options = dict(transport_options)
    if tls:
        cert_file, key_file = self_signed(directory)
        options.update(cert_file=str(cert_file), key_file=str(key_file))
    table = "".join(f"{k} = {v!r}\n" if not isinstance(v, str) else f'{k} = "{v}"\n'
                    for k, v in options.items())
    return start_server(directory, "pressed", grains=GRAINS,
                        extra=f"[server.transport_options]\n{table}")


def client_options(tls: bool) -> dict[str, Any]:
    return {"insecure": True} if tls else {}


@asynccontextmanager
async def raw_connection(endpoint: str, tls: bool
                         ) -> AsyncIterator[tuple[Channel, ProtocolConnection]]:
    """A channel from the tcp transport's public connect API with the handshake done by
    hand, so the test decides what is sent and whether anything is read."""
    transport = forkcore.plugins.create("transport", "tcp", client_options(tls), "test")
    async with transport.connect(endpoint, timeout=WAIT) as channel:
        proto = ProtocolConnection("client")
        channel.send(proto.encode(Hello(PROTOCOL_VERSION, "never-reads", ())))
        with anyio.fail_after(WAIT):
            assert isinstance(proto.decode(await channel.receive()), Welcome)
        yield channel, proto


async def flood(channel: Channel, proto: ProtocolConnection, pid: int,
                rss_limit: int) -> tuple[int, int, str]:
    """Send up to REQUESTS echo requests at RATE without ever reading. Returns (sent, the
    server's peak RSS in KiB, why it stopped): "blocked" when the sender waited BLOCKED
    seconds on a full window, "closed" when the server dropped the connection, "rss"
    when the server grew past `rss_limit`, "sent all" or "out of time"."""
    sent = 0
    peak = rss_kib(pid)
    start = time.monotonic()
    deadline = start + FLOOD_SECONDS
    while sent < REQUESTS and time.monotonic() < deadline:
        try:
            await anyio.sleep(max(0.0, start + sent / RATE - time.monotonic()))
            for _ in range(64):
                sent += 1
                channel.send(proto.encode_request(sent, "test.bulk", "flood", "echo",
                                                  [PAYLOAD], {}, 600.0))
            with anyio.move_on_after(BLOCKED) as waiting:
                await channel.drain()
        except ConnectError:
            return sent, max(peak, rss_kib(pid)), "closed"
        peak = max(peak, rss_kib(pid))
        if waiting.cancelled_caught:
            return sent, peak, "blocked"
        if peak > rss_limit:
            return sent, peak, "rss"
    return sent, peak, "sent all" if sent >= REQUESTS else "out of time"


class GoodCaller:
    """A well-behaved client calling `add(1)` in a loop, each call within WAIT."""

    def __init__(self, client: forkcore.Client) -> None:
        self.grain = client.get_grain(IBulk, "good")
        self.ok = 0
        self.errors: list[str] = []

    async def run(self) -> None:
        expected = await self.grain.add(0)
        while True:
            try:
                with anyio.fail_after(WAIT):
                    value = await self.grain.add(1)
            except Exception as exc:  # recorded; the test asserts there are none
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            expected += 1
            if value != expected:
                self.errors.append(f"add returned {value}, expected {expected}")
                return
            self.ok += 1
            await anyio.sleep(0.005)

    async def progress(self, calls: int) -> None:
        """Wait until `calls` more calls have succeeded."""
        target = self.ok + calls
        with anyio.fail_after(WAIT):
            while self.ok < target and not self.errors:
                await anyio.sleep(0.01)
        assert not self.errors, self.errors


# -- backpressure ------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_a_client_that_never_reads_is_held_by_tcp_not_by_server_memory(
        tmp_path: Path, tls: bool) -> None:
    server = serve(tmp_path, tls)
    try:
        async with forkcore.Client(servers=[server.endpoint], request_timeout=WAIT,
                                   transport_options=client_options(tls)) as client:
            good = GoodCaller(client)
            async with anyio.create_task_group() as tg:
                tg.start_soon(good.run)
                await good.progress(5)
                before = rss_kib(server.proc.pid)
                async with raw_connection(server.endpoint, tls) as (channel, proto):
                    sent, peak, why = await flood(channel, proto, server.proc.pid,
                                                  before + RSS_GROWTH_LIMIT)
                    # the sender is blocked, and the good client is served meanwhile
                    await good.progress(20)
                    peak = max(peak, rss_kib(server.proc.pid))
                tg.cancel_scope.cancel()
        assert why == "blocked", (why, sent, peak - before)
        assert sent < REQUESTS
        assert peak - before < RSS_GROWTH_LIMIT, \
            f"server grew by {(peak - before) // 1024} MiB for {sent} requests"
        assert not good.errors
    finally:
        server.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_a_client_that_stops_reading_is_dropped_after_send_timeout(
        tmp_path: Path, tls: bool) -> None:
    server = serve(tmp_path, tls, send_timeout=1.0)
    try:
        async with forkcore.Client(servers=[server.endpoint], request_timeout=WAIT,
                                   transport_options=client_options(tls)) as client:
            good = GoodCaller(client)
            async with anyio.create_task_group() as tg:
                tg.start_soon(good.run)
                await good.progress(5)
                async with raw_connection(server.endpoint, tls) as (channel, proto):
                    with anyio.fail_after(FLOOD_SECONDS):
                        sent, _, why = await flood(channel, proto, server.proc.pid,
                                                   1 << 40)
                        while why == "blocked":  # 1 s without progress: dropped
                            sent, _, why = await flood(channel, proto, server.proc.pid,
                                                       1 << 40)
                    assert why == "closed", (why, sent)
                await good.progress(20)
                tg.cancel_scope.cancel()
        assert "send_timeout" in server.stderr()
        assert not good.errors
    finally:
        server.stop()


# -- liveness -------------------------------------------------------------------------------


@asynccontextmanager
async def throttling_relay(upstream: str, rate: float) -> AsyncIterator[str]:
    """A TCP proxy to `upstream` forwarding what the server sends at `rate` bytes/s
    (and what the client sends as fast as it comes)."""
    host, port = upstream.rsplit(":", 1)

    async def pipe(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream,
                   per_second: float | None, scope: anyio.CancelScope) -> None:
        try:
            while True:
                data = await source.receive(16384)
                await sink.send(data)
                if per_second is not None:
                    await anyio.sleep(len(data) / per_second)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            scope.cancel()  # one direction ended: end the other

    async def handle(client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp(host, int(port)) as server:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pipe, client, server, None, tg.cancel_scope)
                tg.start_soon(pipe, server, client, rate, tg.cancel_scope)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        address = listener.extra(anyio.abc.SocketAttribute.local_address)
        yield f"127.0.0.1:{address[1]}"
        tg.cancel_scope.cancel()


async def wait_until(predicate: Any, timeout: float) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    start = time.monotonic()
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.parametrize("mode", ["single", "multi"])
async def test_a_server_busy_sending_a_large_answer_is_never_marked_unhealthy(
        tmp_path: Path, mode: str) -> None:
    server = start_server(tmp_path, "busy", grains=GRAINS)
    try:
        async with throttling_relay(server.endpoint, RELAY_RATE) as endpoint, \
                forkcore.Client(mode=mode, servers=[endpoint], request_timeout=60.0,
                                reconnect_initial_delay=0.05, reconnect_max_delay=0.5,
                                health={"heartbeat_interval": HEARTBEAT,
                                        "unhealthy_after": UNHEALTHY_AFTER}) as client:
            [view] = client.servers
            grain = client.get_grain(IBulk, "big")
            samples: list[tuple[bool, str, str | None]] = []
            answer: list[bytes] = []

            async def watch() -> None:
                while not answer:
                    samples.append((view.healthy, view.state, view.last_error))
                    await anyio.sleep(0.05)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                with anyio.fail_after(60.0):
                    answer.append(await grain.blob(BIG))
            assert len(answer[0]) == BIG
            # the transfer takes several heartbeat limits (BIG / RELAY_RATE ≈ 7 s)
            assert len(samples) * 0.05 > 2 * HEARTBEAT * UNHEALTHY_AFTER
            unhealthy = [s for s in samples if not s[0]]
            assert unhealthy == [], f"{len(unhealthy)} of {len(samples)} samples: " \
                                    f"{unhealthy[0]}"

            # a frozen server is still noticed, and once it is back nothing is reported
            server.signal(signal.SIGSTOP)
            await wait_until(lambda: not view.healthy,
                             HEARTBEAT * UNHEALTHY_AFTER + 2.0)
            assert view.last_error is not None
            server.signal(signal.SIGCONT)
            await wait_until(lambda: view.healthy, 20.0)
            assert view.last_error is None
            with anyio.fail_after(WAIT):
                assert await grain.add(1) == 1
    finally:
        server.signal(signal.SIGCONT)
        server.stop()
