"""A user-space lossy UDP relay for tests: 127.0.0.1 only, seeded, bounded.

Clients send to `relay.endpoint`; each client address gets its own upstream socket to
the server, so the server sees one address per client, as without the relay. Every
datagram, in each direction, is dropped with probability `loss`, sent twice with
probability `duplicate`, and delayed by a uniform random `jitter` (so datagrams overtake
each other). Decisions come from one seeded `random.Random` per direction. With `rate`
(bytes per second, each direction) the relay is also a bottleneck link: datagrams leave
one after another at that rate, and one that would wait behind more than `queue` bytes
is dropped, as a router's full queue drops it.
"""

from __future__ import annotations

import heapq
import itertools
import random
import socket
from typing import Any

import anyio
import anyio.abc


class Direction:
    def __init__(self, seed: int, loss: float, duplicate: float, jitter: float,
                 rate: float | None = None, queue: int = 256 * 1024) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.jitter = jitter
        self.rate = rate
        self.queue = queue
        self.passed = self.dropped = self.duplicated = self.reordered = 0
        self._last_delivered = -1
        self._link_free_at = 0.0  # with `rate`: when the link has sent what it holds

    def plan(self, now: float, size: int = 0) -> list[float]:
        """When to deliver one datagram of `size` bytes (empty: drop it)."""
        rng = self.rng
        if self.rate is not None:
            start = max(now, self._link_free_at)
            if (start - now) * self.rate > self.queue:
                self.dropped += 1
                return []
            self._link_free_at = start + size / self.rate
            now = self._link_free_at
        if rng.random() < self.loss:
            self.dropped += 1
            return []
        times = [now + rng.uniform(0, self.jitter)]
        if rng.random() < self.duplicate:
            self.duplicated += 1
            times.append(now + rng.uniform(0, self.jitter))
        self.passed += 1
        return times

    def delivered(self, index: int) -> None:
        if index < self._last_delivered:
            self.reordered += 1
        self._last_delivered = max(self._last_delivered, index)


class LossyRelay:
    def __init__(self, upstream: str, *, seed: int = 1, loss: float = 0.1,
                 duplicate: float = 0.05, jitter: float = 0.004, rate: float | None = None,
                 queue: int = 256 * 1024) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.up = Direction(seed, loss, duplicate, jitter, rate, queue)
        self.down = Direction(seed + 1, loss, duplicate, jitter, rate, queue)
        self.blackhole = False  # drop everything, both ways
        self.endpoint = ""
        self._front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._front.setblocking(False)
        self._front.bind(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._front.getsockname()[1]}"
        self._back: dict[Any, socket.socket] = {}
        self._queue: list[tuple[float, int, int, Direction, socket.socket, bytes, Any]] = []
        self._order = itertools.count()
        self._index = itertools.count()
        self._wake = anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._read, self._front, None)
                tg.start_soon(self._deliver)
                task_status.started(self.endpoint)
        finally:
            for sock in [self._front, *self._back.values()]:
                anyio.notify_closing(sock)
                sock.close()

    async def _read(self, sock: socket.socket, client: Any) -> None:
        while True:
            await anyio.wait_readable(sock)
            while True:
                try:
                    data, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                if client is None:  # from a client, to the server
                    back = self._back.get(addr)
                    if back is None:
                        back = self._back[addr] = socket.socket(socket.AF_INET,
                                                                socket.SOCK_DGRAM)
                        back.setblocking(False)
                        back.bind(("127.0.0.1", 0))
                        self._tg.start_soon(self._read, back, addr)
                    self._schedule(self.up, back, data, self.upstream)
                else:  # from the server, back to `client`
                    self._schedule(self.down, self._front, data, client)

    def _schedule(self, direction: Direction, out: socket.socket, data: bytes,
                  to: Any) -> None:
        if self.blackhole:
            direction.dropped += 1
            return
        index = next(self._index)
        for when in direction.plan(anyio.current_time(), len(data)):
            heapq.heappush(self._queue, (when, next(self._order), index, direction, out, data,
                                         to))
        self._wake.set()

    async def _deliver(self) -> None:
        queue = self._queue
        while True:
            now = anyio.current_time()
            while queue and queue[0][0] <= now:
                _, _, index, direction, out, data, to = heapq.heappop(queue)
                direction.delivered(index)
                try:
                    out.sendto(data, to)
                except OSError:
                    pass
            self._wake = anyio.Event()
            with anyio.move_on_after(queue[0][0] - now if queue else 1.0):
                await self._wake.wait()
