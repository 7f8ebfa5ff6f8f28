"""The servers a client knows: their connections, manifests and health, and the
candidate lists routing reads.

A server is known by the id it announces in its handshake, so two endpoints announcing
the same id are one server. Every change of membership, health or manifest bumps the
pool and drops the cached candidate lists; between changes, routing an interface reads
one cached list (the same object each time, so strategies may cache on its identity).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

from ..clock import now as clock
from ..errors import NoServerAvailable
from ..grains import InterfaceInfo
from .connection import ClientConnection
from .views import ServerView

log = logging.getLogger("forkcore.client")


class ServerState:
    """What the client holds for one server id."""

    __slots__ = ("connections", "ejected_until", "ejections", "endpoints", "failures",
                 "goodbye", "removed", "view")

    def __init__(self, view: ServerView) -> None:
        self.view = view
        self.connections: list[ClientConnection] = []
        self.endpoints: list[str] = []
        self.removed = False
        self.failures = 0  # consecutive failed calls
        self.ejections = 0  # times ejected so far (the next ejection is longer)
        self.ejected_until = 0.0
        self.goodbye: str | None = None  # why it said goodbye; until back or unreachable

    @property
    def server_id(self) -> str:
        return self.view.id

    def open_connections(self) -> list[ClientConnection]:
        return [c for c in self.connections if not c.closed]

    def best_connection(self) -> ClientConnection | None:
        """The open, responsive connection with the fewest calls in flight."""
        best: ClientConnection | None = None
        for conn in self.connections:
            if not conn.closed and conn.responsive and \
                    (best is None or len(conn.pending) < len(best.pending)):
                best = conn
        return best


Resolver = Callable[[str, Mapping[str, InterfaceInfo]], Collection[str]]


class Pool:
    """Servers by id, their manifests, and the resolved candidates per interface."""

    def __init__(self, resolve: Resolver,
                 on_state: Callable[[ServerView, str, str], None] | None = None) -> None:
        self._resolve = resolve
        self._on_state = on_state
        self.states: dict[str, ServerState] = {}
        self._candidates: dict[str, list[ServerView]] = {}
        self.generation = 0

    # -- membership -----------------------------------------------------------------------

    def attach(self, conn: ClientConnection) -> ServerState:
        """Register a freshly handshaken connection under its server's id; its manifest
        replaces whatever the server declared before (it may have been upgraded)."""
        w = conn.welcome
        state = self.states.get(w.server_id)
        if state is None:
            state = ServerState(ServerView(id=w.server_id, endpoint=conn.endpoint))
            self.states[w.server_id] = state
        if conn.endpoint not in state.endpoints:
            if state.endpoints:
                log.warning("endpoints %s and %s both announce server id %r: treating them as "
                            "one server", ", ".join(state.endpoints), conn.endpoint,
                            w.server_id)
            state.endpoints.append(conn.endpoint)
        state.connections.append(conn)
        state.goodbye = None
        view = state.view
        if not view.healthy:
            view.endpoint = conn.endpoint
        view.zone = w.zone
        view.metadata = dict(w.metadata)
        view.versions = {i.name: i for i in w.manifest}
        view.interfaces = frozenset(view.versions)
        view.last_error = None
        conn.on_change = self._connection_changed
        self._update(state)
        return state

    def detach(self, conn: ClientConnection) -> None:
        state = self.states.get(conn.server_id)
        if state is None:
            return
        if conn in state.connections:
            state.connections.remove(conn)
        state.view.last_error = conn.last_error
        self._update(state)

    def gone(self, endpoint: str, error: str) -> None:
        """A reconnect to `endpoint` failed: a server there that said goodbye is no longer
        draining but gone (unhealthy, with why)."""
        for state in self.states.values():
            if state.goodbye is not None and endpoint in state.endpoints and \
                    not state.open_connections():
                state.goodbye = None
                state.view.last_error = error
                self._recompute(state)

    def _connection_changed(self, conn: ClientConnection) -> None:
        state = self.states.get(conn.server_id)
        if state is None or conn not in state.connections:
            return
        if conn.rtt is not None:
            state.view.rtt = conn.rtt
        self._update(state)

    def _update(self, state: ServerState) -> None:
        """Recompute a server's health and state; drop cached candidates if they changed."""
        for conn in state.connections:
            if conn.goodbye is not None:
                state.goodbye = conn.goodbye  # kept until a new connection is attached
        self._recompute(state)

    def _recompute(self, state: ServerState) -> None:
        view = state.view
        open_conns = state.open_connections()
        if state.removed:
            new_state = "removed"
        elif not open_conns and state.goodbye is not None:
            new_state = "draining"  # it said it is going away: an orderly stop, not a fault
            view.last_error = f"said goodbye: {state.goodbye}"
        elif not open_conns:
            new_state = "unhealthy" if view.state != "connecting" or view.last_error else \
                "connecting"
        elif not any(c.responsive for c in open_conns):
            new_state = "unhealthy"
            view.last_error = "stopped answering heartbeats"
        elif any(c.draining for c in open_conns):
            new_state = "draining"
            if state.goodbye is not None:
                view.last_error = f"said goodbye: {state.goodbye}"
        elif state.ejected_until > clock():
            new_state = "ejected"
        else:
            new_state = "healthy"
        healthy = new_state == "healthy"
        if healthy:
            view.last_error = None  # what went wrong before is over
        if new_state != view.state or healthy != view.healthy:
            old_state = view.state
            if old_state != "connecting" or new_state != "unhealthy":
                log.info("server %s: %s -> %s", view.id, old_state, new_state)
            view.state = new_state
            view.healthy = healthy
            self.changed()
            if self._on_state is not None and old_state != new_state:
                self._on_state(view, old_state, new_state)

    def refresh(self, state: ServerState) -> None:
        """Re-evaluate one server (e.g. when its ejection ends)."""
        if self.states.get(state.view.id) is state:
            self._update(state)

    def ejected_count(self) -> int:
        return sum(1 for s in self.states.values() if s.view.state == "ejected")

    def live_count(self) -> int:
        return sum(1 for s in self.states.values() if not s.removed)

    def changed(self) -> None:
        self.generation += 1
        self._candidates.clear()

    def remove(self, server_id: str) -> ServerState:
        state = self.states[server_id]
        state.removed = True
        self._update(state)
        return state

    def forget(self, server_id: str) -> None:
        state = self.states.get(server_id)
        if state is not None and state.removed:
            del self.states[server_id]
            self.changed()

    # -- routing reads --------------------------------------------------------------------

    def candidates(self, interface: str) -> list[ServerView]:
        """Healthy servers allowed to serve `interface`, ordered by id; cached until the
        next change."""
        cached = self._candidates.get(interface)
        if cached is not None:
            return cached
        offers = {sid: s.view.versions[interface] for sid, s in self.states.items()
                  if s.view.healthy and interface in s.view.versions}
        allowed = set(self._resolve(interface, offers)) if offers else set()
        result = [self.states[sid].view for sid in sorted(allowed) if sid in offers]
        self._candidates[interface] = result
        return result

    def views(self) -> list[ServerView]:
        return [s.view for s in self.states.values() if not s.removed]

    def explain(self, interface: str, extra: str = "") -> NoServerAvailable:
        """A NoServerAvailable that says what exists, what each offers, which are down."""
        if not self.states:
            return NoServerAvailable(f"no server can serve {interface}: the client knows no "
                                     f"server yet{extra}")
        parts = []
        for sid, s in sorted(self.states.items()):
            v = s.view
            offers = ", ".join(f"{i.name} v{i.version}" for i in v.versions.values()) or \
                "nothing"
            why = f", last error: {v.last_error}" if v.last_error and not v.healthy else ""
            parts.append(f"{sid} ({v.state}{why}; offers {offers})")
        offered = any(interface in s.view.versions for s in self.states.values())
        hint = ("the servers offering it are down or excluded by the conflict resolver"
                if offered else f"no server declares {interface}: start one that hosts it")
        return NoServerAvailable(f"no server can serve {interface}{extra}: {hint}. "
                                 f"Servers: {'; '.join(parts)}")

