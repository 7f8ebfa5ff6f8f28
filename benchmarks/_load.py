"""What every benchmark party shares: its command line, the server's ready line and
lifetime, and the client's load generator.

A party is a module run as `python -m MODULE server ...` or `python -m MODULE client ...`.
The server prints `READY <endpoint>` on stdout once it listens and serves until it is
killed or, with `--until-stdin-closes` (as the runner starts it), until its standard
input closes (so it never outlives the runner). The client runs, for each
concurrency, a warm-up and then `--repeat` timed windows of `--duration` seconds, each
with that many calls in flight, and prints one `RESULT <json>` line per concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

BACKENDS = ("asyncio", "trio", "uvloop")

AsyncCall = Callable[[], Awaitable[Any]]
ServeFn = Callable[[argparse.Namespace, Callable[[str], None]], Any]
AsyncClientFn = Callable[[argparse.Namespace], AbstractAsyncContextManager[AsyncCall]]


def payload(size: int) -> str:
    """The string argument of an echo call: `size` ASCII characters (so `size` bytes)."""
    return "x" * size


def run_async(fn: Callable[..., Awaitable[Any]], *args: Any, backend: str) -> Any:
    """`anyio.run` on `backend` ("uvloop" is asyncio with uvloop's loop)."""
    import anyio

    if backend == "uvloop":
        return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(fn, *args, backend=backend)


def ready(endpoint: str) -> None:
    """Tell the runner where the server listens."""
    sys.stdout.write(f"READY {endpoint}\n")
    sys.stdout.flush()


def exit_when_stdin_closes() -> None:
    """End this process when the runner closes our stdin (or dies)."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        sys.stdout.flush()
        os._exit(0)

    threading.Thread(target=watch, name="stdin-watchdog", daemon=True).start()


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("role", choices=("server", "client"))
    p.add_argument("--host", default="127.0.0.1", help="server: address to listen on")
    p.add_argument("--port", type=int, default=0, help="server: port (0: any free one)")
    p.add_argument("--endpoint", help="client: what the server's READY line said")
    p.add_argument("--backend", choices=BACKENDS, default="asyncio")
    p.add_argument("--concurrency", default="1,64", help="calls in flight, comma-separated")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per timed window")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up")
    p.add_argument("--repeat", type=int, default=3, help="timed windows per concurrency")
    p.add_argument("--payload", type=int, default=32, help="bytes of the string argument")
    p.add_argument("--until-stdin-closes", action="store_true",
                   help="server: exit when standard input closes (the runner's way to stop it)")
    p.add_argument("--server-pids", default="",
                   help="client: server process ids, to report their CPU time per call")
    return p


def peer_main(description: str, serve: ServeFn, client: AsyncClientFn | None = None, *,
              thread_client: Callable[[argparse.Namespace], Callable[[], Any]] | None = None,
              async_serve: bool = True, argv: Sequence[str] | None = None,
              extend: Callable[[argparse.ArgumentParser], None] | None = None,
              backends: Sequence[str] = BACKENDS) -> int:
    """The `main()` of a party module; a party that runs only on some `backends` runs on
    the first of them when asked for another."""
    p = parser(description)
    if extend is not None:
        extend(p)
    args = p.parse_args(argv)
    if args.backend not in backends:
        args.backend = backends[0]
    if args.role == "server":
        if args.until_stdin_closes:
            exit_when_stdin_closes()
        if async_serve:
            run_async(serve, args, ready, backend=args.backend)
        else:
            serve(args, ready)
        return 0
    if not args.endpoint:
        p.error("client needs --endpoint")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if thread_client is not None:
        results = measure_threads(thread_client(args), levels, args)
    else:
        assert client is not None
        results = run_async(_measure_async, client, levels, args, backend=args.backend)
    for r in results:
        sys.stdout.write("RESULT " + json.dumps(r) + "\n")
    sys.stdout.flush()
    return 0


# -- CPU time -----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def system_busy() -> float | None:
    """CPU seconds the whole machine has been busy (all cores; Linux /proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / _TICK
    except (OSError, ValueError):
        return None


class CpuMeter:
    """CPU time used during a window by this process, by the server processes, and by
    everything else on the machine (the noise: other work sharing the cores)."""

    def __init__(self, server_pids: str) -> None:
        self.pids = [int(p) for p in server_pids.split(",") if p.strip()]
        self.cores = os.cpu_count() or 1

    def read(self) -> tuple[float, float | None, float | None, float | None]:
        servers = [process_cpu(pid) for pid in self.pids]
        total = None if not servers or None in servers else sum(
            s for s in servers if s is not None)
        return time.process_time(), total, process_cpu(os.getpid()), system_busy()

    def per_call(self, before: tuple[float, float | None, float | None, float | None],
                 after: tuple[float, float | None, float | None, float | None], calls: int,
                 elapsed: float) -> dict[str, float | None]:
        """CPU µs per call of client and servers; `other_load`: the share of the machine
        (all cores) busy with other processes during the window."""
        out: dict[str, float | None] = {"client_cpu_us": None, "server_cpu_us": None,
                                        "other_load": None}
        if calls <= 0 or elapsed <= 0:
            return out
        out["client_cpu_us"] = (after[0] - before[0]) / calls * 1e6
        if before[1] is not None and after[1] is not None:
            out["server_cpu_us"] = (after[1] - before[1]) / calls * 1e6
        if None not in (before[1], after[1], before[2], after[2], before[3], after[3]):
            ours = (after[1] - before[1]) + (after[2] - before[2])  # type: ignore[operator]
            busy = after[3] - before[3]  # type: ignore[operator]
            out["other_load"] = min(1.0, max(0.0, (busy - ours) / elapsed / self.cores))
        return out


# -- statistics ---------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def window_summary(latencies: list[float], elapsed: float, cpu: dict[str, float | None]
                   ) -> dict[str, Any]:
    latencies.sort()
    return {"calls": len(latencies), "elapsed": elapsed,
            "rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
            "p50_us": percentile(latencies, 0.50) * 1e6,
            "p99_us": percentile(latencies, 0.99) * 1e6, **cpu}


def _median_of(windows: list[dict[str, Any]], key: str) -> float | None:
    values = [w[key] for w in windows if w.get(key) is not None]
    return statistics.median(values) if values else None


def combine(concurrency: int, windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the timed windows, and how far apart the windows' rates were."""
    rates = [w["rate"] for w in windows]
    rate = statistics.median(rates)
    return {"concurrency": concurrency, "rate": rate,
            "p50_us": statistics.median(w["p50_us"] for w in windows),
            "p99_us": statistics.median(w["p99_us"] for w in windows),
            "spread": (max(rates) - min(rates)) / rate if rate else 0.0,
            "client_cpu_us": _median_of(windows, "client_cpu_us"),
            "server_cpu_us": _median_of(windows, "server_cpu_us"),
            "other_load": _median_of(windows, "other_load"),
            "calls": sum(int(w["calls"]) for w in windows), "windows": windows}


def check_echo(result: Any, args: argparse.Namespace) -> None:
    if not isinstance(result, str) or len(result) != args.payload:
        raise SystemExit(f"echo returned {type(result).__name__} of length "
                         f"{len(result) if hasattr(result, '__len__') else '?'}, expected a "
                         f"string of {args.payload} characters")


# -- async load ---------------------------------------------------------------------------


async def _window(call: AsyncCall, concurrency: int, duration: float,
                  meter: CpuMeter) -> dict[str, Any]:
    import anyio

    latencies: list[float] = []
    clock = time.perf_counter
    end = clock() + duration

    async def worker() -> None:
        append = latencies.append
        while True:
            t0 = clock()
            if t0 >= end:
                return
            await call()
            append(clock() - t0)

    cpu = meter.read()
    start = clock()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    elapsed = clock() - start
    return window_summary(latencies, elapsed,
                          meter.per_call(cpu, meter.read(), len(latencies), elapsed))


async def _measure_async(client: AsyncClientFn, levels: list[int],
                         args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    meter = CpuMeter(args.server_pids)
    async with client(args) as call:
        check_echo(await call(), args)
        for concurrency in levels:
            if args.warmup > 0:
                await _window(call, concurrency, args.warmup, meter)
            windows = [await _window(call, concurrency, args.duration, meter)
                       for _ in range(max(1, args.repeat))]
            results.append(combine(concurrency, windows))
    return results


# -- thread load (for synchronous peers) --------------------------------------------------


def measure_threads(new_caller: Callable[[], Any], levels: list[int],
                    args: argparse.Namespace) -> list[dict[str, Any]]:
    """Like the async load, with one thread (and one caller) per call in flight.

    `new_caller()` is called in the thread that will use the caller it returns."""
    callers: list[Any] = []
    lock = threading.Lock()
    meter = CpuMeter(args.server_pids)

    def run_window(concurrency: int, duration: float) -> dict[str, Any]:
        latencies: list[float] = []
        clock = time.perf_counter
        barrier = threading.Barrier(concurrency + 1)
        end = [0.0]

        def worker(slot: int) -> None:
            with lock:
                while len(callers) <= slot:
                    callers.append(None)
            if callers[slot] is None:
                callers[slot] = new_caller()
            call = callers[slot]
            own: list[float] = []
            barrier.wait()
            while True:
                t0 = clock()
                if t0 >= end[0]:
                    break
                call()
                own.append(clock() - t0)
            with lock:
                latencies.extend(own)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(concurrency)]
        for t in threads:
            t.start()
        end[0] = clock() + 3600
        barrier.wait()
        cpu = meter.read()
        start = clock()
        end[0] = start + duration
        for t in threads:
            t.join()
        elapsed = clock() - start
        return window_summary(latencies, elapsed,
                              meter.per_call(cpu, meter.read(), len(latencies), elapsed))

    first = new_caller()
    check_echo(first(), args)
    callers.append(first)
    results = []
    for concurrency in levels:
        if args.warmup > 0:
            run_window(concurrency, args.warmup)
        windows = [run_window(concurrency, args.duration) for _ in range(max(1, args.repeat))]
        results.append(combine(concurrency, windows))
    return results
