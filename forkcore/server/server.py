"""`forkcore.Server`: hosts grains, accepts connections, dispatches calls to the catalog."""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import types
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from time import monotonic
from typing import Any

import anyio
import anyio.abc

from ..config import ServerOptions, load_config, options_from_kwargs
from ..errors import ConfigError, ConnectError, ForkcoreError, ProtocolError, Unauthorized
from ..grains import Grain, InterfaceSpec, Key, is_reentrant
from ..plugins import create
from ..protocol import codec
from ..protocol.connection import ProtocolConnection
from ..protocol.messages import (
    FAIL_NOT_FOUND,
    FAIL_UNAUTHORIZED,
    FAIL_UNAVAILABLE,
    PROTOCOL_VERSION,
    REQUEST,
    AuthChallenge,
    AuthProof,
    Cancel,
    Failure,
    Goodbye,
    Hello,
    OneWay,
    Ping,
    Pong,
    Stats,
    StatsRequest,
    Welcome,
    from_wire,
    request_fields,
)
from ..security import (
    ANONYMOUS,
    NONCE_SIZE,
    Identity,
    Role,
    SessionCipher,
    load_psk,
    new_nonce,
    proof,
    proofs_match,
    required_role,
)
from ..transport import Channel, StreamChannel
from .catalog import Call, Catalog

log = logging.getLogger("forkcore.server")

MAX_ERROR_MESSAGE = 8192  # characters of a grain exception's message sent to the caller


def find_grain_classes(grains: Iterable[Any]) -> list[type[Grain]]:
    """Grain classes from a mix of classes and module names (or modules)."""
    found: list[type[Grain]] = []
    for item in grains:
        if isinstance(item, type):
            if not issubclass(item, Grain) or not item.__forkcore_interfaces__:
                raise ConfigError(f"grains: {item.__qualname__} is not a Grain implementing a "
                                  "GrainInterface")
            found.append(item)
            continue
        module = item if isinstance(item, types.ModuleType) else _import(item)
        classes = [obj for obj in vars(module).values()
                   if isinstance(obj, type) and issubclass(obj, Grain)
                   and obj.__module__ == module.__name__ and obj.__forkcore_interfaces__
                   and not inspect.isabstract(obj)]
        if not classes:
            raise ConfigError(f"grains: module {module.__name__!r} defines no Grain class "
                              "implementing a GrainInterface")
        found.extend(classes)
    return list(dict.fromkeys(found))


def _import(name: Any) -> types.ModuleType:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"grains: {name!r} is neither a module name nor a Grain class")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"grains: cannot import module {name!r}: {exc}; is it installed or on "
                          "PYTHONPATH (run from the directory that contains it)?") from None


def host_table(classes: Iterable[type[Grain]]) -> dict[str, tuple[InterfaceSpec, type[Grain]]]:
    """interface wire name → (spec, implementing class), checked for gaps and clashes."""
    hosted: dict[str, tuple[InterfaceSpec, type[Grain]]] = {}
    for cls in classes:
        for spec in cls.__forkcore_interfaces__:
            if spec.name in hosted and hosted[spec.name][1] is not cls:
                other = hosted[spec.name][1]
                raise ConfigError(f"interface {spec.name!r} is implemented by both "
                                  f"{other.__qualname__} and {cls.__qualname__}; host one")
            for method in spec.methods:
                impl = getattr(cls, method, None)
                if impl is None or impl is getattr(spec.cls, method):
                    raise ConfigError(f"{cls.__qualname__} does not implement {spec.name}."
                                      f"{method}")
            hosted[spec.name] = (spec, cls)
    return hosted


