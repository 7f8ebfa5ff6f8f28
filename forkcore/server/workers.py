"""A pool of reusable worker tasks that run the catalog's jobs.

Starting an anyio task costs tens of microseconds, more than the rest of a call; a busy
server would pay it for nearly every call (an idle activation needs a task to run its
mailbox). Workers instead wait on a queue and run job after job. The pool grows when a
job arrives and no worker is free; `trim()` (called by the server's periodic collection)
sends the idle workers beyond `keep` away, so waiting for a job costs no timeout scope.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

log = logging.getLogger("forkcore.server.workers")

Job = tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]


class WorkerPool:
    def __init__(self, task_group: anyio.abc.TaskGroup, *, keep: int = 4) -> None:
        self._tg = task_group
        self._send, self._receive = anyio.create_memory_object_stream[Job | None](1_000_000)
        self.keep = keep
        self.workers = 0

    def submit(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run `fn(*args)` on a free worker (starting one if none is free). `fn` must
        handle its own exceptions."""
        if self._send.statistics().tasks_waiting_receive == 0:
            self.workers += 1
            self._tg.start_soon(self._work)
        self._send.send_nowait((fn, args))

    def trim(self) -> int:
        """Let idle workers beyond `keep` leave; how many were asked to."""
        surplus = min(self._send.statistics().tasks_waiting_receive, self.workers - self.keep)
        for _ in range(max(surplus, 0)):
            self._send.send_nowait(None)
        return max(surplus, 0)

    async def _work(self) -> None:
        try:
            while True:
                job = await self._receive.receive()
                if job is None:
                    return
                fn, args = job
                try:
                    await fn(*args)
                except Exception:
                    log.exception("a server job failed: %r", fn)
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return
        finally:
            self.workers -= 1

    def close(self) -> None:
        self._send.close()
