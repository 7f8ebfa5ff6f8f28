"""forkcore as a benchmark party: echo grains, their server(s), and a client calling them
through a typed proxy.

    python -m benchmarks.forkcore_echo server [--transport tcp] [--count 1] [--trace]
    python -m benchmarks.forkcore_echo client --endpoint E[,E...] [--mode single|multi]
        [--strategy consistent_hash] [--keys 1] [--transport tcp]
        [--transport-options JSON]

The client calls `IEcho.echo(n, s)` on `--keys` distinct grains in turn (one grain by
default, so 64 calls in flight queue on one activation, turn-based, as in the targets).
The server also hosts `bench.idle` (an empty grain, for the memory per activation) and
`bench.control` (memory readings of the server process, for the memory scenario).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import forkcore

from ._load import AsyncCall, payload, peer_main


class IEcho(forkcore.GrainInterface, name="bench.echo"):
    async def echo(self, n: int, s: str) -> list[Any]: ...


class Echo(forkcore.Grain, IEcho):
    async def echo(self, n: int, s: str) -> list[Any]:
        return [n, s]


class IIdle(forkcore.GrainInterface, name="bench.idle"):
    async def touch(self) -> None: ...


class Idle(forkcore.Grain, IIdle):
    """A grain with no state of its own: what it costs idle is the framework's cost."""

    async def touch(self) -> None:
        return None


class IControl(forkcore.GrainInterface, name="bench.control"):
    async def memory(self) -> dict[str, Any]: ...

    async def bare_grains(self, count: int) -> int | None: ...


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_reading() -> dict[str, Any]:
    """Traced Python heap bytes (when tracing) and RSS, after a full collection."""
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
    return {"traced": traced, "rss": rss_bytes()}


class Control(forkcore.Grain, IControl):
    async def memory(self) -> dict[str, Any]:
        return memory_reading()

    async def bare_grains(self, count: int) -> int | None:
        """Traced bytes of `count` Idle instances made without the runtime: the grains'
        own state, to subtract from the memory of as many activations."""
        if not tracemalloc.is_tracing():
            return None
        before = memory_reading()["traced"]
        grains = [Idle() for _ in range(count)]
        after = memory_reading()["traced"]
        del grains
        return int(after - before)


GRAINS = [Echo, Idle, Control]


def _options(text: str | None) -> dict[str, Any]:
    return dict(json.loads(text)) if text else {}


async def serve(args: argparse.Namespace, ready: Any) -> None:
    async with AsyncExitStack() as stack:
        servers = []
        for i in range(args.count):
            server_id = args.server_id if args.count == 1 else f"{args.server_id}-{i}"
            servers.append(await stack.enter_async_context(forkcore.Server(
                id=server_id, listen=f"{args.host}:{args.port if args.count == 1 else 0}",
                transport=args.transport, grains=GRAINS,
                transport_options=_options(args.transport_options))))
        ready(",".join(str(s.endpoint) for s in servers))
        await servers[0].serve_forever()


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(mode=args.mode, servers=args.endpoint.split(","),
                                  transport=args.transport,
                                  transport_options=_options(args.client_transport_options))
    if args.mode == "multi":
        kwargs["strategy"] = args.strategy
    return kwargs


@asynccontextmanager
async def client(args: argparse.Namespace) -> AsyncIterator[AsyncCall]:
    text = payload(args.payload)
    ids = itertools.count()
    async with forkcore.Client(**client_kwargs(args)) as fc:
        grains = [fc.get_grain(IEcho, key) for key in range(args.keys)]
        turn = itertools.cycle(grains).__next__

        async def call() -> Any:
            return (await turn().echo(next(ids), text))[1]

        yield call


def extend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", default="tcp")
    p.add_argument("--transport-options", help="server transport_options, JSON")
    p.add_argument("--client-transport-options", help="client transport_options, JSON")
    p.add_argument("--mode", choices=("single", "multi"), default="single")
    p.add_argument("--strategy", default="consistent_hash")
    p.add_argument("--keys", type=int, default=1, help="distinct grains called in turn")
    p.add_argument("--server-id", default=f"bench-{os.getpid()}")
    p.add_argument("--count", type=int, default=1, help="servers hosted by this process")
    p.add_argument("--trace", action="store_true", help="start tracemalloc at once")


def main() -> int:
    if "--trace" in sys.argv:
        tracemalloc.start()
    return peer_main(__doc__ or "", serve, client, extend=extend)


if __name__ == "__main__":
    raise SystemExit(main())
