"""Membership upkeep: which connections a client keeps open, and to whom.

The two modes differ only here, so the client has no mode branches of its own:

- `SingleUpkeep` keeps one connection, to the first endpoint of `servers` that answers,
  and moves to the next (ordered failover, with jittered exponential backoff after a
  full round of failures) when it drops or stops answering heartbeats. A call goes to
  that one server.
- `MultiUpkeep` keeps `connections_per_server` connections to every endpoint,
  reconnecting each with backoff, takes servers in and out at run time
  (`add_server` / `remove_server`), ejects servers whose calls keep failing, and routes
  each call with `routing.route`.

Both run every connection the same way (`Upkeep.session`): connect, handshake, attach
to the pool, pump it with its heartbeat and deadline watcher until it ends.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import anyio
import anyio.abc

from ..clock import now as clock
from ..config import ClientOptions
from ..errors import ConfigError, ConnectError, ForkcoreError, NoServerAvailable, Unauthorized
from ..grains import Affinity, AffinityMode, GrainId
from ..interfaces import Transport
from ..transport import split_endpoint
from .connection import ClientConnection
from .health import Ejector, heartbeat
from .pool import Pool, ServerState
from .routing import AffinityOf, route

log = logging.getLogger("forkcore.client")


def backoff_delay(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, initial·2^attempt)."""
    ceiling = min(cap, initial * (2 ** min(attempt, 32)))
    return random.uniform(ceiling / 2, ceiling)


class Upkeep:
    """What both modes share: the connections' life, and what went wrong last."""

    def __init__(self, options: ClientOptions, transport: Transport, pool: Pool,
                 client_id: str, psk: bytes | None) -> None:
        self.options = options
        self.transport = transport
        self.pool = pool
        self.client_id = client_id
        self.psk = psk
        self.open = False  # between start() and stop()
        self.last_error: str | None = None
        self.endpoint_errors: dict[str, str] = {}  # endpoints whose last attempt failed
        self.retired: set[str] = set()
        self.tg: anyio.abc.TaskGroup | None = None

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.open = False

    def route(self, grain_id: GrainId, affinity: Affinity | None) -> ServerState:
        raise NotImplementedError

    async def before_retry(self, deadline: float) -> None:
        """Wait, until `deadline` at most, for a connection a resent call can use."""

    def failed(self, state: ServerState) -> None:
        """A call to `state` failed (lost in flight or timed out)."""

    def unresponsive(self, conn: ClientConnection) -> Callable[[], None] | None:
        """What to do when `conn`'s server stops answering heartbeats (None: routing
        steers around it while the pool marks it unhealthy)."""
        return None

    async def session(self, endpoint: str,
                      on_open: Callable[[ClientConnection], None]) -> ClientConnection:
        """Connect, handshake, serve one connection until it ends; returns it (closed)."""
        options = self.options
        connect_timeout = options.connect_timeout
        async with self.transport.connect(endpoint, timeout=connect_timeout) as channel:
            conn = await ClientConnection.handshake(channel, endpoint, self.client_id,
                                                    connect_timeout, options.security,
                                                    self.psk)
            self.endpoint_errors.pop(endpoint, None)
            self.pool.attach(conn)
            on_open(conn)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(heartbeat, conn, options.health, self.unresponsive(conn))
                    tg.start_soon(conn.watch_deadlines)
                    await conn.run()
                    tg.cancel_scope.cancel()
            finally:
                conn.close(conn.last_error or "client closed")
                self.pool.detach(conn)
        return conn

    def not_connected(self) -> NoServerAvailable:
        return NoServerAvailable("the client is not connected: use 'async with client:' "
                                 "before calling")

    def _failed_to_connect(self, endpoint: str, exc: ForkcoreError) -> None:
        self.last_error = self.endpoint_errors[endpoint] = str(exc)
        self.pool.gone(endpoint, str(exc))


def _log_lost(conn: ClientConnection) -> None:
    """A server that said goodbye stopped in order (INFO); any other loss is a WARNING."""
    if conn.goodbye is not None:
        log.info("server %s at %s said goodbye (%s); reconnecting", conn.server_id,
                 conn.endpoint, conn.goodbye)
    else:
        log.warning("lost connection to server %s at %s (%s); reconnecting", conn.server_id,
                    conn.endpoint, conn.last_error)


