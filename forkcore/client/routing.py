"""Routing, as a function: which server one call goes to.

The stages are those ARCHITECTURE.md promises, in order: **candidates** (the pool's
servers that are connected, healthy and allowed to serve the interface, after conflict
resolution) → **affinity** (the reference's, or the policy's) → **strategy** (picks one
of the candidates). The connection within the server is the pool's choice (fewest calls
in flight). Nothing here does I/O or keeps state: the same inputs give the same server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import ForkcoreError, NoServerAvailable
from ..grains import Affinity, AffinityMode, GrainId
from ..interfaces import Strategy
from .pool import Pool, ServerState
from .views import ServerView

AffinityOf = Callable[[GrainId, Sequence[ServerView]], Affinity | None]


def route(pool: Pool, grain_id: GrainId, affinity: Affinity | None,
          policy: AffinityOf | None, strategy: Strategy, strategy_name: str) -> ServerState:
    """The server for a call to `grain_id`, or `NoServerAvailable` saying why none."""
    candidates = pool.candidates(grain_id.interface)
    if affinity is None and policy is not None and candidates:
        affinity = policy(grain_id, candidates)
    if affinity is not None:
        state = pool.states.get(affinity.server)
        if state is not None and any(v is state.view for v in candidates):
            return state
        if affinity.mode is AffinityMode.REQUIRED:
            raise pool.explain(grain_id.interface,
                               f" on required server {affinity.server!r} "
                               f"({'unknown' if state is None else state.view.state})")
    if not candidates:
        raise pool.explain(grain_id.interface)
    chosen = strategy.select(grain_id, candidates)
    state = pool.states.get(chosen)
    if state is None:
        raise ForkcoreError(f"strategy {strategy_name!r} chose {chosen!r}, which is not one "
                            "of the candidates: the strategy plugin is broken")
    return state


__all__ = ["AffinityOf", "NoServerAvailable", "route"]
