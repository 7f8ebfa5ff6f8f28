"""Affinity policy `sticky`: a grain stays on the server it ran on.

`routed()` (called by the client after each call is routed) remembers the server of each
grain; `affinity()` then prefers that server for the grain's later calls for as long as
it is among the candidates (connected, healthy, serving the interface), even when other
servers join and the strategy alone would send the grain elsewhere. When the server is
gone the preference lapses, the strategy picks a new server, and `routed()` remembers
that one: the grain does not move back when the old server returns. Memory is bounded
by option `max_grains` (least recently routed grains are forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from forkcore import Affinity, AffinityMode, GrainId, ServerView

from ._listcache import ListCache
from ._options import check_int


class Sticky:
    """Keep each grain on the server it last ran on while that server is a candidate.

    Options: `max_grains` (default 100000): how many grains to remember (LRU)."""

    def __init__(self, *, max_grains: int = 100_000) -> None:
        self.max_grains = check_int("sticky", "max_grains", max_grains, minimum=1)
        self._grains: OrderedDict[GrainId, str] = OrderedDict()
        self._ids: ListCache[frozenset[str]] = ListCache(
            lambda servers: frozenset(s.id for s in servers))
        self._for: Sequence[Any] | None = None
        self._present: frozenset[str] = frozenset()
        self._affinities: dict[str, Affinity] = {}

    def __len__(self) -> int:
        return len(self._grains)

    def affinity(self, grain_id: GrainId, servers: Sequence[ServerView]) -> Affinity | None:
        server_id = self._grains.get(grain_id)
        if server_id is None:
            return None
        if servers is not self._for:
            self._present = self._ids.get(grain_id.interface, servers)
            self._for = servers
        if server_id not in self._present:
            return None
        found = self._affinities.get(server_id)
        if found is None:
            if len(self._affinities) > 4096:
                self._affinities.clear()
            found = self._affinities[server_id] = Affinity(server_id, AffinityMode.PREFERRED)
        return found

    def routed(self, grain_id: GrainId, server_id: str) -> None:
        grains = self._grains
        if grain_id in grains:
            grains.move_to_end(grain_id)
            grains[grain_id] = server_id
            return
        grains[grain_id] = server_id
        if len(grains) > self.max_grains:
            grains.popitem(last=False)

    def forget(self, grain_id: GrainId) -> None:
        """Drop what is remembered of one grain."""
        self._grains.pop(grain_id, None)
