"""Memory scenarios, the client side (the servers are `benchmarks.forkcore_echo server`).

    python -m benchmarks.memory connections --endpoint E0,E1,...,EN [--trace]
        client memory per idle server connection: a multi-mode client connected to E0,
        then to N more servers with add_server(); the difference over N
    python -m benchmarks.memory activations --endpoint E --count N
        server memory per idle activation: the server's own readings (bench.control)
        before and after N empty grains are called once each, less the memory of N such
        grains made without the runtime (their own state); over N

`traced` is the Python heap as tracemalloc sees it (process started with --trace, the
figure the targets use); `rss` is the resident set size, measured in runs without
tracemalloc (its bookkeeping would inflate it), and noisier.
"""

from __future__ import annotations

import argparse
import json
import sys
import tracemalloc
from typing import Any

import anyio

import forkcore

from .forkcore_echo import IControl, IIdle, memory_reading


async def connections(args: argparse.Namespace) -> dict[str, Any]:
    endpoints = args.endpoint.split(",")
    async with forkcore.Client(mode="multi", servers=endpoints[:1], strategy=args.strategy,
                               transport=args.transport) as client:
        await anyio.sleep(args.settle)
        before = memory_reading()
        for endpoint in endpoints[1:]:
            await client.add_server(endpoint)
        await anyio.sleep(args.settle)
        after = memory_reading()
        healthy = sum(1 for v in client.servers if v.healthy)
    count = len(endpoints) - 1
    return {"scenario": "connections", "count": count, "healthy": healthy,
            "traced_per": _per(before["traced"], after["traced"], count),
            "rss_per": _per(before["rss"], after["rss"], count)}


async def activations(args: argparse.Namespace) -> dict[str, Any]:
    async with forkcore.Client(servers=[args.endpoint], transport=args.transport) as client:
        control = client.get_grain(IControl, "control")
        await control.memory()
        await control.memory()
        before = await control.memory()
        keys = iter(range(args.count))

        async def toucher() -> None:
            for key in keys:
                await client.get_grain(IIdle, key).touch()

        async with anyio.create_task_group() as tg:
            for _ in range(64):
                tg.start_soon(toucher)
        await anyio.sleep(0.2)
        after = await control.memory()
        bare = await control.bare_grains(args.count)
    count = args.count
    traced_per = None
    if before["traced"] is not None and bare is not None:
        traced_per = (after["traced"] - before["traced"] - bare) / count
    return {"scenario": "activations", "count": count, "traced_per": traced_per,
            "grain_own_per": None if bare is None else bare / count,
            "rss_per": _per(before["rss"], after["rss"], count)}


def _per(before: int | None, after: int | None, count: int) -> float | None:
    if before is None or after is None or count <= 0:
        return None
    return (after - before) / count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("scenario", choices=("connections", "activations"))
    p.add_argument("--endpoint", required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--strategy", default="round_robin")
    p.add_argument("--transport", default="tcp")
    p.add_argument("--trace", action="store_true")
    p.add_argument("--settle", type=float, default=1.5,
                   help="seconds idle before a reading (heartbeats and RTTs have run)")
    p.add_argument("--backend", default="asyncio")
    args = p.parse_args(argv)
    if args.trace:
        tracemalloc.start()
    fn = connections if args.scenario == "connections" else activations
    result = anyio.run(fn, args, backend=args.backend)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
