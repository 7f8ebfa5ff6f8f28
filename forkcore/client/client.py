"""`forkcore.Client`: connects to servers and routes every call to one of them.

Single mode holds one connection, to the first reachable endpoint of `servers`, and
moves to the next endpoint (with jittered exponential backoff) when it drops. Multi mode
holds `connections_per_server` connections to every server and routes each call through
the pipeline candidates → affinity → strategy → connection (fewest calls in flight).
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from time import monotonic
from typing import Any, TypeVar

import anyio
import anyio.abc

from ..builtins import NoAffinity
from ..config import ClientOptions, load_config, options_from_kwargs
from ..context import check_entries
from ..context import outgoing as outgoing_context
from ..errors import (
    ConfigError,
    ConnectError,
    ForkcoreError,
    NoServerAvailable,
    PluginNotFound,
    RequestTimeout,
    Unauthorized,
)
from ..grains import (
    Affinity,
    AffinityMode,
    GrainId,
    GrainInterface,
    Key,
    MethodSpec,
    check_key,
    interface_spec,
    known_interface,
)
from ..interceptors import CallInfo, run_chain
from ..observers import Observers
from ..plugins import create, create_interceptors, lookup
from ..protocol.messages import HEADER_CONTEXT
from ..security import load_psk
from ..transport import split_endpoint
from .connection import ClientConnection, NotSent, ServerRefused
from .health import Ejector, RetryBudget, heartbeat
from .pool import Pool, ServerState
from .proxy import GrainRef, proxy_class
from .views import ServerView

log = logging.getLogger("forkcore.client")

T = TypeVar("T", bound=GrainInterface)
DEFAULT_STRATEGY = "round_robin"
MAX_ATTEMPTS = 5  # routing attempts per call (the first and at most four resends)
_CURRENT: Any = object()  # invoke(context=...) not given: the current call context


def backoff_delay(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, initial·2^attempt)."""
    ceiling = min(cap, initial * (2 ** min(attempt, 32)))
    return random.uniform(ceiling / 2, ceiling)