class ServerConnection:
    """One accepted client connection: handshake, then requests until it closes."""

    __slots__ = ("calls", "channel", "client_id", "dropped", "dropped_logged_at", "identity",
                 "one_ways", "proto", "scope", "server")

    def __init__(self, server: Server, channel: Channel) -> None:
        self.server = server
        self.channel = channel
        self.proto = ProtocolConnection("server", max_depth=server.options.max_depth)
        self.calls: dict[int, Call] = {}
        # one-way calls queued or running; with `calls`, counted against max_in_flight
        self.one_ways = 0
        self.dropped = 0  # one-way calls dropped since the last warning about it
        self.dropped_logged_at = -math.inf
        self.client_id = "?"
        self.identity = ANONYMOUS
        self.scope = anyio.CancelScope()

    def send(self, msg: Any) -> None:
        try:
            body = self.proto.encode(msg)
        except ProtocolError:
            return  # the connection is closed already
        except codec.WireTypeError:
            if not isinstance(msg, Failure):
                raise
            # a grain's error message that cannot be encoded (say, lone surrogates):
            # the caller still gets its failure
            body = self.proto.encode(Failure(msg.id, msg.kind, msg.type_name,
                                             "(the error message could not be encoded)"))
        try:
            self.channel.send(body)
        except ConnectError:
            pass

    def reply_for(self, request_id: int) -> Any:
        calls = self.calls
        encode_response = self.proto.encode_response
        channel = self.channel

        def reply(ok: bool, value: Any) -> None:
            calls.pop(request_id, None)
            if ok:
                try:
                    body = encode_response(request_id, value)
                except codec.WireTypeError as exc:
                    self.send(Failure(request_id, "remote", "WireTypeError", str(exc)))
                    return
                try:
                    channel.send(body)
                except ConnectError:
                    pass
            else:
                kind, type_name, message = value
                if len(message) > MAX_ERROR_MESSAGE:
                    message = message[:MAX_ERROR_MESSAGE] + " [truncated]"
                self.send(Failure(request_id, kind, type_name[:256], message))

        return reply

    async def run(self) -> None:
        server = self.server
        peer = self.channel.peer
        with self.scope:
            try:
                with anyio.fail_after(server.options.handshake_timeout):
                    hello = self.proto.decode(await self.channel.receive())
                    if not isinstance(hello, Hello):
                        return  # a Goodbye before anything else
                    self.client_id = hello.client_id
                    try:
                        self.identity = await self.authenticate(hello)
                    except Unauthorized as exc:
                        server.refused(peer, str(exc))
                        self.send(Goodbye(f"unauthorized: {exc}"))
                        with anyio.move_on_after(0.5):
                            await self.channel.drain()
                        return
                self.send(server.welcome)
                if server.draining:
                    self.send(Goodbye("draining"))
                receive = self.channel.receive
                decode_item = self.proto.decode_item
                request = self.request
                while True:
                    item = decode_item(await receive())
                    code = item[0]
                    if code == REQUEST and type(code) is int:
                        request(*request_fields(item))  # the hot path, without a Request
                    else:
                        self.handle(from_wire(item))
            except TimeoutError:
                log.info("closing connection from %s: no handshake within %gs", peer,
                         server.options.handshake_timeout)
            except ProtocolError as exc:
                log.warning("closing connection from %s: %s", peer, exc)
                with anyio.move_on_after(0.5):
                    self.send(Goodbye(f"protocol error: {exc}"))
                    try:
                        await self.channel.drain()
                    except ConnectError:
                        pass
            except ConnectError:
                pass
            finally:
                # nobody is left to receive their results: stop the work (bounded work
                # per connection, even against a client that reconnects in a loop)
                for call in list(self.calls.values()):
                    call.cancel()
                self.calls.clear()

    async def authenticate(self, hello: Hello) -> Identity:
        """The connection's identity from its Hello (and, with a pre-shared key, one more
        round trip); `Unauthorized` with the reason when it may not connect."""
        server = self.server
        auth = hello.auth or {}
        identity = ANONYMOUS
        key = server.psk
        if key is not None:
            client_nonce = auth.get("nonce")
            name = auth.get("identity", "client")
            if auth.get("method") != "psk" or not isinstance(client_nonce, bytes) \
                    or len(client_nonce) != NONCE_SIZE or not isinstance(name, str):
                raise Unauthorized("this server requires the cluster's pre-shared key: set "
                                   "psk or psk_file in [client.security]")
            wanted = auth.get("encrypt")
            if not isinstance(wanted, bool):
                raise Unauthorized("the client did not say whether it wants the session "
                                   "encrypted (Hello auth 'encrypt'): upgrade the client")
            # the client wants encryption unless its channel is encrypted and the server
            # verified; encrypt also when this side's channel does not encrypt at all
            encrypt = wanted or not getattr(self.channel, "secure", False)
            server_nonce = new_nonce()
            self.send(AuthChallenge(server_nonce,
                                    proof(key, "server", client_nonce, server_nonce, name,
                                          wanted=wanted, encrypted=encrypt), encrypt))
            answer = self.proto.decode(await self.channel.receive())
            if not isinstance(answer, AuthProof) or not proofs_match(
                    proof(key, "client", client_nonce, server_nonce, name, wanted=wanted,
                          encrypted=encrypt), answer.proof):
                raise Unauthorized("wrong pre-shared key")
            if encrypt:
                self.proto.cipher = SessionCipher(key, client_nonce, server_nonce, "server")
            identity = Identity(name[:128], server.psk_role, "psk")
        token = auth.get("token")
        if token is not None and server.authenticator is not None:
            if not isinstance(token, str) or len(token) > 8192:
                raise Unauthorized("the token must be a string of at most 8192 characters")
            try:
                result = server.authenticator.authenticate(token, self.channel.peer)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                log.error("authenticator %r failed on a token from %s: %s: %s",
                          server.options.security.authenticator, self.channel.peer,
                          type(exc).__name__, exc)
                raise Unauthorized("the token could not be checked") from None
            if not isinstance(result, Identity):
                raise Unauthorized("the token was not accepted")
            identity = result
        if not identity.authenticated and not server.allow_anonymous:
            raise Unauthorized("this server requires authentication (a pre-shared key or a "
                               "token in [client.security])")
        return identity

    def handle(self, msg: Any) -> None:
        t = type(msg)  # (requests take the hot path in `run`, never this one)
        if t is OneWay:
            self.one_way(msg)
        elif t is Ping:
            self.send(Pong(msg.nonce, msg.sent_at))
        elif t is Cancel:
            call = self.calls.pop(msg.id, None)
            if call is not None:
                call.cancel()
        elif t is Goodbye:
            self.scope.cancel()
        elif t is StatsRequest:
            self.send(Stats(msg.nonce, self.server.stats()))
        elif t is Pong:
            pass
        else:
            raise ProtocolError(f"unexpected {t.__name__} from a client")

    def request(self, rid: int, interface: str, key: Key, method: str, args: list[Any],
                kwargs: dict[str, Any], timeout: float | None) -> None:
        server = self.server
        calls = self.calls
        if rid in calls:
            raise ProtocolError(f"request id {rid} is already in flight")
        target = server.targets.get((interface, method))
        if target is None:
            self.send(Failure(rid, FAIL_NOT_FOUND, "MethodNotFound",
                              server.check_target(interface, method) or "not hosted"))
            return
        required, reentrant = target
        identity = self.identity
        if required > identity.role:
            self.send(Failure(rid, FAIL_UNAUTHORIZED, "Unauthorized",
                              f"{interface}.{method} requires role "
                              f"'{required.name.lower()}'; this connection is "
                              f"'{identity.role.name.lower()}' ({identity.name})"))
            return
        if server.draining:
            self.send(Failure(rid, FAIL_UNAVAILABLE, "ServerDraining",
                              f"server {server.id} is shutting down; call another server"))
            return
        if len(calls) + self.one_ways >= server.max_in_flight:
            self.send(Failure(rid, FAIL_UNAVAILABLE, "TooManyCalls",
                              f"more than {server.max_in_flight} calls in flight on "
                              "one connection; wait for some to finish"))
            return
        deadline = math.inf if timeout is None else monotonic() + timeout
        call = Call(method, args, kwargs, deadline, self.reply_for(rid), identity)
        calls[rid] = call
        server.catalog.submit(interface, key, call, reentrant)

    def one_way(self, msg: OneWay) -> None:
        server = self.server
        target = server.targets.get((msg.interface, msg.method))
        if target is None:
            log.warning("one-way call from %s dropped: %s", self.channel.peer,
                        server.check_target(msg.interface, msg.method))
            return
        required, reentrant = target
        if server.draining or required > self.identity.role:
            return
        if len(self.calls) + self.one_ways >= server.max_in_flight:
            self.drop_one_way(msg)
            return
        self.one_ways += 1
        server.catalog.submit(msg.interface, msg.key,
                              Call(msg.method, msg.args, msg.kwargs, math.inf, None,
                                   self.identity, self.one_way_done), reentrant)

    def one_way_done(self) -> None:
        self.one_ways -= 1

    def drop_one_way(self, msg: OneWay) -> None:
        """A one-way call beyond max_in_flight has no reply to refuse it with: drop it,
        count it, and say so in the log at most once a minute per connection."""
        server = self.server
        server.one_way_dropped += 1
        self.dropped += 1
        now = anyio.current_time()
        if now - self.dropped_logged_at >= 60.0:
            log.warning("server %s dropped %d one-way call(s) from %s (%s), the last one "
                        "%s.%s: the connection already has %d calls queued or running "
                        "(max_in_flight); the client sends one-way calls faster than the "
                        "grains run them", server.id, self.dropped, self.channel.peer,
                        self.client_id, msg.interface, msg.method,
                        len(self.calls) + self.one_ways)
            self.dropped_logged_at = now
            self.dropped = 0


