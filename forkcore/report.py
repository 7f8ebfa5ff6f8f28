"""Plain-text tables and progress bars shared by `forkcore status` and `forkcore demo`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def render_servers(views: Sequence[Any],
                   extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """One row per server view: id, endpoint, state, RTT, any `extra` columns (column
    name → server id → text), interfaces, last error."""
    extra = extra or {}
    rows = [["SERVER", "ENDPOINT", "STATE", "RTT", *extra, "INTERFACES", "LAST ERROR"]]
    for v in sorted(views, key=lambda v: v.id):
        rtt = "-" if v.rtt is None else f"{v.rtt * 1000:.1f} ms"
        interfaces = ", ".join(f"{i.name} v{i.version}" for i in v.versions.values()) or "-"
        error = v.last_error if v.last_error and not v.healthy else "-"
        rows.append([v.id, v.endpoint, v.state, rtt,
                     *(column.get(v.id, "-") for column in extra.values()), interfaces, error])
    return table(rows)


def routing_shares(route: Callable[[str, Any], str], interfaces: Sequence[str],
                   samples: int = 1000) -> dict[str, str]:
    """Where `samples` keys of each interface would go now, as a share per server."""
    counts: dict[str, int] = {}
    total = 0
    for interface in interfaces:
        for key in range(samples):
            try:
                server = route(interface, key)
            except Exception:
                continue
            counts[server] = counts.get(server, 0) + 1
            total += 1
    return {sid: f"{100 * n / total:.0f}%" for sid, n in counts.items()} if total else {}


class Progress:
    """A one-line progress bar on a terminal; a single summary line otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.live:
            filled = int(30 * self.done / self.total)
            self.stream.write(f"\r   {self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                              f"{self.done}/{self.total}")
            self.stream.flush()

    def finish(self, summary: str = "") -> None:
        if self.live:
            self.stream.write("\r" + " " * (len(self.label) + 50) + "\r")
        self.stream.write(f"   {self.label}: {self.done}/{self.total}{summary}\n")
        self.stream.flush()
