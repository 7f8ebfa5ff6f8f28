"""A consistent-hash ring with virtual nodes placed by server id (Karger et al.).

Each server owns `vnodes` points on a 64-bit ring. The points are derived from the
server's *id* alone (BLAKE2b, the same in every process and on every machine), never
from its address, from the order of the server list or from Python's `hash()`. A key
(a 64-bit stable hash) belongs to the first point clockwise from it.

Because a server's points depend on nothing but its id, removing a server removes only
its points (only its keys move, each to the next point clockwise) and adding one adds
only its points (keys move only onto it): the disruption is exactly minimal. Balance
comes from the number of points per server: the largest of 10 servers' shares is about
1 + 1.5/sqrt(vnodes) of the mean, so the default of 512 keeps it near 1.07 and below
1.2 for practically every set of ids.

Rings are immutable once built and shared, through a small cache keyed on the sorted
ids, by every strategy and policy of the process that asks for the same set of servers.
A ring for a new set is derived from a cached ring of a similar set (drop the points of
the servers that left, merge in those of the servers that joined) rather than rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterable
from itertools import compress

from forkcore.grains import stable_hash

DEFAULT_VNODES = 512
MAX_VNODES = 65536
_DOMAIN = b"forkcore-ring\0"
_UNPACK8 = struct.Struct(">8Q").unpack


@functools.lru_cache(maxsize=1024)
def vnode_points(server_id: str, vnodes: int) -> tuple[int, ...]:
    """The ring points of one server: `vnodes` 64-bit values from BLAKE2b of its id.

    One 64-byte digest gives eight points, so a server's 512 points cost 64 digests.
    The points for `vnodes` are a prefix of those for any larger count."""
    prefix = _DOMAIN + server_id.encode("utf-8", "surrogatepass") + b"\0"
    points: list[int] = []
    for block in range((vnodes + 7) // 8):
        digest = hashlib.blake2b(prefix + block.to_bytes(4, "big"), digest_size=64).digest()
        points.extend(_UNPACK8(digest))
    return tuple(points[:vnodes])


@functools.lru_cache(maxsize=4096)
def name_hash(name: str) -> int:
    """The stable 64-bit hash of a name (an interface's wire name, a zone)."""
    return stable_hash(name.encode("utf-8", "surrogatepass"))


class HashRing:
    """An immutable ring over a set of server ids.

    `owners[bisect_right(points, h)]` is the owner of hash `h` (`lookup()`, which narrows
    the bisection with an index on the top bits of `h`): `owners` has one more entry
    than `points` (a copy of the first owner), which wraps the ring around without a
    branch on the fast path. Equal points (a 2**-64 chance) are ordered by server id,
    never by list order, however the ring was built.
    """

    __slots__ = ("ids", "owners", "points", "shift", "table", "vnodes")

    ids: tuple[str, ...]
    owners: list[str]
    points: list[int]
    shift: int
    table: list[int]
    vnodes: int

    def __init__(self, server_ids: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        ids = tuple(sorted(set(server_ids)))
        if not ids:
            raise ValueError("a hash ring needs at least one server id")
        # Sort (point, index into sorted ids) packed in one int: the sort runs in C.
        bits = max(1, (len(ids) - 1).bit_length())
        mask = (1 << bits) - 1
        packed: list[int] = []
        for index, server_id in enumerate(ids):
            packed.extend([(p << bits) | index for p in vnode_points(server_id, vnodes)])
        packed.sort()
        owners = [ids[p & mask] for p in packed]
        self._set(ids, vnodes, [p >> bits for p in packed], owners)

    def _set(self, ids: tuple[str, ...], vnodes: int, points: list[int],
             owners: list[str]) -> None:
        owners.append(owners[0])
        self.ids = ids
        self.vnodes = vnodes
        self.points = points
        self.owners = owners
        # An index on the top bits of the hash: the points in [b << shift, (b+1) << shift)
        # are points[table[b]:table[b + 1]], about 16 of them, so a lookup bisects a few
        # neighbouring entries instead of the whole ring (whose probes would each miss
        # the CPU cache on a large ring).
        bits = max(1, (len(points) // 16).bit_length())
        shift = 64 - bits
        table = [bisect_left(points, b << shift) for b in range(1 << bits)]
        table.append(len(points))
        self.shift = shift
        self.table = table

    def derive(self, server_ids: Iterable[str]) -> HashRing:
        """The ring over `server_ids`, made from this one by dropping the points of the
        servers that left and merging in those of the servers that joined: a few passes
        over the ring plus O(vnodes) per joining server, instead of a sort."""
        ids = tuple(sorted(set(server_ids)))
        if not ids:
            raise ValueError("a hash ring needs at least one server id")
        removed = set(self.ids).difference(ids)
        added = sorted(set(ids).difference(self.ids))
        points = self.points
        owners = self.owners[:-1]
        if removed:
            keep = [o not in removed for o in owners]
            points = list(compress(points, keep))
            owners = list(compress(owners, keep))
        if added:
            joining = sorted((p, sid) for sid in added for p in vnode_points(sid, self.vnodes))
            merged_points: list[int] = []
            merged_owners: list[str] = []
            size = len(points)
            prev = 0
            for point, server_id in joining:
                pos = bisect_left(points, point, prev)
                while pos < size and points[pos] == point and owners[pos] < server_id:
                    pos += 1
                merged_points += points[prev:pos]
                merged_owners += owners[prev:pos]
                merged_points.append(point)
                merged_owners.append(server_id)
                prev = pos
            merged_points += points[prev:]
            merged_owners += owners[prev:]
            points, owners = merged_points, merged_owners
        elif points is self.points:
            points = list(points)
        ring = HashRing.__new__(HashRing)
        ring._set(ids, self.vnodes, points, owners)
        return ring

    def lookup(self, h: int) -> str:
        """The server id owning hash `h`."""
        table = self.table
        b = h >> self.shift
        return self.owners[bisect_right(self.points, h, table[b], table[b + 1])]


_RING_CACHE_SIZE = 8
_rings: OrderedDict[tuple[tuple[str, ...], int], HashRing] = OrderedDict()
_rings_lock = threading.Lock()


def ring_for(server_ids: Iterable[str], vnodes: int = DEFAULT_VNODES) -> HashRing:
    """The ring over these server ids, shared through a small process-wide cache.

    A ring not in the cache is derived from the cached ring closest to it (the usual
    case: one server joined or left) when that is cheaper than building it anew."""
    ids = tuple(sorted(set(server_ids)))
    key = (ids, vnodes)
    with _rings_lock:
        ring = _rings.get(key)
        if ring is not None:
            _rings.move_to_end(key)
            return ring
        candidates = list(_rings.values())
    target = set(ids)
    best: HashRing | None = None
    best_cost = len(ids) // 2 + 1  # joining servers a derivation may merge in
    for cached in reversed(candidates):
        if cached.vnodes != vnodes:
            continue
        joining = len(target.difference(cached.ids))
        if joining < best_cost and len(cached.ids) < 2 * len(ids) + 8:
            best, best_cost = cached, joining
    ring = best.derive(ids) if best is not None else HashRing(ids, vnodes)
    with _rings_lock:
        _rings[key] = ring
        while len(_rings) > _RING_CACHE_SIZE:
            _rings.popitem(last=False)
    return ring
