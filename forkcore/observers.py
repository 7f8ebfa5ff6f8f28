"""Observers: plugins that watch calls and server state changes (metrics, tracing, logs).

An observer is an object with any of these methods; the client calls only those it has:

    call_started(grain_id, method, server_id) -> context   # just before a call is sent
    call_finished(context, error)   # when it ends; error is None or the exception
    server_state_changed(view, old, new)   # a ServerView's state changed (once per change)

They run synchronously on the call's path, so they must be quick and must not raise;
an exception from an observer is logged (once per observer) and otherwise ignored.
Observers register through `forkcore_register_observers` and a client enables them by
name (`observers = ["opentelemetry"]`) or takes observer objects directly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from .grains import GrainId

log = logging.getLogger("forkcore.observers")


class Observer(Protocol):
    def call_started(self, grain_id: GrainId, method: str, server_id: str) -> Any: ...

    def call_finished(self, context: Any, error: BaseException | None) -> None: ...

    def server_state_changed(self, view: Any, old: str, new: str) -> None: ...


class Observers:
    """Fans events out to the enabled observers, isolating their failures."""

    __slots__ = ("_finished", "_started", "_state", "_warned")

    def __init__(self, observers: Sequence[Any]) -> None:
        self._started = [(o, o.call_started) for o in observers if hasattr(o, "call_started")]
        self._finished = [o.call_finished if hasattr(o, "call_finished") else None
                          for o, _ in self._started]
        self._state = [o.server_state_changed for o in observers
                       if hasattr(o, "server_state_changed")]
        self._warned: set[int] = set()

    @property
    def watches_calls(self) -> bool:
        return bool(self._started)

    def call_started(self, grain_id: GrainId, method: str, server_id: str) -> list[Any]:
        contexts = []
        for observer, started in self._started:
            try:
                contexts.append(started(grain_id, method, server_id))
            except Exception as exc:
                self._complain(observer, exc)
                contexts.append(None)
        return contexts

    def call_finished(self, contexts: list[Any], error: BaseException | None) -> None:
        for (observer, _), finished, context in zip(self._started, self._finished, contexts,
                                                    strict=True):
            if finished is None:
                continue
            try:
                finished(context, error)
            except Exception as exc:
                self._complain(observer, exc)

    def server_state_changed(self, view: Any, old: str, new: str) -> None:
        for changed in self._state:
            try:
                changed(view, old, new)
            except Exception as exc:
                self._complain(changed, exc)

    def _complain(self, observer: object, exc: Exception) -> None:
        if id(observer) not in self._warned:
            self._warned.add(id(observer))
            log.warning("observer %r failed (further failures are not logged): %s: %s",
                        observer, type(exc).__name__, exc)
