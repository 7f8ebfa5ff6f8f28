"""A pool of reusable worker tasks that run the catalog's jobs.

Starting an anyio task costs tens of microseconds, more than the rest of a call; a busy
server would pay it for nearly every call (an idle activation needs a task to run its
mailbox). Workers instead take jobs from a queue and run job after job; an idle worker
waits on an event of its own. The pool grows when a job arrives and no worker is idle;
`trim()` (called by the server's periodic collection) sends the idle workers beyond
`keep` away, so waiting for a job costs no timeout scope.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

log = logging.getLogger("forkcore.server.workers")

Job = tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]


class _Idle:
    """An idle worker's wake-up call, and whether it is asked to leave."""

    __slots__ = ("event", "leave")

    def __init__(self, event: anyio.Event) -> None:
        self.event = event
        self.leave = False


class WorkerPool:
    def __init__(self, task_group: anyio.abc.TaskGroup, *, keep: int = 4) -> None:
        self._tg = task_group
        self._jobs: deque[Job] = deque()
        self._idle: list[_Idle] = []
        self._closed = False
        # the backend's Event class, made directly (anyio.Event() looks the backend up)
        self._new_event: Callable[[], anyio.Event] = type(anyio.Event())
        self.keep = keep
        self.workers = 0

    def submit(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run `fn(*args)` on an idle worker (starting one if none is idle). `fn` must
        handle its own exceptions."""
        self._jobs.append((fn, args))
        if self._idle:
            self._idle.pop().event.set()
        else:
            self.workers += 1
            self._tg.start_soon(self._work)

    def trim(self) -> int:
        """Let idle workers beyond `keep` leave; how many were asked to."""
        surplus = max(0, min(len(self._idle), self.workers - self.keep))
        for _ in range(surplus):
            idle = self._idle.pop(0)  # the longest idle
            idle.leave = True
            idle.event.set()
        return surplus

    async def _work(self) -> None:
        jobs = self._jobs
        try:
            while not self._closed:
                while jobs:
                    fn, args = jobs.popleft()
                    try:
                        await fn(*args)
                    except Exception:
                        log.exception("a server job failed: %r", fn)
                idle = _Idle(self._new_event())
                self._idle.append(idle)
                await idle.event.wait()
                if idle.leave:
                    return
        finally:
            self.workers -= 1

    def close(self) -> None:
        self._closed = True
        for idle in self._idle:
            idle.leave = True
            idle.event.set()
        self._idle.clear()
