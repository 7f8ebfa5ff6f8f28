"""Affinity policy `zone`: prefer servers in the grain's zone.

The grain's zone comes from option `zone_of` (a callable `grain_id -> zone or None`, for
Python users), else from option `zones` (grain key → zone; keys written in TOML are
strings, so a key is looked up as itself and then as `str(key)`), else from option
`default_zone`. Among the candidates whose `ServerView.zone` is that zone, the grain goes
to the owner of its stable hash on a consistent hash ring of those servers, so the choice
is the same on every call and in every process and moves as little as possible when the
zone's servers change. The preference is `PREFERRED`: with no server of the zone among
the candidates the policy returns None and the strategy chooses among all of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from forkcore import Affinity, AffinityMode, GrainId, ServerView
from forkcore.errors import ConfigError

from ._listcache import ListCache
from ._options import check_int, check_str, check_str_mapping
from .ring import DEFAULT_VNODES, MAX_VNODES, HashRing, ring_for


class _Zones:
    """The candidates of one list, by zone; rings built on first use."""

    __slots__ = ("members", "rings")

    def __init__(self, servers: Sequence[ServerView]) -> None:
        members: dict[str, list[str]] = {}
        for s in servers:
            if s.zone is not None:
                members.setdefault(s.zone, []).append(s.id)
        self.members = members
        self.rings: dict[str, HashRing] = {}


class Zone:
    """Prefer the servers of the grain's zone; among them, a stable consistent-hash choice.

    Options (one of the first three is required): `zones` (grain key → zone),
    `zone_of` (callable grain_id → zone or None), `default_zone` (zone of every other
    grain); `vnodes` (ring points per server)."""

    def __init__(self, *, zones: Mapping[Any, str] | None = None,
                 zone_of: Callable[[GrainId], str | None] | None = None,
                 default_zone: str | None = None, vnodes: int = DEFAULT_VNODES) -> None:
        if zones is None and zone_of is None and default_zone is None:
            raise ConfigError("affinity policy 'zone' needs option 'zones' (grain key -> "
                              "zone), 'zone_of' (a callable) or 'default_zone'")
        self.zones: dict[Any, str] = {} if zones is None else check_str_mapping(
            "zone", "zones", zones, key_types=(str, int, bytes, uuid.UUID))
        if zone_of is not None and not callable(zone_of):
            raise ConfigError(f"zone: option 'zone_of' must be a callable taking a GrainId, "
                              f"not {zone_of!r}")
        self.zone_of = zone_of
        self.default_zone = None if default_zone is None else check_str(
            "zone", "default_zone", default_zone)
        self.vnodes = check_int("zone", "vnodes", vnodes, minimum=1, maximum=MAX_VNODES)
        self._by_list: ListCache[_Zones] = ListCache(_Zones)
        self._for: Sequence[Any] | None = None
        self._zones: _Zones | None = None
        self._affinities: dict[str, Affinity] = {}

    def zone_for(self, grain_id: GrainId) -> str | None:
        """The zone of a grain, or None if it has none."""
        if self.zone_of is not None:
            zone = self.zone_of(grain_id)
            if zone is not None:
                return zone
        zones = self.zones
        if zones:
            key = grain_id.key
            zone = zones.get(key)
            if zone is None and not isinstance(key, str):
                zone = zones.get(str(key))
            if zone is not None:
                return zone
        return self.default_zone

    def affinity(self, grain_id: GrainId, servers: Sequence[ServerView]) -> Affinity | None:
        zone = self.zone_for(grain_id)
        if zone is None:
            return None
        if servers is not self._for:
            self._zones = self._by_list.get(grain_id.interface, servers)
            self._for = servers
        by_zone = self._zones
        assert by_zone is not None
        ring = by_zone.rings.get(zone)
        if ring is None:
            members = by_zone.members.get(zone)
            if not members:
                return None
            ring = by_zone.rings[zone] = ring_for(members, self.vnodes)
        server_id = ring.lookup(grain_id.stable_hash)
        found = self._affinities.get(server_id)
        if found is None:
            if len(self._affinities) > 4096:
                self._affinities.clear()
            found = self._affinities[server_id] = Affinity(server_id, AffinityMode.PREFERRED)
        return found
