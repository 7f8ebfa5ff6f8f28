"""Pre-shared keys, the encrypted session, roles, authenticators and resource limits."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from grains_sample import Counter, ICounter

import forkcore
from forkcore.errors import ConfigError, Unauthorized
from forkcore.plugins import get_plugin_manager, registry
from forkcore.protocol import codec
from forkcore.protocol.messages import AuthChallenge, Welcome, from_wire

pytestmark = pytest.mark.anyio

KEY = "correct horse battery staple 42"
WRONG = "incorrect horse battery staple 7"


@pytest.fixture(params=["memory", "tcp", "udp"])
def transport(request: pytest.FixtureRequest) -> str:
    if request.param not in registry("transport"):
        pytest.skip(f"transport {request.param} is not installed")
    return str(request.param)


class IVault(forkcore.GrainInterface, name="test.vault"):
    async def whoami(self) -> list[Any]: ...
    @forkcore.requires_role("user")
    async def read(self) -> str: ...
    @forkcore.requires_role("admin")
    async def wipe(self) -> str: ...


class Vault(forkcore.Grain, IVault):
    runs = 0

    async def whoami(self) -> list[Any]:
        Vault.runs += 1
        caller = forkcore.current_caller()
        return [caller.name, caller.role.name.lower(), caller.method]

    async def read(self) -> str:
        return "secret"

    async def wipe(self) -> str:
        return "wiped"


@forkcore.requires_role("server")
class IInternal(forkcore.GrainInterface, name="test.internal"):
    async def ping(self) -> str: ...


class Internal(forkcore.Grain, IInternal):
    async def ping(self) -> str:
        return "pong"


def server(transport: str, **security: Any) -> forkcore.Server:
    return forkcore.Server(id="sec", transport=transport,
                           grains=[Vault, Internal, Counter], security=security,
                           handshake_timeout=2.0)


def client(endpoint: str, transport: str, **security: Any) -> forkcore.Client:
    return forkcore.Client(servers=[endpoint], transport=transport, security=security,
                           connect_timeout=2.0)


async def test_right_key_works_and_identity_reaches_grain_code(transport: str) -> None:
    async with server(transport, psk=KEY) as s:
        async with client(s.endpoint or "", transport, psk=KEY, identity="tools") as c:
            vault = c.get_grain(IVault, "v")
            assert await vault.whoami() == ["tools", "user", "psk"]
            assert await vault.read() == "secret"


@pytest.mark.parametrize("security", [{"psk": WRONG}, {}])
async def test_wrong_or_missing_key_is_refused_fast_without_running_grain_code(
        transport: str, security: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "forkcore.server")
    before = Vault.runs
    async with server(transport, psk=KEY) as s:
        start = anyio.current_time()
        with pytest.raises(Unauthorized, match=r"refused the connection|pre-shared key"):
            async with client(s.endpoint or "", transport, **security):
                pass
        assert anyio.current_time() - start < 1.0
        with pytest.raises(Unauthorized):
            async with client(s.endpoint or "", transport, **security):
                pass
    assert Vault.runs == before
    refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(refusals) == 1  # logged once per peer address, not per attempt
    assert ("wrong pre-shared key" if security else "requires the cluster's pre-shared key") \
        in refusals[0].getMessage()


async def test_client_with_a_key_refuses_a_server_without_one(transport: str) -> None:
    async with server(transport) as s:
        with pytest.raises(Unauthorized, match="did not ask for the pre-shared key"):
            async with client(s.endpoint or "", transport, psk=KEY):
                pass


async def test_psk_file_and_short_keys(tmp_path: Any) -> None:
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    async with server("memory", psk_file=str(key_file)) as s:
        async with client(s.endpoint or "", "memory", psk_file=str(key_file)) as c:
            assert await c.get_grain(IVault, 1).read() == "secret"
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        server("memory", psk="short")
    with pytest.raises(ConfigError, match="cannot read"):
        client("127.0.0.1:1", "memory", psk_file=str(tmp_path / "missing.key"))


class Relay:
    """A TCP relay that records what the client sends, to look at the wire."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.upstream = bytearray()
        self.endpoint = ""

    async def run(self, *, task_status: anyio.abc.TaskStatus[str]) -> None:
        host, port = self.target.rsplit(":", 1)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        bound = listener.extra(anyio.abc.SocketAttribute.local_address)
        task_status.started(f"127.0.0.1:{bound[1]}")
        async with listener:
            async def handle(down: anyio.abc.SocketStream) -> None:
                async with down, await anyio.connect_tcp(host, int(port)) as up:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._pump, down, up, True)
                        tg.start_soon(self._pump, up, down, False)

            await listener.serve(handle)

    async def _pump(self, source: Any, sink: Any, record: bool) -> None:
        try:
            async for chunk in source:
                if record:
                    self.upstream += chunk
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            await sink.aclose()


