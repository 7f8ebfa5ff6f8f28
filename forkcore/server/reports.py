"""What the server says about its grains' failures, without flooding its log.

A grain that raises gets its caller a `RemoteError`; the server logs the exception with
its traceback at WARNING, so the bug leaves a trace where the operator looks. A busy
broken method would log thousands of times a second, so each (interface, method) logs
at most once per `interval` seconds, and the next line it logs says how many it held
back. Timeouts and results that cannot be encoded are logged the same way;
cancellations by the caller (it gave up) at INFO.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from ..clock import now as clock

log = logging.getLogger("forkcore.server.grains")

INTERVAL = 10.0  # seconds between two reports about one method


def traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class Reports:
    """Rate-limited reports per (interface, method)."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._last: dict[tuple[str, str, str], float] = {}
        self._held: dict[tuple[str, str, str], int] = {}

    def _due(self, what: str, interface: str, method: str) -> str | None:
        """None if this report is held back; else the note on what was held before."""
        key = (what, interface, method)
        now = clock()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) > 10_000:  # bounded, whatever the clients call
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        held = self._held.pop(key, 0)
        return f" ({held} more since the last report, not shown)" if held else ""

    def raised(self, grain_id: Any, method: str, exc: BaseException, one_way: bool) -> None:
        note = self._due("raised", grain_id.interface, method)
        if note is not None:
            kind = "one-way call" if one_way else "call"
            # the traceback in the message, not as exc_info: a grain's exception is the
            # grain's, and log filters that flag our own errors by exc_info stay quiet
            log.warning("%s %s.%s raised %s: %s%s\n%s", kind, grain_id, method,
                        type(exc).__name__, exc, note, traceback_text(exc).rstrip())

    def timed_out(self, grain_id: Any, method: str, why: str) -> None:
        note = self._due("timeout", grain_id.interface, method)
        if note is not None:
            log.warning("call %s.%s timed out: %s%s", grain_id, method, why, note)

    def cancelled(self, grain_id: Any, method: str) -> None:
        note = self._due("cancelled", grain_id.interface, method)
        if note is not None:
            log.info("call %s.%s was cancelled by its caller while it ran%s", grain_id,
                     method, note)

    def unencodable(self, interface: str, method: str, exc: BaseException) -> None:
        note = self._due("unencodable", interface, method)
        if note is not None:
            log.warning("the result of %s.%s cannot cross the wire, so its caller gets a "
                        "RemoteError: %s%s", interface, method, exc, note)


__all__ = ["Reports", "traceback_text"]
