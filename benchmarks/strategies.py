"""Strategy micro-benchmark: `select()` cost per call for every registered strategy.

Each strategy (built with no options, as a configuration naming it would) picks a server
for 1,000 grain ids of one interface from one candidate list of N healthy servers, the
same list object every call (as the client's routing cache hands it over). The grain
ids' stable hashes are computed beforehand, as a grain reference keeps its id. Reported:
the median and the best of several passes, in µs per call, loop included.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from forkcore import GrainId, ServerView
from forkcore.plugins import registrations

INTERFACE = "bench.echo"
BUILT_IN_SOURCES = ("forkcore", "forkcore-strategies")


def servers(count: int) -> list[ServerView]:
    return [ServerView(id=f"server-{i:04d}", endpoint=f"127.0.{i // 250}.{i % 250 + 1}:7000",
                       zone=f"zone-{i % 3}", interfaces=frozenset({INTERFACE}), healthy=True,
                       state="healthy", rtt=0.0005 * (1 + i % 7), in_flight=i % 4)
            for i in range(count)]


def grain_ids(count: int = 1000) -> list[GrainId]:
    ids = [GrainId(INTERFACE, k) for k in range(count)]
    for g in ids:
        _ = g.stable_hash
    return ids


def measure(select: Any, views: list[ServerView], ids: list[GrainId], passes: int,
            pass_budget: float = 0.05) -> tuple[float, float]:
    """(median, best) µs per call over `passes` passes over `ids` (fewer ids per pass for
    a strategy so slow that a pass would take longer than `pass_budget` seconds)."""
    clock = time.perf_counter
    start = clock()
    for g in ids[:10]:
        select(g, views)
    estimate = (clock() - start) / 10
    if estimate * len(ids) > pass_budget:
        ids = ids[:max(20, int(pass_budget / estimate))]
    per_call = []
    for _ in range(passes):
        start = clock()
        for g in ids:
            select(g, views)
        per_call.append((clock() - start) / len(ids) * 1e6)
    return statistics.median(per_call), min(per_call)


def run(server_counts: list[int], passes: int) -> list[dict[str, Any]]:
    ids = grain_ids()
    lists = {n: servers(n) for n in server_counts}
    results: list[dict[str, Any]] = []
    for reg in registrations("strategy"):
        built_in = reg.source in BUILT_IN_SOURCES
        for n in server_counts:
            row: dict[str, Any] = {"strategy": reg.name, "source": reg.source,
                                   "built_in": built_in, "servers": n}
            try:
                strategy = reg.factory()
                median, best = measure(strategy.select, lists[n], ids, passes)
            except Exception as exc:  # a third-party strategy may need options
                row["error"] = f"{type(exc).__name__}: {exc}"
            else:
                row.update(median_us=median, best_us=best)
            results.append(row)
    return results
