"""Strategy `lowest_latency`: the power of two choices on peak-EWMA RTT * load.

Two distinct servers are drawn at random; each is scored `peak * (in_flight + 1)` and
the call goes to the lower score (Finagle's and Linkerd's P2C with peak EWMA):

* `peak` follows the server's smoothed RTT (`ServerView.rtt`, kept live by the client)
  with a *peak*-sensitive EWMA: a higher RTT is taken at once, a lower one only decays
  the estimate towards it with time constant `decay` seconds. A server that just got
  slow stops getting traffic at once; it earns it back gradually.
* `in_flight + 1` spreads load: a fast server stops winning once it has enough calls
  queued that a slower idle server would answer sooner.
* A server whose RTT is not measured yet (None) scores as the best RTT known among the
  candidates (or `default_rtt` if none is known), so a new server is tried at once.

Drawing two servers instead of scanning all keeps a call O(1) and keeps every client
from stampeding onto the same fastest server; the fastest server gets the most traffic
but not all of it: it wins every draw it is in, and with probability `explore` (1% by
default) the loser of the draw gets the call instead, so even with two servers and no
load the slower one keeps a trickle.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

from forkcore import GrainId, ServerView

from ._listcache import ListCache
from ._options import check_number, check_seed


class LowestLatency:
    """Power of two choices on peak-EWMA RTT * (in_flight + 1).

    Options: `seed` (int or str: repeatable draws); `decay` (seconds, default 10: how
    fast a peak is forgotten); `default_rtt` (seconds, default 0.001: the RTT assumed
    when no candidate has one); `explore` (0 to 0.5, default 0.01: probability that the
    loser of a draw gets the call)."""

    def __init__(self, *, seed: int | str | None = None, decay: float = 10.0,
                 default_rtt: float = 0.001, explore: float = 0.01) -> None:
        owner = "lowest_latency"
        self._random = random.Random(check_seed(owner, seed)).random
        self.decay = check_number(owner, "decay", decay, minimum=0.0, exclusive_minimum=True)
        self.default_rtt = check_number(owner, "default_rtt", default_rtt, minimum=0.0,
                                        exclusive_minimum=True)
        self.explore = check_number(owner, "explore", explore, minimum=0.0, maximum=0.5)
        self._peaks: dict[str, list[float]] = {}  # server id -> [peak EWMA, when]
        self._for: Sequence[Any] | None = None
        self._lists: ListCache[None] = ListCache(self._first_sight)
        self._best = self.default_rtt
        self.clock = time.monotonic

    def _first_sight(self, servers: Sequence[ServerView]) -> None:
        """A candidate list not seen before: start from the best RTT it knows of, and
        forget the peaks of servers that are gone."""
        known = [s.rtt for s in servers if s.rtt is not None]
        self._best = min(known) if known else self.default_rtt
        peaks = self._peaks
        if len(peaks) > 2 * len(servers) + 64:
            present = {s.id for s in servers}
            for server_id in [k for k in peaks if k not in present]:
                del peaks[server_id]

    def _score(self, view: ServerView, now: float) -> float:
        rtt = view.rtt
        if rtt is None:
            return self._best * (view.in_flight + 1)
        state = self._peaks.get(view.id)
        if state is None:
            self._peaks[view.id] = [rtt, now]
            peak = rtt
        else:
            peak = state[0]
            if rtt >= peak:
                peak = rtt
            else:
                peak = rtt + (peak - rtt) * math.exp((state[1] - now) / self.decay)
            state[0] = peak
            state[1] = now
        if peak < self._best:
            self._best = peak
        return peak * (view.in_flight + 1)

    def select(self, grain_id: GrainId, servers: Sequence[ServerView]) -> str:
        if servers is not self._for:
            self._lists.get(grain_id.interface, servers)
            self._for = servers
        n = len(servers)
        if n == 1:
            return servers[0].id
        r = self._random
        i = int(r() * n)
        j = int(r() * (n - 1))
        if j >= i:
            j += 1
        a = servers[i]
        b = servers[j]
        now = self.clock()
        if self._score(b, now) < self._score(a, now):
            a, b = b, a
        if self.explore and r() < self.explore:
            return b.id
        return a.id
