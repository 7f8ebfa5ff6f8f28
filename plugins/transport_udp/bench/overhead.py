"""Measure transport `udp` against `tcp`: grain calls per second at 1 and 64 in flight.

    python plugins/transport_udp/bench/overhead.py [--seconds 3] [--backend asyncio]

Server and client run in this one process on 127.0.0.1 (so both share one core, as in
the test suite), each transport in turn, in the same run; the ratios are udp / tcp.
"""

from __future__ import annotations

import argparse
import sys

import anyio

import forkcore


class IBench(forkcore.GrainInterface, name="bench.echo"):
    async def echo(self, value: bytes) -> bytes: ...


class Bench(forkcore.Grain, IBench):
    async def echo(self, value: bytes) -> bytes:
        return value


async def rate(transport: str, in_flight: int, seconds: float, payload: bytes) -> float:
    async with forkcore.Server(id="bench", transport=transport, grains=[Bench]) as server:
        async with forkcore.Client(servers=[server.endpoint or ""],
                                   transport=transport) as client:
            grain = client.get_grain(IBench, "k")
            for _ in range(200):  # warm up
                await grain.echo(payload)
            done = 0
            stop = anyio.current_time() + seconds

            async def worker() -> None:
                nonlocal done
                while anyio.current_time() < stop:
                    await grain.echo(payload)
                    done += 1

            start = anyio.current_time()
            async with anyio.create_task_group() as tg:
                for _ in range(in_flight):
                    tg.start_soon(worker)
            return done / (anyio.current_time() - start)


async def main(seconds: float, size: int) -> None:
    payload = b"x" * size
    print(f"grain calls/s, {size}-byte payload, {seconds:g} s each, one process, 127.0.0.1")
    print(f"{'in flight':>9}  {'tcp':>9}  {'udp':>9}  {'udp/tcp':>7}")
    for in_flight in (1, 64):
        tcp = await rate("tcp", in_flight, seconds, payload)
        udp = await rate("udp", in_flight, seconds, payload)
        print(f"{in_flight:>9}  {tcp:>9.0f}  {udp:>9.0f}  {udp / tcp:>7.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    anyio.run(main, args.seconds, args.size, backend=args.backend)
    sys.exit(0)