@pytest.fixture
async def relayed() -> AsyncIterator[Any]:
    async with anyio.create_task_group() as tg:
        async def make(target: str) -> Relay:
            relay = Relay(target)
            relay.endpoint = await tg.start(relay.run)
            return relay

        yield make
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("with_key", [True, False])
async def test_psk_session_over_tcp_is_encrypted(relayed: Any, with_key: bool) -> None:
    security = {"psk": KEY} if with_key else {}
    async with server("tcp", **security) as s:
        relay = await relayed(s.endpoint)
        async with client(relay.endpoint, "tcp", **security) as c:
            assert await c.get_grain(ICounter, "k").echo("plaintext-marker-123") == \
                "plaintext-marker-123"
    wire = bytes(relay.upstream)
    assert (b"plaintext-marker-123" in wire) is not with_key
    assert (b"test.counter" in wire) is not with_key


SENT_BY_SERVERS: list[bytes] = []  # frames the `marked` transport's servers sent


class MarkedTransport:
    """Transport `marked`, for the negotiation test: `memory`, with the client's and the
    server's channels marked `secure` as told, and the frames servers send recorded."""

    name = "marked"

    def __init__(self, *, client_secure: bool = False, server_secure: bool = False) -> None:
        from forkcore.transport import MemoryTransport

        self.inner = MemoryTransport()
        self.client_secure = client_secure
        self.server_secure = server_secure

    @asynccontextmanager
    async def connect(self, endpoint: str, *, timeout: float) -> AsyncIterator[Any]:
        async with self.inner.connect(endpoint, timeout=timeout) as channel:
            channel.secure = self.client_secure
            yield channel

    @asynccontextmanager
    async def listen(self, endpoint: str) -> AsyncIterator[Any]:
        async with self.inner.listen(endpoint) as listener:
            yield MarkedListener(listener, self.server_secure)


class MarkedListener:
    def __init__(self, inner: Any, secure: bool) -> None:
        self.inner = inner
        self.endpoint = inner.endpoint
        self.secure = secure

    def stop_accepting(self) -> None:
        self.inner.stop_accepting()

    async def serve(self, handler: Any) -> None:
        async def marked(channel: Any) -> None:
            channel.secure = self.secure
            send = channel.send

            def recorded(body: bytes, delivery: str = "reliable") -> None:
                SENT_BY_SERVERS.append(body)
                send(body, delivery)

            channel.send = recorded
            await handler(channel)

        await self.inner.serve(marked)


@pytest.fixture
def marked_transport() -> Iterator[None]:
    class Plugin:
        @forkcore.hookimpl
        def forkcore_register_transports(self, register: Any) -> None:
            register("marked", MarkedTransport)

    plugin = Plugin()
    get_plugin_manager().register(plugin, name="test-marked")
    SENT_BY_SERVERS.clear()
    yield
    get_plugin_manager().unregister(plugin)


@pytest.mark.usefixtures("marked_transport")
@pytest.mark.parametrize(("client_secure", "server_secure", "sealed"), [
    (True, True, False),  # verified TLS (or QUIC) both ways: not encrypted twice
    (False, True, True),  # TLS the client could not verify (insecure): the key encrypts
    (True, False, True),  # more encryption than the client asked for is fine
    (False, False, True),  # plain TCP
])
async def test_psk_session_encryption_is_negotiated(client_secure: bool, server_secure: bool,
                                                    sealed: bool) -> None:
    """The client asks for encryption unless its channel is secure (encrypted, server
    verified); the server encrypts when asked or when its own channel is not secure, and
    says so in the AuthChallenge."""
    options = {"client_secure": client_secure, "server_secure": server_secure}
    marker = "negotiation-marker-42"
    async with forkcore.Server(id="neg", transport="marked", grains=[Counter],
                               transport_options=options, security={"psk": KEY}) as s:
        async with forkcore.Client(servers=[s.endpoint or ""], transport="marked",
                                   transport_options=options, security={"psk": KEY},
                                   connect_timeout=2.0) as c:
            assert await c.get_grain(ICounter, "k").echo(marker) == marker
    challenge = from_wire(codec.decode(SENT_BY_SERVERS[0]))
    assert isinstance(challenge, AuthChallenge)
    assert challenge.encrypt is sealed
    after = SENT_BY_SERVERS[1:]  # Welcome, the Response, ...
    assert (marker.encode() in b"".join(after)) is not sealed
    if not sealed:
        assert isinstance(from_wire(codec.decode(after[0])), Welcome)


