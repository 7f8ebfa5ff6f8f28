"""Strategy `consistent_hash`: a grain always goes to the same server while the set of
servers is unchanged, and a change of that set moves as few grains as possible.

Why a ring with virtual nodes (see also README.md):

* **Exactly minimal disruption.** A server's points on the ring come from its id alone,
  so when one of N servers leaves only the keys it owned move (each to the next server
  clockwise), and when one joins only the keys it now owns move, all of them onto it.
  Maglev was ruled out because its table fill moves a few extra keys on every change
  (a small but non-zero disruption); jump hash because it can only remove the last
  bucket, not an arbitrary server.
* **Cheap on the call path.** A lookup is one `bisect` (in C) over the few ring points
  that an index on the top bits of the hash leaves, a few hundred nanoseconds. The ring
  is built once per candidate set (the client passes the same list object while the
  set is unchanged), shared between strategies, and derived from the previous ring
  when a server joins or leaves.
  Rendezvous hashing has the same minimal disruption and perfect balance, but needs a
  hash per server per call: O(N), about 20 µs for 100 servers in CPython even with an
  integer mix instead of BLAKE2b.
* **Balanced enough.** 512 points per server (option `vnodes`) keep the largest share
  of 10 servers around 1.07 times the mean, below 1.25 times with a wide margin.
* **The same everywhere.** Keys hash with `GrainId.stable_hash` (BLAKE2b of interface
  and key), points with BLAKE2b of the server id; the mapping does not depend on list
  order, `PYTHONHASHSEED`, the process or the machine.

Bounded loads (option `load_factor`, Mirrokni, Thorup and Zadimoghaddam, "Consistent
Hashing with Bounded Loads", 2018): with c = `load_factor` ≥ 1, no server may take a call
that would leave it with more than ceil(c * (total in flight + 1) / N) calls in flight;
such a server is passed over for the next distinct server clockwise. A key therefore
stays on its own server while that server is not overloaded, and the bound always
leaves at least one server with room.

Summing the in-flight counts of 100 servers costs about 4 µs in CPython, more than the
whole budget of a call, so the total is counted exactly only when the candidate list
changed or `recount_every` calls (16 by default) went by since the last count; in
between it is estimated as the last count plus the calls routed since. An owner with no
call in flight is always within the bound and costs nothing. The estimate is exact when
every call goes through the strategy and none completes between counts. Calls that
complete in between make it high, loosening the bound by at most ceil(c * completed / N)
until the next count; calls routed around the strategy (by affinity) make it low, so a
server is passed over a little early. With `recount_every = 1` the bound is exact.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from forkcore import GrainId, ServerView

from ._listcache import ListCache
from ._options import check_int, check_number
from .ring import DEFAULT_VNODES, MAX_VNODES, HashRing, ring_for


class _Load:
    """The running estimate of the calls in flight on one set of servers: the last exact
    count and the calls routed since. Shared by every candidate list with that set."""

    __slots__ = ("base", "since")

    def __init__(self) -> None:
        self.base = 0
        self.since = 1 << 62  # not counted yet


# What select() needs from one candidate list, in one tuple so that switching between
# the lists of different interfaces is a single assignment:
# (list, ring points, ring owners, index table, index shift, views by id, load estimate)
_State = tuple[Sequence[Any], list[int], list[str], list[int], int, dict[str, ServerView],
               _Load]


class ConsistentHash:
    """Consistent hashing on a ring of virtual nodes placed by server id.

    Options: `vnodes` (points per server, default 512; more is better balanced, slower to
    build); `load_factor` (c ≥ 1: bounded loads, a server takes a call only while its
    calls in flight stay within ceil(c * average); unset by default); `recount_every`
    (default 16: with bounded loads, how many calls may use the running estimate of the
    total in flight before it is counted again; 1 counts on every call)."""

    def __init__(self, *, vnodes: int = DEFAULT_VNODES, load_factor: float | None = None,
                 recount_every: int = 16) -> None:
        self.vnodes = check_int("consistent_hash", "vnodes", vnodes, minimum=1,
                                maximum=MAX_VNODES)
        self.load_factor = None if load_factor is None else check_number(
            "consistent_hash", "load_factor", load_factor, minimum=1.0)
        self.recount_every = check_int("consistent_hash", "recount_every", recount_every,
                                       minimum=1)
        self._loads: dict[HashRing, _Load] = {}
        self._cache: ListCache[_State] = ListCache(self._place)
        self._state: _State = ([], [], [], [], 64, {}, _Load())  # matches no list

    def _place(self, servers: Sequence[ServerView]) -> _State:
        ring = ring_for([s.id for s in servers], self.vnodes)
        load = self._loads.get(ring)
        if load is None:
            if len(self._loads) >= 64:
                self._loads.clear()
            load = self._loads[ring] = _Load()
        return (servers, ring.points, ring.owners, ring.table, ring.shift,
                {s.id: s for s in servers}, load)

    def select(self, grain_id: GrainId, servers: Sequence[ServerView]) -> str:
        state = self._state
        if state[0] is not servers:
            state = self._state = self._cache.get(grain_id.interface, servers)
        _, points, owners, table, shift, by_id, estimate = state
        h = grain_id.stable_hash
        b = h >> shift
        at = bisect_right(points, h, table[b], table[b + 1])
        owner = owners[at]
        c = self.load_factor
        if c is None:
            return owner
        # Bounded loads: the owner takes the call if its load stays within
        # ceil(c * (total + 1) / n), that is (loads being integers) if
        # load < c * (total + 1) / n.
        load = by_id[owner].in_flight
        since = estimate.since
        estimate.since = since + 1
        if load <= 0:
            return owner  # the capacity is at least 1
        if since < self.recount_every:
            total = estimate.base + since
        else:  # count exactly; this call is the first since
            total = estimate.base = sum([s.in_flight for s in servers])
            estimate.since = 1
        room = c * (total + 1)
        if load * len(servers) < room:
            return owner
        return self._spill(owners, by_id, at, room / len(servers))

    @staticmethod
    def _spill(owners: list[str], by_id: dict[str, ServerView], at: int, limit: float
               ) -> str:
        """The next server clockwise from ring position `at` whose load is below `limit`.
        A server met again (another of its points) fails the same test again, so no set
        of visited servers is needed."""
        size = len(owners) - 1
        for step in range(at + 1, at + size):
            server_id = owners[step % size]
            if by_id[server_id].in_flight < limit:
                return server_id
        return owners[at]  # not reached: the loads sum to less than N * capacity