class Server:
    """Hosts grain classes and serves calls to them.

    `async with Server(id="s1", grains=[Counter]) as server:` listens on entry
    (`server.endpoint` is the bound address); leaving the block stops accepting, lets
    calls in flight finish (bounded by `drain_timeout`) and deactivates every grain.
    """

    def __init__(self, *, id: str, listen: str = "127.0.0.1:0", transport: str = "tcp",
                 grains: Iterable[Any] = (), zone: str | None = None,
                 metadata: Mapping[str, Any] | None = None,
                 transport_options: Mapping[str, Any] | None = None, **more: Any) -> None:
        options = options_from_kwargs(ServerOptions, dict(
            id=id, listen=listen, transport=transport, grains=list(grains), zone=zone,
            metadata=dict(metadata or {}), transport_options=dict(transport_options or {}),
            **more), "Server()")
        self._init(options, "Server()")

    @classmethod
    def from_config(cls, path_or_mapping: str | Path | Mapping[str, Any]) -> Server:
        """A server from the `[server]` table of a TOML file or mapping."""
        config = load_config(path_or_mapping)
        if config.server is None:
            raise ConfigError(f"{config.path or '<config>'}: no [server] table")
        server = cls.__new__(cls)
        server._init(config.server, f"{config.path or '<config>'}: [server]")
        return server

    def _init(self, options: ServerOptions, where: str) -> None:
        sec = options.security
        self.psk = load_psk(sec.psk, sec.psk_file, f"{where}.security")
        self.psk_role = Role.parse(sec.psk_role, f"{where}.security key 'psk_role'")
        self.allow_anonymous = sec.allow_anonymous
        self.authenticator = None if sec.authenticator is None else create(
            "authenticator", sec.authenticator, sec.authenticator_options,
            f"{where}.security", "authenticator", "authenticator_options")
        self._refusals: dict[str, float] = {}
        self.one_way_dropped = 0  # one-way calls dropped for max_in_flight, since start
        self._per_address: dict[str, int] = {}
        self.options = options
        self.id = options.id
        self.transport = create("transport", options.transport, options.transport_options,
                                where, "transport", "transport_options")
        self.hosted = host_table(find_grain_classes(options.grains))
        # (interface, method) → (required role, reentrant): one lookup per call
        self.targets: dict[tuple[str, str], tuple[Role, bool]] = {
            (name, method): (required_role(spec.cls, getattr(spec.cls, method), cls,
                                           getattr(cls, method)), is_reentrant(cls, method))
            for name, (spec, cls) in self.hosted.items() for method in spec.methods}
        self.max_in_flight = options.max_in_flight
        self.welcome = Welcome(PROTOCOL_VERSION, options.id, options.zone,
                               dict(options.metadata),
                               tuple(spec.info() for spec, _ in self.hosted.values()))
        try:
            codec.encode(self.welcome.metadata)
        except codec.WireTypeError as exc:
            raise ConfigError(f"[server] metadata: {exc}") from None
        self.endpoint: str | None = None
        self.draining = False
        self._connections: set[ServerConnection] = set()
        self._stack: AsyncExitStack | None = None

    def refused(self, peer: str, reason: str) -> None:
        """Log a refused connection once per peer address (and again after a minute)."""
        host = peer.rsplit(":", 1)[0]
        now = anyio.current_time()
        if now - self._refusals.get(host, -math.inf) >= 60.0:
            self._refusals[host] = now
            if len(self._refusals) > 10_000:
                self._refusals.clear()
            log.warning("server %s refused a connection from %s: %s", self.id, peer, reason)

    def check_target(self, interface: str, method: str) -> str | None:
        """Why (interface, method) cannot be called here, or None."""
        entry = self.hosted.get(interface)
        if entry is None:
            hosted = ", ".join(sorted(self.hosted)) or "none"
            return (f"server {self.id} hosts no interface {interface!r} (it hosts: {hosted}); "
                    "check the interface name and the server's grains")
        if method not in entry[0].methods:
            return (f"interface {interface!r} has no method {method!r} (methods: "
                    f"{', '.join(sorted(entry[0].methods))})")
        return None

    @property
    def interfaces(self) -> list[str]:
        return sorted(self.hosted)

    def stats(self) -> dict[str, Any]:
        """Counters for `forkcore status`: calls served, in flight, activations, ..."""
        catalog = self.catalog
        return {"calls": catalog.calls_total, "in_flight": catalog.running_calls,
                "activations": len(catalog.activations),
                "connections": len(self._connections),
                "uptime": anyio.current_time() - self._started_at,
                "draining": self.draining, "one_way_dropped": self.one_way_dropped,
                **self._transport_stats()}

    def _transport_stats(self) -> dict[str, Any]:
        """The listener's own counters, if its transport keeps any (udp does)."""
        stats = getattr(getattr(self, "_listener", None), "stats", None)
        return {"transport": stats()} if callable(stats) else {}

    @property
    def connection_count(self) -> int:
        """Client connections open now."""
        return len(self._connections)

    @property
    def activation_count(self) -> int:
        return len(self.catalog.activations)

    async def __aenter__(self) -> Server:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self._listener = await stack.enter_async_context(
                self.transport.listen(self.options.listen))
            self.endpoint = self._listener.endpoint
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            self.catalog = Catalog(self.hosted, self._tg, self.options.max_activations)
            self._stop = anyio.Event()
            self._started_at = anyio.current_time()
            self._served = anyio.Event()
            self._tg.start_soon(self._serve_connections)
            self._tg.start_soon(self._collect_loop)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        log.info("server %s listening on %s (%s); interfaces: %s", self.id, self.endpoint,
                 self.options.transport,
                 ", ".join(f"{s.name} v{s.version}" for s, _ in self.hosted.values()) or "none")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
        finally:
            self._tg.cancel_scope.cancel()
            await stack.__aexit__(None, None, None)  # the block's own error propagates by itself

    async def _shutdown(self) -> None:
        """Stop accepting, let calls finish, say goodbye, deactivate grains."""
        self.draining = True
        self._stop.set()
        self._listener.stop_accepting()
        for conn in list(self._connections):
            conn.send(Goodbye("draining"))
        timeout = self.options.drain_timeout
        with anyio.move_on_after(timeout) as scope:
            await self.catalog.wait_idle()
        if scope.cancelled_caught:
            log.warning("server %s: %d calls still running after %gs; stopping them", self.id,
                        self.catalog.running_calls, timeout)
        for conn in list(self._connections):
            conn.scope.cancel()
        with anyio.move_on_after(2 * StreamChannel.FLUSH_TIMEOUT):
            await self._served.wait()  # connections have flushed their last replies
        await self.catalog.deactivate_all(timeout)
        log.info("server %s stopped", self.id)

    async def serve_forever(self) -> None:
        """Serve until cancelled (or until the server is stopped)."""
        if self._stack is None:
            raise ForkcoreError("use 'async with server:' before serve_forever()")
        await self._stop.wait()

    def stop(self) -> None:
        """Make `serve_forever` return; leaving the `async with` block then shuts down."""
        self._stop.set()

    async def _serve_connections(self) -> None:
        try:
            await self._listener.serve(self._handle)
        finally:
            self._served.set()

    async def _handle(self, channel: Channel) -> None:
        if self.draining:
            return
        host = channel.peer.rsplit(":", 1)[0]
        opts = self.options
        if len(self._connections) >= opts.max_connections:
            self.refused(channel.peer, f"{opts.max_connections} connections are open "
                                       "(max_connections)")
            return
        if self._per_address.get(host, 0) >= opts.max_connections_per_address:
            self.refused(channel.peer, f"{opts.max_connections_per_address} connections are "
                                       "open from this address (max_connections_per_address)")
            return
        conn = ServerConnection(self, channel)
        self._connections.add(conn)
        self._per_address[host] = self._per_address.get(host, 0) + 1
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            left = self._per_address[host] - 1
            if left:
                self._per_address[host] = left
            else:
                del self._per_address[host]

    async def _collect_loop(self) -> None:
        while True:
            await anyio.sleep(self.options.collection_interval)
            count = await self.catalog.collect_idle(self.options.idle_timeout)
            if count:
                log.debug("server %s deactivated %d idle activations", self.id, count)