async def test_roles_are_enforced_per_method_and_interface(transport: str) -> None:
    async with server(transport, psk=KEY, psk_role="user") as s:
        async with client(s.endpoint or "", transport, psk=KEY) as c:
            vault = c.get_grain(IVault, "v")
            assert await vault.read() == "secret"
            with pytest.raises(Unauthorized, match="requires role 'admin'; this connection "
                                                   "is 'user'"):
                await vault.wipe()
            with pytest.raises(Unauthorized, match="requires role 'server'"):
                await c.get_grain(IInternal, 1).ping()
    async with server(transport, psk=KEY, psk_role="admin") as s:
        async with client(s.endpoint or "", transport, psk=KEY) as c:
            assert await c.get_grain(IVault, "v").wipe() == "wiped"
            assert await c.get_grain(IInternal, 1).ping() == "pong"


async def test_anonymous_callers_and_the_default_policy(transport: str) -> None:
    async with server(transport) as s:
        async with client(s.endpoint or "", transport) as c:
            vault = c.get_grain(IVault, "v")
            assert await vault.whoami() == ["anonymous", "anonymous", "none"]
            with pytest.raises(Unauthorized, match="requires role 'user'"):
                await vault.read()
    async with server(transport, allow_anonymous=False) as s:
        with pytest.raises(Unauthorized, match="requires authentication"):
            async with client(s.endpoint or "", transport):
                pass


class TokenAuthenticator:
    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens

    async def authenticate(self, token: str, peer: str) -> forkcore.Identity | None:
        role = self.tokens.get(token)
        return None if role is None else forkcore.Identity(f"token-{role}",
                                                           forkcore.Role.parse(role), "token")


@pytest.fixture
def tokens_plugin() -> Iterator[None]:
    class Plugin:
        @forkcore.hookimpl
        def forkcore_register_authenticators(self, register: Any) -> None:
            register("tokens", TokenAuthenticator)

    plugin = Plugin()
    get_plugin_manager().register(plugin, name="test-tokens")
    yield
    get_plugin_manager().unregister(plugin)


@pytest.mark.usefixtures("tokens_plugin")
async def test_authenticator_plugin_validates_tokens(transport: str) -> None:
    options = {"authenticator": "tokens",
               "authenticator_options": {"tokens": {"t-admin": "admin", "t-guest": "guest"}}}
    async with server(transport, allow_anonymous=False, **options) as s:
        async with client(s.endpoint or "", transport, token="t-admin") as c:
            vault = c.get_grain(IVault, "v")
            assert await vault.whoami() == ["token-admin", "admin", "token"]
            assert await vault.wipe() == "wiped"
        async with client(s.endpoint or "", transport, token="t-guest") as c:
            with pytest.raises(Unauthorized):
                await c.get_grain(IVault, "v").read()
        with pytest.raises(Unauthorized, match="token was not accepted"):
            async with client(s.endpoint or "", transport, token="forged"):
                pass


async def test_connections_per_address_are_limited() -> None:
    async with forkcore.Server(id="lim", transport="tcp", grains=[Counter],
                               max_connections_per_address=2) as s:
        host, port = (s.endpoint or "").rsplit(":", 1)
        held = [await anyio.connect_tcp(host, int(port)) for _ in range(2)]
        extra = await anyio.connect_tcp(host, int(port))
        with anyio.fail_after(2):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                await extra.receive()  # closed by the server at once
        for stream in held:
            await stream.aclose()
        await extra.aclose()


