"""Strategy `least_loaded`: the power of two choices on calls in flight.

Two distinct servers are drawn at random and the call goes to the one with fewer calls in
flight (`ServerView.in_flight`, kept live by the client). Comparing two random servers
instead of scanning for the minimum costs O(1) per call, and avoids the herd behaviour of
every client sending to the same least-loaded server at once (Mitzenmacher; gRPC A48
`least_request`, Finagle's P2C): the maximum load is exponentially better than random and
the fast path stays a few operations long.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from forkcore import GrainId, ServerView

from ._options import check_seed


class LeastLoaded:
    """Power of two choices on `in_flight`.

    Options: `seed` (int or str) makes the random draws repeatable, for tests."""

    __slots__ = ("_random",)

    def __init__(self, *, seed: int | str | None = None) -> None:
        self._random = random.Random(check_seed("least_loaded", seed)).random

    def select(self, grain_id: GrainId, servers: Sequence[ServerView]) -> str:
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
        return b.id if b.in_flight < a.in_flight else a.id