class Client:
    """A client of one or more forkcore servers; use as `async with Client(...) as client:`."""

    def __init__(self, *, mode: str = "single", servers: Sequence[str],
                 transport: str = "tcp", strategy: str = DEFAULT_STRATEGY,
                 strategy_options: Mapping[str, Any] | None = None,
                 conflict_resolver: str = "highest_version", affinity: str = "none",
                 affinity_options: Mapping[str, Any] | None = None,
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
                      affinity_options=dict(affinity_options or {}),
                      connections_per_server=connections_per_server,
                      request_timeout=request_timeout, connect_timeout=connect_timeout,
                      transport_options=dict(transport_options or {}), health=health,
                      security=security, **more)
        self._init(options_from_kwargs(ClientOptions, values, "Client()"), "Client()")

    @classmethod
    def from_config(cls, path_or_mapping: str | Path | Mapping[str, Any]) -> Client:
        """A client from the `[client]` table of a TOML file or mapping."""
        config = load_config(path_or_mapping)
        if config.client is None:
            raise ConfigError(f"{config.path or '<config>'}: no [client] table")
        client = cls.__new__(cls)
        client._init(config.client, f"{config.path or '<config>'}: [client]")
        return client

    def _init(self, options: ClientOptions, where: str) -> None:
        self._psk = load_psk(options.security.psk, options.security.psk_file,
                             f"{where}.security")
        self.options = options
        self.mode = options.mode
        self.transport = create("transport", options.transport, options.transport_options,
                                where, "transport", "transport_options")
        self.strategy: Any = None
        if options.mode == "multi":
            self.strategy = create("strategy", options.strategy, options.strategy_options,
                                   where, "strategy", "strategy_options")
        elif options.strategy != DEFAULT_STRATEGY:
            # single mode routes without a strategy, but a name given is still checked now
            try:
                lookup("strategy", options.strategy)
            except PluginNotFound as exc:
                raise PluginNotFound(f"{where} key 'strategy': {exc}") from None
        self.conflict_resolver = create("conflict_resolver", options.conflict_resolver, {},
                                        where, "conflict_resolver")
        self.affinity_policy = create("affinity_policy", options.affinity,
                                      options.affinity_options, where, "affinity",
                                      "affinity_options")
        self._policy_affinity = None if isinstance(self.affinity_policy, NoAffinity) else \
            self.affinity_policy.affinity
        self._policy_routed = getattr(self.affinity_policy, "routed", None)
        self.client_id = options.client_id or uuid.uuid4().hex
        self._observers = Observers(self._build_observers(options, where))
        self._interceptors = create_interceptors(options.interceptors,
                                                options.interceptor_options, where)
        self._watch_calls = self._observers.watches_calls
        self._pool = Pool(self.conflict_resolver.resolve, self._observers.server_state_changed)
        self._active: ClientConnection | None = None
        self._last_error: str | None = None
        self._scopes: dict[str, list[anyio.CancelScope]] = {}
        self._retired: set[str] = set()
        self._endpoint_errors: dict[str, str] = {}  # endpoints whose last attempt failed
        self._stack: AsyncExitStack | None = None
        self._connected = anyio.Event()  # single mode: set while a connection is open
        self._ejector = Ejector(options.health, self._schedule_readmission)
        self._retry_budget = RetryBudget(options.health.retry_budget)

    @staticmethod
    def _build_observers(options: ClientOptions, where: str) -> list[Any]:
        observers = []
        for item in options.observers:
            if isinstance(item, str):
                extra = options.observer_options.get(item, {})
                if not isinstance(extra, Mapping):
                    raise ConfigError(f"{where} key 'observer_options': the options of "
                                      f"{item!r} must be a table")
                observers.append(create("observer", item, extra, where, "observers",
                                        "observer_options"))
            else:
                observers.append(item)
        return observers

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            if self.mode == "single":
                await self._tg.start(self._maintain_single)
            else:
                outcomes = await self._open(self.options.servers)
                if not any(isinstance(o, str) for o in outcomes):
                    refusals = [o for o in outcomes if isinstance(o, Unauthorized)]
                    if refusals:
                        raise refusals[0]
                    raise ConnectError("could not connect to any server: " + "; ".join(
                        str(o) for o in outcomes))
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
        await stack.__aexit__(None, None, None)  # the block's own error propagates by itself
        self._active = None

    def _connection_options(self) -> tuple[float, float, float, float]:
        o = self.options
        return (o.connect_timeout, o.health.heartbeat_interval, o.reconnect_initial_delay,
                o.reconnect_max_delay)

    async def _session(self, endpoint: str, on_open: Any) -> ClientConnection:
        """Connect, handshake, serve one connection until it ends; returns it (closed)."""
        connect_timeout = self.options.connect_timeout
        async with self.transport.connect(endpoint, timeout=connect_timeout) as channel:
            conn = await ClientConnection.handshake(channel, endpoint, self.client_id,
                                                    connect_timeout, self.options.security,
                                                    self._psk)
            self._endpoint_errors.pop(endpoint, None)
            self._pool.attach(conn)
            on_open(conn)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(heartbeat, conn, self.options.health,
                                  partial(self._unresponsive, conn)
                                  if self.mode == "single" else None)
                    tg.start_soon(conn.watch_deadlines)
                    await conn.run()
                    tg.cancel_scope.cancel()
            finally:
                conn.close(conn.last_error or "client closed")
                self._pool.detach(conn)
        return conn

    def _unresponsive(self, conn: ClientConnection) -> None:
        """Single mode cannot route around a frozen server: drop it and move on."""
        conn.close("server stopped answering heartbeats")
        self._tg.start_soon(conn.channel.aclose)

    def _schedule_readmission(self, state: ServerState, after: float) -> None:
        async def readmit() -> None:
            await anyio.sleep(after)
            self._pool.refresh(state)

        self._tg.start_soon(readmit)

    async def _maintain_single(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep one connection open, to the first endpoint that answers; move on when it
        drops, backing off after a full round of failures."""
        _, _, initial, cap = self._connection_options()
        endpoints = self.options.servers
        started = False
        index = 0
        attempt = 0

        def opened(conn: ClientConnection) -> None:
            nonlocal started, attempt
            self._active = conn
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
                    conn = await self._session(endpoints[position], opened)
                except Unauthorized as exc:
                    if not started:
                        raise
                    errors.append(str(exc))
                    self._last_error = self._endpoint_errors[endpoints[position]] = str(exc)
                    continue
                except ConnectError as exc:
                    errors.append(str(exc))
                    self._last_error = self._endpoint_errors[endpoints[position]] = str(exc)
                    continue
                self._lost(conn)
                index = (position + 1) % len(endpoints)
                break
            else:
                if not started:
                    raise ConnectError("could not connect to any server: " + "; ".join(errors))
                await anyio.sleep(backoff_delay(attempt, initial, cap))
                attempt += 1

    def _lost(self, conn: ClientConnection) -> None:
        if self._active is conn:
            self._active = None
            if self._connected.is_set():  # never replace an event someone waits on
                self._connected = anyio.Event()
        self._last_error = conn.last_error
        log.warning("lost connection to server %s at %s (%s); reconnecting", conn.server_id,
                    conn.endpoint, conn.last_error)

    async def _open(self, endpoints: Sequence[str]) -> list[str | ForkcoreError]:
        """Start `connections_per_server` maintainers per endpoint, all in parallel; each
        outcome is the server id connected to or the error of the first attempt."""
        outcomes: list[str | ForkcoreError] = []

        async def start(endpoint: str) -> None:
            outcomes.append(await self._tg.start(self._maintain_endpoint, endpoint))

        async with anyio.create_task_group() as starters:
            for endpoint in endpoints:
                self._retired.discard(endpoint)
                for _ in range(self.options.connections_per_server):
                    starters.start_soon(start, endpoint)
        return outcomes

    async def _maintain_endpoint(
        self, endpoint: str, *,
        task_status: anyio.abc.TaskStatus[str | ForkcoreError] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep one connection to `endpoint` open (multi mode), reconnecting with jittered
        exponential backoff, until the endpoint's server is removed or the client closes."""
        _, _, initial, cap = self._connection_options()
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
                while endpoint not in self._retired:
                    try:
                        conn = await self._session(endpoint, opened)
                        if endpoint not in self._retired:
                            log.warning("lost connection to server %s at %s (%s); "
                                        "reconnecting", conn.server_id, endpoint,
                                        conn.last_error)
                    except (ConnectError, Unauthorized) as exc:
                        self._last_error = self._endpoint_errors[endpoint] = str(exc)
                        if not started:
                            started = True
                            task_status.started(exc)
                    if endpoint in self._retired:
                        break
                    await anyio.sleep(backoff_delay(attempt, initial, cap))
                    attempt += 1
            finally:
                self._scopes[endpoint].remove(scope)

    # -- membership at runtime ------------------------------------------------------------

    async def add_server(self, endpoint: str) -> str:
        """Connect to one more server (multi mode) and route to it; its id."""
        self._require_multi("add_server")
        split_endpoint(endpoint)
        for state in self._pool.states.values():
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

    async def remove_server(self, server_id: str) -> None:
        """Stop routing to `server_id` now; its calls in flight may finish, then its
        connections close and it is not reconnected."""
        self._require_multi("remove_server")
        state = self._pool.states.get(server_id)
        if state is None or state.removed:
            known = ", ".join(sorted(s for s, st in self._pool.states.items()
                                     if not st.removed)) or "none"
            raise ConfigError(f"remove_server({server_id!r}): no such server (known: {known})")
        self._pool.remove(server_id)
        for endpoint in state.endpoints:
            self._retired.add(endpoint)
        self._tg.start_soon(self._retire, state)
        log.info("server %s removed", server_id)

    async def _retire(self, state: ServerState) -> None:
        with anyio.move_on_after(self.options.request_timeout):
            while any(c.pending for c in state.connections):
                await anyio.sleep(0.01)
        for endpoint in state.endpoints:
            self._retire_endpoint(endpoint)
        self._pool.forget(state.view.id)

    def _retire_endpoint(self, endpoint: str) -> None:
        self._retired.add(endpoint)
        for scope in list(self._scopes.get(endpoint, ())):
            scope.cancel()

    def _require_multi(self, what: str) -> None:
        if self.mode != "multi":
            raise ConfigError(f"{what} needs mode = 'multi'; a single-mode client uses the "
                              "endpoints of 'servers' in turn")
        if self._stack is None:
            raise NoServerAvailable(f"{what}: use 'async with client:' first")

    # -- grain references and calls -------------------------------------------------------

    def get_grain(self, interface: type[T], key: Key, *, server: str | None = None,
                  affinity: AffinityMode | str | None = None) -> T:
        """A proxy for grain `key` of `interface`, typed as the interface.

        `server` with `affinity="required"` calls only that server; `"preferred"` (the
        default when `server` is given) falls back through the routing pipeline."""
        spec = interface_spec(interface)
        check_key(key)
        try:
            mode = AffinityMode(affinity) if affinity is not None else (
                AffinityMode.PREFERRED if server is not None else AffinityMode.NONE)
        except ValueError:
            raise ConfigError(f"affinity={affinity!r}: use 'none', 'preferred' or "
                              "'required'") from None
        if mode is not AffinityMode.NONE and server is None:
            raise ConfigError(f"affinity={mode.value!r} needs server=: the id of the server")
        ref = GrainRef(self, GrainId(spec.name, key),
                       Affinity(server, mode) if server is not None and
                       mode is not AffinityMode.NONE else None)
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
                     args: list[Any], kwargs: dict[str, Any],
                     context: Any = _CURRENT) -> Any:
        """Send one call along the routing pipeline; its result or a typed error.

        The call carries `context` (by default the current `call_context`'s entries),
        after the client's interceptors, if any, have seen it.

        A call that never left the client, or that a server refused without running it,
        goes to the next choice; a call lost in flight is resent only if its method is
        idempotent and the retry budget allows; nothing outlives the call's deadline."""
        if context is _CURRENT:
            if self._interceptors:
                return await self._intercepted(grain_id, affinity, method, args, kwargs)
            context = outgoing_context()
        headers = {HEADER_CONTEXT: context} if context else None
        deadline = monotonic() + (method.timeout or self.options.request_timeout)
        for attempt in range(MAX_ATTEMPTS):
            if attempt and self.mode == "single":
                await self._wait_connected(deadline)
            state = self._route(grain_id, affinity)
            if self._policy_routed is not None:
                self._policy_routed(grain_id, state.view.id)
            conn = state.best_connection()
            if conn is None:
                raise self._pool.explain(grain_id.interface)
            if not method.waits_for_result:
                try:
                    conn.one_way(grain_id.interface, grain_id.key, method.name, args, kwargs,
                                 method.delivery, headers)
                except NotSent:
                    continue
                if self._watch_calls:
                    self._observers.call_finished(self._observers.call_started(
                        grain_id, method.name, state.view.id), None)
                return None
            view = state.view
            view.in_flight += 1
            watched = self._observers.call_started(grain_id, method.name, view.id) \
                if self._watch_calls else None
            error: BaseException | None = None
            try:
                rid, pending = conn.start(grain_id.interface, grain_id.key, method.name,
                                          args, kwargs, deadline, method.delivery, headers)
                try:
                    await pending.event.wait()  # the deadline watcher fails it when overdue
                finally:
                    if not pending.done:  # we were cancelled
                        conn.abandon(rid)
                if pending.error is not None:
                    raise pending.error
                result = pending.result
            except NotSent as exc:
                error = exc
                continue  # never left: the next choice is safe
            except ServerRefused as exc:
                error = exc
                continue  # refused before running (draining, overloaded): safe too
            except ConnectError as exc:
                error = exc
                if getattr(exc, "remote", False):
                    raise  # raised on the server (by an interceptor), not a lost connection
                self._failed(state)
                if method.idempotent and monotonic() < deadline \
                        and self._retry_budget.take():
                    log.debug("resending idempotent %s.%s after: %s", grain_id, method.name,
                              exc)
                    continue
                raise
            except RequestTimeout as exc:
                error = exc
                self._failed(state)
                raise
            except BaseException as exc:
                error = exc
                raise
            finally:
                view.in_flight -= 1
                if watched is not None:
                    self._observers.call_finished(watched, error)
            state.failures = 0
            budget = self._retry_budget
            if budget.tokens < budget.capacity:
                budget.success()
            return result
        raise NoServerAvailable(f"{grain_id}.{method.name}: no server took the call after "
                                f"{MAX_ATTEMPTS} attempts; servers: " + ", ".join(
                                    f"{v.id} ({v.state})" for v in self.servers))

    async def _intercepted(self, grain_id: GrainId, affinity: Affinity | None,
                           method: MethodSpec, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The call through the client's interceptors; the last one's proceed() sends it
        with the context they left."""
        current = outgoing_context()
        info = CallInfo("client", grain_id, method.name, args, kwargs,
                        dict(current) if current else {})

        async def send() -> Any:
            check_entries(info.context, "interceptor context")
            return await self.invoke(grain_id, affinity, method, info.args, info.kwargs,
                                     dict(info.context) or None)

        return await run_chain(self._interceptors, info, send)

    def _failed(self, state: ServerState) -> None:
        if self.mode == "multi":
            if self._ejector.failure(state, self._pool.live_count(), self._pool.ejected_count()):
                self._pool.refresh(state)

    async def _wait_connected(self, deadline: float) -> None:
        """Single mode, resending: wait (until the deadline) for a usable connection."""
        with anyio.move_on_after(max(0.0, deadline - monotonic())):
            while not self._usable(self._active):
                if self._connected.is_set():
                    self._connected = anyio.Event()
                await self._connected.wait()

    @staticmethod
    def _usable(conn: ClientConnection | None) -> bool:
        return conn is not None and not conn.closed and not conn.draining and conn.responsive

    def _route(self, grain_id: GrainId, affinity: Affinity | None) -> ServerState:
        """candidates → affinity → strategy: the server a call goes to, or
        NoServerAvailable saying why there is none."""
        if self.mode == "single":
            return self._route_single(grain_id, affinity)
        pool = self._pool
        candidates = pool.candidates(grain_id.interface)
        if affinity is None and self._policy_affinity is not None and candidates:
            affinity = self._policy_affinity(grain_id, candidates)
        if affinity is not None:
            state = pool.states.get(affinity.server)
            usable = state is not None and any(v is state.view for v in candidates)
            if usable:
                assert state is not None
                return state
            if affinity.mode is AffinityMode.REQUIRED:
                raise pool.explain(grain_id.interface,
                                   f" on required server {affinity.server!r} "
                                   f"({'unknown' if state is None else state.view.state})")
        if not candidates:
            if self._stack is None:
                raise NoServerAvailable(self._unavailable(grain_id.interface))
            raise pool.explain(grain_id.interface)
        chosen = self.strategy.select(grain_id, candidates)
        state = pool.states.get(chosen)
        if state is None:
            raise ForkcoreError(f"strategy {self.options.strategy!r} chose {chosen!r}, which "
                                "is not one of the candidates: the strategy plugin is broken")
        return state

    def _route_single(self, grain_id: GrainId, affinity: Affinity | None) -> ServerState:
        conn = self._active
        if conn is None or not self._usable(conn):
            if self._connected.is_set():
                self._connected = anyio.Event()  # resends wait for the next connection
            raise NoServerAvailable(self._unavailable(grain_id.interface))
        if affinity is not None and affinity.mode is AffinityMode.REQUIRED \
                and affinity.server != conn.server_id:
            raise NoServerAvailable(
                f"{grain_id} requires server {affinity.server!r}, but this single-mode client "
                f"is connected to {conn.server_id!r}")
        return self._pool.states[conn.server_id]

    def _unavailable(self, interface: str) -> str:
        if self._stack is None:
            return "the client is not connected: use 'async with client:' before calling"
        conn = self._active
        if conn is not None and conn.draining and not conn.closed:
            why = f"server {conn.server_id} is draining"
        elif conn is not None and not conn.responsive and not conn.closed:
            why = f"server {conn.server_id} stopped answering heartbeats"
        else:
            why = f"last error: {self._last_error}"
        return (f"no server is connected to serve {interface} (servers: "
                f"{', '.join(self.options.servers)}; {why}); "
                "the client is reconnecting in the background")

    def route(self, interface_or_name: type[GrainInterface] | str, key: Key, *,
              server: str | None = None, affinity: AffinityMode | str | None = None) -> str:
        """The id of the server a call to (interface, key) would go to now: the same
        pipeline a call runs (candidates → affinity → strategy)."""
        name = interface_or_name if isinstance(interface_or_name, str) else \
            interface_spec(interface_or_name).name
        grain_id = GrainId(name, check_key(key))
        ref_affinity = None
        if server is not None:
            mode = AffinityMode(affinity) if affinity is not None else AffinityMode.PREFERRED
            if mode is not AffinityMode.NONE:
                ref_affinity = Affinity(server, mode)
        return self._route(grain_id, ref_affinity).view.id

    # -- views ----------------------------------------------------------------------------

    @property
    def unreachable(self) -> dict[str, str]:
        """Endpoints this client could not connect to (and that belong to no known
        server), with the last error of each: servers that are down since before it
        learned their ids."""
        known = {e for st in self._pool.states.values() if not st.removed
                 for e in st.endpoints}
        return {e: err for e, err in self._endpoint_errors.items()
                if e not in known and e not in self._retired}

    async def server_stats(self, timeout: float = 1.0) -> dict[str, dict[str, Any]]:
        """Each connected server's counters (calls served, in flight, activations,
        connections, uptime), asked for concurrently; servers that do not answer within
        `timeout` are left out."""
        results: dict[str, dict[str, Any]] = {}

        async def ask(state: ServerState) -> None:
            conn = state.best_connection()
            if conn is not None:
                values = await conn.stats(timeout)
                if values is not None:
                    results[state.view.id] = values

        async with anyio.create_task_group() as tg:
            for state in list(self._pool.states.values()):
                if not state.removed:
                    tg.start_soon(ask, state)
        return results

    @property
    def servers(self) -> Sequence[ServerView]:
        """Every server this client knows (not removed), kept current."""
        return self._pool.views()


__all__ = ["Client"]
