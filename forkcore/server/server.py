"""`forkcore.Server`: its life cycle (listen, serve, drain, stop) and its counters.

What it hosts is `hosting`, how one call is admitted is `dispatch`, one accepted
connection is `connection`, and the activations are the `catalog`."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from ..clock import now as clock
from ..config import ServerOptions, load_config, options_from_kwargs
from ..errors import ConfigError, ForkcoreError
from ..plugins import create, create_interceptors
from ..protocol import codec
from ..protocol.messages import PROTOCOL_VERSION, Welcome
from ..protocol.session import Handler, ServerSession
from ..security import Role, load_psk
from ..transport import Channel, StreamChannel
from .catalog import Catalog
from .connection import ServerConnection
from .hosting import Targets, find_grain_classes, host_table

log = logging.getLogger("forkcore.server")


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
        self._psk = load_psk(sec.psk, sec.psk_file, f"{where}.security")
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
        self.hosted = host_table(find_grain_classes(options.grains, f"{where} key 'grains'"))
        if not self.hosted:
            log.warning("%s: server %s hosts no grains: every call to it will fail with "
                        "MethodNotFound; list your grain modules in [server] grains", where,
                        options.id)
        self.targets = Targets(options.id, self.hosted)
        self.interceptors = create_interceptors(options.interceptors,
                                               options.interceptor_options, where)
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

    def session_for(self, channel: Channel, handler: Handler) -> ServerSession:
        """The protocol session of a new connection (it holds the key; nothing else
        outside the server does)."""
        return ServerSession(channel.peer, handler, welcome=self.welcome, psk=self._psk,
                             psk_role=self.psk_role, allow_anonymous=self.allow_anonymous,
                             channel_secure=getattr(channel, "secure", False),
                             max_depth=self.options.max_depth)

    def refused(self, peer: str, reason: str) -> None:
        """Log a refused connection once per peer address (and again after a minute)."""
        host = peer.rsplit(":", 1)[0]
        now = clock()
        if now - self._refusals.get(host, -math.inf) >= 60.0:
            self._refusals[host] = now
            if len(self._refusals) > 10_000:
                self._refusals.clear()
            log.warning("server %s refused a connection from %s: %s", self.id, peer, reason)

    def check_target(self, interface: str, method: str) -> str | None:
        """Why (interface, method) cannot be called here, or None."""
        if self.targets.get((interface, method)) is not None:
            return None
        return self.targets.explain(interface, method)

    @property
    def interfaces(self) -> list[str]:
        return sorted(self.hosted)

    def stats(self) -> dict[str, Any]:
        """Counters for `forkcore status`: calls served, in flight, activations, ..."""
        catalog = self.catalog
        return {"calls": catalog.calls_total, "in_flight": catalog.running_calls,
                "activations": len(catalog.activations),
                "connections": len(self._connections),
                "uptime": clock() - self._started_at,
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
            self.catalog = Catalog(self.hosted, self._tg, self.options.max_activations,
                                   self.interceptors, self.options.debug)
            self._stop = anyio.Event()
            self._started_at = clock()
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
            conn.goodbye("draining")
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