async def test_activations_are_capped_by_evicting_idle_ones() -> None:
    before = Counter.deactivations
    async with forkcore.Server(id="cap", transport="memory", grains=[Counter],
                               max_activations=10) as s:
        async with forkcore.Client(servers=[s.endpoint or ""], transport="memory") as c:
            for key in range(25):
                await c.get_grain(ICounter, key).add(1)
                assert s.activation_count <= 10
            with anyio.fail_after(5):
                while Counter.deactivations < before + 15:
                    await anyio.sleep(0.01)
            # the most recent grains kept their state; the evicted ones start afresh
            assert await c.get_grain(ICounter, 24).get() == 1
            assert await c.get_grain(ICounter, 0).get() == 0


class ISink(forkcore.GrainInterface, name="test.sink"):
    @forkcore.rpc(one_way=True)
    async def put(self, n: int) -> None: ...


class Sink(forkcore.Grain, ISink):
    """One-way calls that wait at a gate the test opens."""

    gate: anyio.Event
    started = 0
    finished = 0

    async def put(self, n: int) -> None:
        Sink.started += 1
        await Sink.gate.wait()
        Sink.finished += 1


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_one_way_calls_count_against_max_in_flight(
        transport: str, caplog: pytest.LogCaptureFixture) -> None:
    """A client flooding one-way calls at a stuck grain gets at most max_in_flight of
    them queued or running; the rest are dropped (one warning), and calls on another
    connection are served meanwhile. Requests and one-way calls share the limit."""
    Sink.gate, Sink.started, Sink.finished = anyio.Event(), 0, 0
    limit, flood = 16, 500
    with caplog.at_level(logging.WARNING, logger="forkcore.server"):
        async with forkcore.Server(id="flood", transport=transport, grains=[Sink, Counter],
                                   max_in_flight=limit) as s:
            endpoint = s.endpoint or ""
            async with forkcore.Client(servers=[endpoint], transport=transport,
                                       request_timeout=2.0) as flooder, \
                    forkcore.Client(servers=[endpoint], transport=transport,
                                    request_timeout=2.0) as other, AsyncExitStack() as stack:
                sink = flooder.get_grain(ISink, "stuck")
                stack.callback(Sink.gate.set)  # never leave the server waiting on the gate
                for n in range(flood):
                    await sink.put(n)
                with anyio.fail_after(5):
                    while s.stats()["one_way_dropped"] < flood - limit:
                        await anyio.sleep(0.01)
                stats = s.stats()
                assert stats["one_way_dropped"] == flood - limit
                assert stats["in_flight"] == limit  # one running, the rest queued
                # another connection is served while this one is full ...
                with anyio.fail_after(2):
                    assert await other.get_grain(ICounter, "c").add(1) == 1
                # ... but not the full one: its requests share the limit
                with pytest.raises(forkcore.errors.NoServerAvailable):
                    await flooder.get_grain(ICounter, "c").add(1)
                Sink.gate.set()
                with anyio.fail_after(5):
                    while s.stats()["in_flight"]:
                        await anyio.sleep(0.01)
                assert (Sink.started, Sink.finished) == (limit, limit)
                # the finished calls were counted out: the connection takes calls again
                for n in range(3):
                    await sink.put(n)
                with anyio.fail_after(5):
                    while Sink.finished < limit + 3:
                        await anyio.sleep(0.01)
                assert s.stats()["one_way_dropped"] == flood - limit
                assert await flooder.get_grain(ICounter, "c").add(1) == 2
    warnings = [r.getMessage() for r in caplog.records if "one-way call" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "dropped 1 one-way call(s) from" in warnings[0]
    assert "max_in_flight" in warnings[0]


async def test_300_silent_connections_are_closed_and_do_not_starve_a_client() -> None:
    async with forkcore.Server(id="slow", transport="tcp", grains=[Counter],
                               handshake_timeout=1.0) as s:
        host, port = (s.endpoint or "").rsplit(":", 1)
        silent = [await anyio.connect_tcp(host, int(port)) for _ in range(300)]
        try:
            async with forkcore.Client(servers=[s.endpoint or ""], transport="tcp") as c:
                with anyio.fail_after(2):
                    assert await c.get_grain(ICounter, "good").add(1) == 1
            with anyio.fail_after(5):
                for stream in silent:
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError,
                                        OSError)):
                        await stream.receive()
        finally:
            for stream in silent:
                await stream.aclose()
