"""`forkcore.Client`: connects to servers and turns proxy calls into requests.

Single mode holds one connection, to the first reachable endpoint of `servers`, and
moves to the next endpoint (with jittered exponential backoff) when it drops.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc

from ..config import ClientOptions, load_config, options_from_kwargs
from ..errors import ConfigError, ConnectError, ForkcoreError, NoServerAvailable
from ..grains import (
    Affinity,
    AffinityMode,
    GrainId,
    GrainInterface,
    InterfaceSpec,
    Key,
    MethodSpec,
    check_key,
    interface_spec,
    known_interface,
)
from ..plugins import create
from .connection import ClientConnection, heartbeat
from .proxy import GrainRef, proxy_class
from .views import ServerView

log = logging.getLogger("forkcore.client")

T = TypeVar("T", bound=GrainInterface)
DEFAULT_METHOD = MethodSpec("?")


def backoff_delay(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, initial·2^attempt)."""
    ceiling = min(cap, initial * (2 ** min(attempt, 32)))
    return random.uniform(ceiling / 2, ceiling)


class Client:
    """A client of one or more forkcore servers; use as `async with Client(...) as client:`."""

    def __init__(self, *, mode: str = "single", servers: Sequence[str],
                 transport: str = "tcp", strategy: str = "round_robin",
                 strategy_options: Mapping[str, Any] | None = None,
                 conflict_resolver: str = "highest_version", affinity: str = "none",
                 connections_per_server: int = 1, request_timeout: float = 10.0,
                 connect_timeout: float = 5.0,
                 transport_options: Mapping[str, Any] | None = None,
                 health: Mapping[str, Any] | None = None,
                 security: Mapping[str, Any] | None = None, **more: Any) -> None:
        if isinstance(servers, str):
            servers = [servers]
        values = dict(mode=mode, servers=list(servers), transport=transport, strategy=strategy,
                      strategy_options=dict(strategy_options or {}),
                      conflict_resolver=conflict_resolver, affinity=affinity,
                      connections_per_server=connections_per_server,
                      request_timeout=request_timeout, connect_timeout=connect_timeout,
                      transport_options=dict(transport_options or {}), health=health,
                      security=security, **more)
        self._init(options_from_kwargs(ClientOptions, values, "Client()"))

    @classmethod
    def from_config(cls, path_or_mapping: str | Path | Mapping[str, Any]) -> Client:
        """A client from the `[client]` table of a TOML file or mapping."""
        config = load_config(path_or_mapping)
        if config.client is None:
            raise ConfigError(f"{config.path or '<config>'}: no [client] table")
        client = cls.__new__(cls)
        client._init(config.client)
        return client

    def _init(self, options: ClientOptions) -> None:
        if options.security.psk or options.security.psk_file:
            raise ConfigError("[client.security]: pre-shared keys are not supported by this "
                              "version of forkcore; remove the table")
        if options.mode == "multi":
            raise ConfigError("[client] mode = 'multi' is not available in this version of "
                              "forkcore yet; use mode = 'single'")
        self.options = options
        self.transport = create("transport", options.transport, options.transport_options,
                                "[client] transport_options")
        self.conflict_resolver = create("conflict_resolver", options.conflict_resolver, {},
                                        "[client] conflict_resolver")
        self.affinity_policy = create("affinity_policy", options.affinity, {},
                                      "[client] affinity")
        self.client_id = options.client_id or uuid.uuid4().hex
        self._active: ClientConnection | None = None
        self._known: dict[str, ServerView] = {}
        self._last_error: str | None = None
        self._stack: AsyncExitStack | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self._tg.start(self._maintain_single)
        except BaseException:
            self._tg.cancel_scope.cancel()
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        self._tg.cancel_scope.cancel()
        await stack.__aexit__(*exc_info)
        if self._active is not None:
            self._active.close("client closed")
            self._active = None

    async def _maintain_single(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep one connection open, to the first endpoint that answers; move on when it
        drops, backing off after a full round of failures."""
        opts = self.options
        endpoints = opts.servers
        started = False
        index = 0
        attempt = 0
        while True:
            errors: list[str] = []
            for offset in range(len(endpoints)):
                position = (index + offset) % len(endpoints)
                endpoint = endpoints[position]
                try:
                    async with self.transport.connect(endpoint,
                                                      timeout=opts.connect_timeout) as channel:
                        conn = await ClientConnection.handshake(
                            channel, endpoint, self.client_id, opts.connect_timeout)
                        self._connected(conn)
                        attempt = 0
                        if not started:
                            started = True
                            task_status.started()
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(heartbeat, conn, opts.health.heartbeat_interval)
                            await conn.run()
                            tg.cancel_scope.cancel()
                        self._lost(conn)
                        index = (position + 1) % len(endpoints)
                        break
                except ConnectError as exc:
                    errors.append(str(exc))
                    self._last_error = str(exc)
            else:
                if not started:
                    raise ConnectError("could not connect to any server: " + "; ".join(errors))
                await anyio.sleep(backoff_delay(attempt, opts.reconnect_initial_delay,
                                                opts.reconnect_max_delay))
                attempt += 1

    def _connected(self, conn: ClientConnection) -> None:
        self._active = conn
        log.info("connected to server %s at %s", conn.server_id, conn.endpoint)

    def _lost(self, conn: ClientConnection) -> None:
        if self._active is conn:
            self._active = None
        self._last_error = conn.last_error
        self._known[conn.server_id] = self._view(conn, healthy=False)
        log.warning("lost connection to server %s at %s (%s); reconnecting", conn.server_id,
                    conn.endpoint, conn.last_error)

    # -- grain references and calls -------------------------------------------------------

    def get_grain(self, interface: type[T], key: Key, *, server: str | None = None,
                  affinity: AffinityMode | str | None = None) -> T:
        """A proxy for grain `key` of `interface`, typed as the interface."""
        spec = interface_spec(interface)
        check_key(key)
        mode = AffinityMode(affinity) if affinity is not None else (
            AffinityMode.PREFERRED if server is not None else AffinityMode.NONE)
        if mode is not AffinityMode.NONE and server is None:
            raise ConfigError(f"affinity={mode.value!r} needs server=: the id of the server")
        ref = GrainRef(self, GrainId(spec.name, key),
                       Affinity(server, mode) if server is not None else None)
        proxy: T = proxy_class(spec)(ref)
        return proxy

    async def call(self, interface_name: str, key: Key, method_name: str, /, *args: Any,
                   **kwargs: Any) -> Any:
        """Call a method by names; the options of a locally defined interface apply."""
        check_key(key)
        spec = known_interface(interface_name)
        method = spec.methods.get(method_name) if spec is not None else None
        return await self.invoke(GrainId(interface_name, key), None,
                                 method or MethodSpec(method_name), list(args), kwargs)

    async def invoke(self, grain_id: GrainId, affinity: Affinity | None, method: MethodSpec,
                     args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Send one call along the routing pipeline; its result or a typed error."""
        conn = self._pick(grain_id, affinity)
        if not method.waits_for_result:
            conn.one_way(grain_id.interface, grain_id.key, method.name, args, kwargs,
                         method.delivery)
            return None
        timeout = method.timeout or self.options.request_timeout
        return await conn.request(grain_id.interface, grain_id.key, method.name, args, kwargs,
                                  anyio.current_time() + timeout)

    def _pick(self, grain_id: GrainId, affinity: Affinity | None) -> ClientConnection:
        conn = self._active
        if conn is None or conn.closed:
            raise NoServerAvailable(self._unavailable(grain_id.interface))
        if affinity is not None and affinity.mode is AffinityMode.REQUIRED \
                and affinity.server != conn.server_id:
            raise NoServerAvailable(
                f"{grain_id} requires server {affinity.server!r}, but this single-mode client "
                f"is connected to {conn.server_id!r}")
        return conn

    def _unavailable(self, interface: str) -> str:
        if self._stack is None:
            return "the client is not connected: use 'async with client:' before calling"
        return (f"no server is connected to serve {interface} (servers: "
                f"{', '.join(self.options.servers)}; last error: {self._last_error}); "
                "the client is reconnecting in the background")

    def route(self, interface_or_name: type[GrainInterface] | str, key: Key) -> str:
        """The id of the server a call to (interface, key) would go to now."""
        name = interface_or_name if isinstance(interface_or_name, str) else \
            interface_spec(interface_or_name).name
        return self._pick(GrainId(name, check_key(key)), None).server_id

    # -- views ----------------------------------------------------------------------------

    def _view(self, conn: ClientConnection, healthy: bool) -> ServerView:
        w = conn.welcome
        state = "draining" if conn.draining else ("healthy" if healthy else "unhealthy")
        return ServerView(
            id=w.server_id, endpoint=conn.endpoint, zone=w.zone, metadata=dict(w.metadata),
            interfaces=frozenset(i.name for i in w.manifest), healthy=healthy and not
            conn.draining, rtt=conn.rtt, in_flight=conn.in_flight, state=state,
            last_error=conn.last_error, versions={i.name: i for i in w.manifest})

    @property
    def servers(self) -> Sequence[ServerView]:
        """Every server this client knows, as it sees them now."""
        views = dict(self._known)
        if self._active is not None and not self._active.closed:
            views[self._active.server_id] = self._view(self._active, healthy=True)
        return list(views.values())

    async def add_server(self, endpoint: str) -> str:
        raise ForkcoreError("add_server needs mode = 'multi'; a single-mode client uses the "
                            "endpoints of 'servers' in turn")

    async def remove_server(self, server_id: str) -> None:
        raise ForkcoreError("remove_server needs mode = 'multi'")


__all__ = ["Client", "InterfaceSpec"]