class SingleUpkeep(Upkeep):
    """One connection at a time, to the endpoints of `servers` in turn."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.active: ClientConnection | None = None
        self._connected = anyio.Event()  # set while a connection is open

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        self.tg = tg
        await tg.start(self._maintain)
        self.open = True

    def route(self, grain_id: GrainId, affinity: Affinity | None) -> ServerState:
        conn = self.active
        if conn is None or conn.closed or conn.draining or not conn.responsive:  # _usable
            if self._connected.is_set():
                self._connected = anyio.Event()  # resends wait for the next connection
            raise NoServerAvailable(self._unavailable(grain_id.interface))
        if affinity is not None and affinity.mode is AffinityMode.REQUIRED \
                and affinity.server != conn.server_id:
            raise NoServerAvailable(
                f"{grain_id} requires server {affinity.server!r}, but this single-mode client "
                f"is connected to {conn.server_id!r}")
        return self.pool.states[conn.server_id]

    async def before_retry(self, deadline: float) -> None:
        with anyio.move_on_after(max(0.0, deadline - clock())):
            while not self._usable(self.active):
                if self._connected.is_set():
                    self._connected = anyio.Event()
                await self._connected.wait()

    def unresponsive(self, conn: ClientConnection) -> Callable[[], None] | None:
        return partial(self._drop, conn)

    def _drop(self, conn: ClientConnection) -> None:
        """Single mode cannot route around a frozen server: drop it and move on."""
        conn.close("server stopped answering heartbeats")
        assert self.tg is not None
        self.tg.start_soon(conn.channel.aclose)

    @staticmethod
    def _usable(conn: ClientConnection | None) -> bool:
        return conn is not None and not conn.closed and not conn.draining and conn.responsive

    def _unavailable(self, interface: str) -> str:
        if not self.open:
            return "the client is not connected: use 'async with client:' before calling"
        conn = self.active
        if conn is not None and conn.draining and not conn.closed:
            why = f"server {conn.server_id} is draining"
        elif conn is not None and not conn.responsive and not conn.closed:
            why = f"server {conn.server_id} stopped answering heartbeats"
        else:
            why = f"last error: {self.last_error}"
        return (f"no server is connected to serve {interface} (servers: "
                f"{', '.join(self.options.servers)}; {why}); "
                "the client is reconnecting in the background")

    async def _maintain(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep one connection open, to the first endpoint that answers; move on when it
        drops, backing off after a full round of failures."""
        options = self.options
        endpoints = options.servers
        started = False
        index = 0
        attempt = 0

        def opened(conn: ClientConnection) -> None:
            nonlocal started, attempt
            self.active = conn
            self._connected.set()
            attempt = 0
            log.info("connected to server %s at %s", conn.server_id, conn.endpoint)
            if not started:
                started = True
                task_status.started()

        while True:
            errors: list[str] = []
            for offset in range(len(endpoints)):
                position = (index + offset) % len(endpoints)
                try:
                    conn = await self.session(endpoints[position], opened)
                except (ConnectError, Unauthorized) as exc:
                    if isinstance(exc, Unauthorized) and not started:
                        raise
                    errors.append(str(exc))
                    self._failed_to_connect(endpoints[position], exc)
                    continue
                self._lost(conn)
                index = (position + 1) % len(endpoints)
                break
            else:
                if not started:
                    raise ConnectError("could not connect to any server: " + "; ".join(errors))
                await anyio.sleep(backoff_delay(attempt, options.reconnect_initial_delay,
                                                options.reconnect_max_delay))
                attempt += 1

    def _lost(self, conn: ClientConnection) -> None:
        if self.active is conn:
            self.active = None
            if self._connected.is_set():  # never replace an event someone waits on
                self._connected = anyio.Event()
        self.last_error = conn.last_error
        _log_lost(conn)


