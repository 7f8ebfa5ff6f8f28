"""Strategy `grain_type_affinity`: every grain of one interface on one server.

The server of an interface is the one named for it in option `mapping` (interface wire
name → server id), else the owner of the interface name's stable hash on the consistent
hash ring of the candidates (see `consistent_hash`). When the mapped server is not a
candidate (down, unhealthy, or not serving the interface), the interface falls back to
its place on the ring of the candidates; when the ring's choice leaves, the interface
moves to the next server clockwise, and only interfaces of the server that left move.
The choice is computed once per interface and candidate list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from forkcore import GrainId, ServerView

from ._listcache import ListCache
from ._options import check_int, check_str_mapping
from .ring import DEFAULT_VNODES, MAX_VNODES, name_hash, ring_for


class _Placement:
    __slots__ = ("chosen", "ids", "servers", "vnodes")

    def __init__(self, servers: Sequence[ServerView], vnodes: int) -> None:
        self.servers = servers
        self.vnodes = vnodes
        self.ids = frozenset(s.id for s in servers)
        self.chosen: dict[str, str] = {}


class GrainTypeAffinity:
    """All grains of an interface on one server, by option `mapping` or by consistent hash
    of the interface name; falls back along the ring.

    Options: `mapping` (interface name → server id); `vnodes` (ring points per server)."""

    def __init__(self, *, mapping: Mapping[str, str] | None = None,
                 vnodes: int = DEFAULT_VNODES) -> None:
        self.mapping = {} if mapping is None else check_str_mapping(
            "grain_type_affinity", "mapping", mapping)
        self.vnodes = check_int("grain_type_affinity", "vnodes", vnodes, minimum=1,
                                maximum=MAX_VNODES)
        self._cache: ListCache[_Placement] = ListCache(
            lambda servers: _Placement(servers, self.vnodes))
        self._for: Sequence[Any] | None = None
        self._chosen: dict[str, str] = {}
        self._placement: _Placement | None = None

    def select(self, grain_id: GrainId, servers: Sequence[ServerView]) -> str:
        if servers is not self._for:
            placement = self._placement = self._cache.get(grain_id.interface, servers)
            self._chosen = placement.chosen
            self._for = servers
        chosen = self._chosen.get(grain_id.interface)
        if chosen is None:
            chosen = self._choose(grain_id.interface)
        return chosen

    def _choose(self, interface: str) -> str:
        placement = self._placement
        assert placement is not None
        server_id = self.mapping.get(interface)
        if server_id is None or server_id not in placement.ids:
            ring = ring_for(placement.ids, self.vnodes)
            server_id = ring.lookup(name_hash(interface))
        if len(placement.chosen) < 4096:  # bounded, whatever callers send
            placement.chosen[interface] = server_id
        return server_id
