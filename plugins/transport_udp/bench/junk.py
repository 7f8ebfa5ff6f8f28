"""Measure what junk datagrams cost a `udp` server: server CPU µs per datagram, by kind.

    python plugins/transport_udp/bench/junk.py [--count 5000] [--rate 3000] [--backend trio]

A forkcore udp server runs in a child process on 127.0.0.1; this process sends it each
kind of junk at a steady rate (or in bursts), waits for the server's socket to be empty
(Linux: /proc/net/udp) so that no datagram is dropped unread, and reads the child's CPU
time (/proc/PID/task/*/schedstat) before and after. The server's idle CPU over the same
wall time is subtracted. Linux only.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import subprocess
import sys
import time

import anyio

KINDS = ("short random (100 B)", "random (1200 B)", "short header, unknown id (1200 B)",
         "Initial-looking, does not decrypt (1200 B)", "Initial, unknown version (1200 B)")


def junk(kind: str, rng: random.Random) -> bytes:
    if kind.startswith("short random"):
        return rng.randbytes(100)
    if kind.startswith("random"):
        return rng.randbytes(1200)
    if kind.startswith("short header"):
        return bytes([0x40 | rng.randrange(64)]) + rng.randbytes(1199)
    version = 1 if kind.startswith("Initial-looking") else 0x1A2A3A4A
    dcid, scid = rng.randbytes(8), rng.randbytes(8)
    header = bytes([0xC3]) + struct.pack("!I", version) + bytes([8]) + dcid + bytes([8]) \
        + scid + b"\x00"  # token length 0
    length = 1200 - len(header) - 2
    header += struct.pack("!H", 0x4000 | length)
    return header + rng.randbytes(length)


def cpu_seconds(pid: int) -> float:
    """CPU time of all of the process's threads, in ns resolution (schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # the thread ended
    return total / 1e9


def queued(port: int) -> int:
    """Bytes waiting in the receive queue of the UDP socket bound to `port`."""
    with open("/proc/net/udp", encoding="ascii") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if int(parts[1].split(":")[1], 16) == port:
                return int(parts[4].split(":")[1], 16)
    return 0


def measure(pid: int, port: int, kind: str, count: int, rate: float,
            rng: random.Random) -> float:
    """Server CPU µs per datagram of `kind`, idle CPU over as long subtracted. At `rate`
    datagrams per second (each one mostly wakes the server on its own, as in a flood of
    that rate), or with rate 0 in bursts of 100 (the server takes each burst in a few
    wake-ups: the cost of the work alone)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    datagrams = [junk(kind, rng) for _ in range(count)]
    start, wall = cpu_seconds(pid), time.perf_counter()
    if rate:
        for i, data in enumerate(datagrams):
            ahead = wall + i / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
            sock.send(data)
    else:
        for i in range(0, count, 100):
            for data in datagrams[i:i + 100]:
                sock.send(data)
            deadline = time.perf_counter() + 5
            while queued(port) and time.perf_counter() < deadline:
                time.sleep(0.0005)
    deadline = time.perf_counter() + 5
    while queued(port) and time.perf_counter() < deadline:
        time.sleep(0.0005)
    time.sleep(0.05)
    used, elapsed = cpu_seconds(pid) - start, time.perf_counter() - wall
    sock.close()
    idle_start = cpu_seconds(pid)
    time.sleep(elapsed)
    idle = cpu_seconds(pid) - idle_start
    return max(0.0, used - idle) / count * 1e6


async def serve(backend: str) -> None:
    import forkcore

    async with forkcore.Server(id="junk", transport="udp", listen="127.0.0.1:0") as server:
        print(server.endpoint, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        stats = server.stats().get("transport", {})
        print(" ".join(f"{k}={v}" for k, v in stats.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="datagrams of each kind")
    parser.add_argument("--rate", type=float, default=3000.0,
                        help="datagrams per second (0: bursts of 100, as fast as taken)")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        anyio.run(serve, args.backend, backend=args.backend)
        return
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--backend", args.backend],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    port = int(child.stdout.readline().strip().rsplit(":", 1)[1])
    rng = random.Random(12)
    pace = f"{args.rate:g}/s" if args.rate else "bursts of 100"
    print(f"server CPU per junk datagram, {args.count} of each kind at {pace}, "
          f"{args.backend}, 127.0.0.1")
    print(f"{'kind':<45} {'µs each':>8}")
    try:
        for kind in KINDS:
            cost = measure(child.pid, port, kind, args.count, args.rate, rng)
            print(f"{kind:<45} {cost:>8.1f}", flush=True)
    finally:
        child.stdin.close()
        counters = child.stdout.readline().strip()
        child.wait(10)
    if counters:
        print(f"listener counters: {counters}")


if __name__ == "__main__":
    main()
