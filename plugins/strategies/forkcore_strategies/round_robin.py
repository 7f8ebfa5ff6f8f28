"""Strategy `round_robin`: each call goes to the next server of the list.

Every strategy instance (so every client) starts at a random offset, so many clients
started together do not all send their first call to the same server. Over k·N calls to
an unchanged list of N servers each server gets exactly k calls (so any run of calls is
fair to ±1 per server). The counter keeps running when the list changes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from forkcore import GrainId, ServerView

from ._options import check_seed


class RoundRobin:
    """Each call goes to the next server; a random starting point per client.

    Options: `seed` (int or str) fixes the starting point, for tests."""

    __slots__ = ("_next",)

    def __init__(self, *, seed: int | str | None = None) -> None:
        seed = check_seed("round_robin", seed)
        self._next = random.Random(seed).randrange(1 << 30)

    def select(self, grain_id: GrainId, servers: Sequence[ServerView]) -> str:
        i = self._next
        self._next = i + 1
        return servers[i % len(servers)].id