class MultiUpkeep(Upkeep):
    """Connections to every server; routing over all of them."""

    def __init__(self, options: ClientOptions, transport: Transport, pool: Pool,
                 client_id: str, psk: bytes | None, *, strategy: Any,
                 policy: AffinityOf | None) -> None:
        super().__init__(options, transport, pool, client_id, psk)
        self.strategy = strategy
        self.policy = policy
        self.ejector = Ejector(options.health, self._schedule_readmission)
        self._scopes: dict[str, list[anyio.CancelScope]] = {}

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        self.tg = tg
        outcomes = await self._open(self.options.servers)
        if not any(isinstance(o, str) for o in outcomes):
            refusals = [o for o in outcomes if isinstance(o, Unauthorized)]
            if refusals:
                raise refusals[0]
            raise ConnectError("could not connect to any server: " + "; ".join(
                str(o) for o in outcomes))
        self.open = True

    def route(self, grain_id: GrainId, affinity: Affinity | None) -> ServerState:
        if not self.open and not self.pool.candidates(grain_id.interface):
            raise self.not_connected()
        return route(self.pool, grain_id, affinity, self.policy, self.strategy,
                     self.options.strategy)

    def failed(self, state: ServerState) -> None:
        pool = self.pool
        if self.ejector.failure(state, pool.live_count(), pool.ejected_count()):
            pool.refresh(state)

    def _schedule_readmission(self, state: ServerState, after: float) -> None:
        async def readmit() -> None:
            await anyio.sleep(after)
            self.pool.refresh(state)

        assert self.tg is not None
        self.tg.start_soon(readmit)

    async def _open(self, endpoints: Sequence[str]) -> list[str | ForkcoreError]:
        """Start `connections_per_server` maintainers per endpoint, all in parallel; each
        outcome is the server id connected to or the error of the first attempt."""
        outcomes: list[str | ForkcoreError] = []
        tg = self.tg
        assert tg is not None

        async def start(endpoint: str) -> None:
            outcomes.append(await tg.start(self._maintain, endpoint))

        async with anyio.create_task_group() as starters:
            for endpoint in endpoints:
                self.retired.discard(endpoint)
                for _ in range(self.options.connections_per_server):
                    starters.start_soon(start, endpoint)
        return outcomes

    async def _maintain(
        self, endpoint: str, *,
        task_status: anyio.abc.TaskStatus[str | ForkcoreError] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep one connection to `endpoint` open, reconnecting with jittered exponential
        backoff, until the endpoint's server is removed or the client closes."""
        options = self.options
        started = False
        attempt = 0

        def opened(conn: ClientConnection) -> None:
            nonlocal started, attempt
            attempt = 0
            if not started:
                started = True
                task_status.started(conn.server_id)
            log.info("connected to server %s at %s", conn.server_id, conn.endpoint)

        with anyio.CancelScope() as scope:
            self._scopes.setdefault(endpoint, []).append(scope)
            try:
                while endpoint not in self.retired:
                    try:
                        conn = await self.session(endpoint, opened)
                        if endpoint not in self.retired:
                            _log_lost(conn)
                    except (ConnectError, Unauthorized) as exc:
                        self._failed_to_connect(endpoint, exc)
                        if not started:
                            started = True
                            task_status.started(exc)
                    if endpoint in self.retired:
                        break
                    await anyio.sleep(backoff_delay(attempt, options.reconnect_initial_delay,
                                                    options.reconnect_max_delay))
                    attempt += 1
            finally:
                self._scopes[endpoint].remove(scope)

    async def add_server(self, endpoint: str) -> str:
        split_endpoint(endpoint)
        for state in self.pool.states.values():
            if endpoint in state.endpoints and not state.removed and self._scopes.get(endpoint):
                return state.view.id
        outcomes = await self._open([endpoint])
        for outcome in outcomes:
            if isinstance(outcome, str):
                return outcome
        self._retire_endpoint(endpoint)
        if isinstance(outcomes[0], Unauthorized):
            raise Unauthorized(f"add_server({endpoint!r}): {outcomes[0]}")
        raise ConnectError(f"add_server({endpoint!r}): {outcomes[0]}")

    def remove_server(self, server_id: str) -> None:
        pool = self.pool
        state = pool.states.get(server_id)
        if state is None or state.removed:
            known = ", ".join(sorted(s for s, st in pool.states.items()
                                     if not st.removed)) or "none"
            raise ConfigError(f"remove_server({server_id!r}): no such server (known: {known})")
        pool.remove(server_id)
        for endpoint in state.endpoints:
            self.retired.add(endpoint)
        assert self.tg is not None
        self.tg.start_soon(self._retire, state)
        log.info("server %s removed", server_id)

    async def _retire(self, state: ServerState) -> None:
        with anyio.move_on_after(self.options.request_timeout):
            while any(c.pending for c in state.connections):
                await anyio.sleep(0.01)
        for endpoint in state.endpoints:
            self._retire_endpoint(endpoint)
        self.pool.forget(state.view.id)

    def _retire_endpoint(self, endpoint: str) -> None:
        self.retired.add(endpoint)
        for scope in list(self._scopes.get(endpoint, ())):
            scope.cancel()


__all__ = ["MultiUpkeep", "SingleUpkeep", "Upkeep", "backoff_delay"]
