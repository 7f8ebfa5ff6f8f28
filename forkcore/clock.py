"""The one clock of the runtime: `time.monotonic()`.

Every deadline, RTT sample, ejection, refusal and idle time in forkcore is a value of
this clock, so times taken in different modules compare. It is the monotonic clock
rather than anyio's (`anyio.current_time()`) because a call reads it on its hot path
and anyio's costs about ten times more; both run at the same rate, so nothing here
mixes them. The sans-IO protocol code never reads it: the I/O layer passes `now` in.
"""

from __future__ import annotations

from time import monotonic

now = monotonic

__all__ = ["now"]
