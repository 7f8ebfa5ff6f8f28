"""The hooks plugins implement. Each is called with one keyword argument, `register`:
a callable `register(name, factory)`; a factory is called with the keyword options from
the configuration (`transport_options`, `strategy_options`, ...) and returns the plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("forkcore")
hookimpl = pluggy.HookimplMarker("forkcore")

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def forkcore_register_transports(register: Register) -> None:
    """Register transports: objects with `connect(endpoint, timeout=)` and `listen(endpoint)`."""


@hookspec
def forkcore_register_strategies(register: Register) -> None:
    """Register strategies: objects with `select(grain_id, servers) -> server id`."""


@hookspec
def forkcore_register_conflict_resolvers(register: Register) -> None:
    """Register conflict resolvers: objects with `resolve(interface, offers) -> server ids`."""


@hookspec
def forkcore_register_affinity_policies(register: Register) -> None:
    """Register affinity policies: objects with `affinity(grain_id, servers)` and
    optionally `routed(grain_id, server_id)`."""


@hookspec
def forkcore_register_observers(register: Register) -> None:
    """Register observers: objects with any of `call_started(grain_id, method, server_id)`,
    `call_finished(context, error)` and `server_state_changed(view, old, new)`."""


@hookspec
def forkcore_register_authenticators(register: Register) -> None:
    """Register authenticators: objects with `authenticate(token, peer)` returning a
    `forkcore.Identity` (or an awaitable of one) when the token is valid, else None."""


@hookspec
def forkcore_register_membership(register: Register) -> None:
    """Register membership providers: objects with `watch()` (client side) and
    `join(member)` (server side); see `forkcore.interfaces.Membership`."""


@hookspec
def forkcore_register_storage(register: Register) -> None:
    """Register storage providers: objects with `read`, `write`, `delete` and `scan`
    (compare-and-set on an etag); see `forkcore.interfaces.Storage`."""


@hookspec
def forkcore_register_interceptors(register: Register) -> None:
    """Register interceptors: objects with `async intercept(call, proceed)`; see
    `forkcore.interfaces.Interceptor`."""
