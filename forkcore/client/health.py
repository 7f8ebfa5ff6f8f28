"""Health of servers as a client sees it: RTT, heartbeats, outlier ejection, retry budget.

- RTT is a peak-sensitive moving average (Finagle's peak EWMA): a slower sample is
  taken at once, faster ones pull the average down over `RTT_DECAY` seconds, so a
  server that just got slow stops looking fast immediately.
- A connection that has heard nothing for `unhealthy_after` heartbeats is unresponsive
  (a frozen process with an open socket); it is healthy again as soon as it answers.
  Any bytes from the server count, not only whole messages: a Pong queued behind a large
  answer on an ordered stream cannot arrive before it, but the answer's bytes do.
- Consecutive call failures eject a server for a growing, capped interval (gRPC A50
  outlier detection), never ejecting more than a bounded share of servers.
- A token bucket bounds retries (gRPC A6's retry throttling) so failures never turn into
  a retry storm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import anyio

from ..clock import now as clock
from ..config import HealthOptions
from ..errors import ConnectError


class Watched(Protocol):
    """What the heartbeat watches: a client connection (no import: no cycle)."""

    endpoint: str
    closed: bool
    responsive: bool

    def heard_at(self) -> float: ...

    @property
    def server_id(self) -> str: ...
    def ping(self) -> None: ...
    def set_responsive(self, responsive: bool) -> None: ...


class Ejectable(Protocol):
    """What outlier detection counts on: the pool's state of one server."""

    failures: int
    ejections: int
    ejected_until: float

    @property
    def server_id(self) -> str: ...


E = TypeVar("E", bound=Ejectable)

log = logging.getLogger("forkcore.client.health")

RTT_DECAY = 2.0  # seconds for a faster RTT sample to pull the average down by 1/e


def peak_ewma(current: float | None, sample: float, elapsed: float) -> float:
    """The next RTT estimate: a higher sample wins at once, a lower one decays in."""
    if current is None or sample >= current:
        return sample
    weight = math.exp(-max(elapsed, 0.0) / RTT_DECAY)
    return current * weight + sample * (1 - weight)


async def heartbeat(conn: Watched, options: HealthOptions,
                    on_unresponsive: Callable[[], None] | None = None) -> None:
    """Ping every `heartbeat_interval`; mark the connection unresponsive once it has been
    silent (no bytes at all) for `unhealthy_after` intervals, responsive again when it
    speaks."""
    interval = options.heartbeat_interval
    limit = options.unhealthy_after * interval
    tick = min(interval / 4, 0.25)
    next_ping = clock()  # the connection's clock (ClientConnection.heard_at)
    while not conn.closed:
        now = clock()
        if now >= next_ping:
            try:
                conn.ping()
            except ConnectError:
                return
            next_ping = now + interval
        silent = now - conn.heard_at()
        responsive = silent < limit
        if responsive != conn.responsive:
            conn.set_responsive(responsive)
            if not responsive:
                log.warning("server %s at %s has not answered for %.1fs (%d heartbeats)",
                            conn.server_id, conn.endpoint, silent, options.unhealthy_after)
                if on_unresponsive is not None:
                    on_unresponsive()
        await anyio.sleep(tick)


class Ejector(Generic[E]):
    """Outlier detection: eject a server after `eject_after` consecutive call failures
    for `ejection_time` * (times ejected), at most `max_ejection_time`, while no more
    than `max_ejected_share` of the servers are ejected."""

    def __init__(self, options: HealthOptions, schedule: Callable[[E, float], None]):
        self.options = options
        self._schedule = schedule

    def success(self, state: E) -> None:
        state.failures = 0

    def failure(self, state: E, total_servers: int, ejected_now: int) -> bool:
        """Count one failed call; True if the server was ejected by it."""
        state.failures += 1
        opts = self.options
        if state.failures < opts.eject_after or state.ejected_until > clock():
            return False
        if (ejected_now + 1) > max(1, math.floor(opts.max_ejected_share * total_servers)):
            return False
        state.ejections += 1
        duration = min(opts.ejection_time * state.ejections, opts.max_ejection_time)
        state.ejected_until = clock() + duration
        state.failures = 0
        log.warning("server %s ejected for %.1fs after %d consecutive failed calls",
                    state.server_id, duration, opts.eject_after)
        self._schedule(state, duration)
        return True


class RetryBudget:
    """A token bucket: each retry takes a token, each success returns a fraction of one."""

    def __init__(self, capacity: float = 50.0, refill_per_success: float = 0.2) -> None:
        self.capacity = capacity
        self.refill = refill_per_success
        self.tokens = capacity

    def success(self) -> None:
        if self.tokens < self.capacity:
            self.tokens = min(self.capacity, self.tokens + self.refill)

    def take(self) -> bool:
        if self.tokens >= 1.0 - 1e-9:  # five successes of 0.2 make one token, float or not
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False
