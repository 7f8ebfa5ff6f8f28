"""`forkcore.Client`: connects to servers and routes every call to one of them.

What the two modes keep open, and how a call finds its server, is the upkeep's
(`upkeep.SingleUpkeep`: ordered failover over `servers`; `upkeep.MultiUpkeep`: every
server, routed by `routing.route`). The client itself builds the plugins, hands out
proxies, and runs each call as a short loop over attempts (`invoke`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc

from ..builtins import NoAffinity
from ..clock import now as clock
from ..config import ClientOptions, load_config, options_from_kwargs
from ..context import check_entries
from ..context import outgoing as outgoing_context
from ..errors import (
    ConfigError,
    ConnectError,
    NoServerAvailable,
    PluginNotFound,
    RequestTimeout,
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
from ..plugins import create, create_interceptors, install_hint, lookup, registry
from ..protocol.messages import HEADER_CONTEXT
from ..security import load_psk
from .connection import NotSent, ServerRefused
from .health import RetryBudget
from .pool import Pool, ServerState
from .proxy import GrainRef, proxy_class
from .upkeep import MultiUpkeep, SingleUpkeep, backoff_delay
from .views import ServerView

log = logging.getLogger("forkcore.client")

T = TypeVar("T", bound=GrainInterface)
DEFAULT_STRATEGY = "round_robin"
MAX_ATTEMPTS = 5  # routing attempts per call (the first and at most four resends)
_CURRENT: Any = object()  # invoke(context=...) not given: the current call context


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
            if options.strategy == DEFAULT_STRATEGY and not registry("strategy"):
                raise PluginNotFound(
                    f"{where} key 'mode': multi mode needs a strategy plugin and none is "
                    f"installed; the default strategy, {DEFAULT_STRATEGY!r}, "
                    f"{install_hint('strategy', DEFAULT_STRATEGY)}")
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
        self._stack: AsyncExitStack | None = None
        self._retry_budget = RetryBudget(options.health.retry_budget)
        if options.mode == "single":
            self._upkeep: SingleUpkeep | MultiUpkeep = SingleUpkeep(
                options, self.transport, self._pool, self.client_id, self._psk)
        else:
            self._upkeep = MultiUpkeep(options, self.transport, self._pool, self.client_id,
                                       self._psk, strategy=self.strategy,
                                       policy=self._policy_affinity)
        self._route = self._upkeep.route  # on every call's path: bound once

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
            await self._upkeep.start(self._tg)
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
        self._upkeep.stop()
        self._tg.cancel_scope.cancel()
        await stack.__aexit__(None, None, None)  # the block's own error propagates by itself

    # -- membership at runtime ------------------------------------------------------------

    async def add_server(self, endpoint: str) -> str:
        """Connect to one more server (multi mode) and route to it; its id."""
        return await self._require_multi("add_server").add_server(endpoint)

    async def remove_server(self, server_id: str) -> None:
        """Stop routing to `server_id` now; its calls in flight may finish, then its
        connections close and it is not reconnected."""
        self._require_multi("remove_server").remove_server(server_id)

    def _require_multi(self, what: str) -> MultiUpkeep:
        if not isinstance(self._upkeep, MultiUpkeep):
            raise ConfigError(f"{what} needs mode = 'multi'; a single-mode client uses the "
                              "endpoints of 'servers' in turn")
        if self._stack is None:
            raise NoServerAvailable(f"{what}: use 'async with client:' first")
        return self._upkeep

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
        if method is not None and method.check_arguments is not None:
            method.check_arguments(args, kwargs)
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
        deadline = clock() + (method.timeout or self.options.request_timeout)
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                await self._upkeep.before_retry(deadline)
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
                self._upkeep.failed(state)
                if method.idempotent and clock() < deadline \
                        and self._retry_budget.take():
                    log.debug("resending idempotent %s.%s after: %s", grain_id, method.name,
                              exc)
                    continue
                raise
            except RequestTimeout as exc:
                error = exc
                if not getattr(exc, "remote", False):  # not an interceptor's refusal
                    self._upkeep.failed(state)
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
        upkeep = self._upkeep
        return {e: err for e, err in upkeep.endpoint_errors.items()
                if e not in known and e not in upkeep.retired}

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


__all__ = ["Client", "backoff_delay"]
