"""What the `opentelemetry` observer adds to each call, in microseconds.

    python plugins/opentelemetry/bench/otel_overhead.py [--calls N] [--rounds R]

Two measurements, each with the SDK (spans through a BatchSpanProcessor to an exporter
that drops them, so serialization and I/O are left out; metrics to an
InMemoryMetricReader) and with the API alone (no SDK installed or set: the global no-op
providers):

- observer: `call_started` + `call_finished` called directly in a loop, i.e. the
  observer's own cost;
- end to end: sequential calls from a client to an in-process server on the `memory`
  transport, compared with the same client without observers (this includes forkcore's
  observer fan-out).

Times are CPU time (the thread's for the first, the process's, with the span processor's
thread, for the second), so that other load on the machine does not count; rounds
alternate between the variants and the best round counts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from forkcore_opentelemetry import OpenTelemetryObserver
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import forkcore


class IBench(forkcore.GrainInterface, name="bench.otel"):
    async def ping(self, n: int) -> int: ...


class Bench(forkcore.Grain, IBench):
    async def ping(self, n: int) -> int:
        return n


class DropSpans(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def sdk_observer(traces: bool = True) -> tuple[OpenTelemetryObserver, Callable[[], None]]:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])

    def shutdown() -> None:
        tracer_provider.shutdown()
        meter_provider.shutdown()

    return OpenTelemetryObserver(meter_provider=meter_provider, tracer_provider=tracer_provider,
                                 traces=traces), shutdown


def noop_observer() -> tuple[OpenTelemetryObserver, Callable[[], None]]:
    # no providers given and none set globally: the API's proxies, which do nothing
    return OpenTelemetryObserver(), lambda: None


VARIANTS: dict[str, Callable[[], tuple[OpenTelemetryObserver, Callable[[], None]]]] = {
    "sdk": sdk_observer, "sdk metrics": lambda: sdk_observer(traces=False),
    "no-op api": noop_observer}


def observer_cost(calls: int, rounds: int) -> dict[str, float]:
    grain_id = forkcore.GrainId("bench.otel", "player-1")
    best = {name: float("inf") for name in VARIANTS}
    for _ in range(rounds):
        for name, make in VARIANTS.items():
            observer, shutdown = make()
            started, finished = observer.call_started, observer.call_finished
            t0 = time.thread_time()
            for _ in range(calls):
                finished(started(grain_id, "ping", "s1"), None)
            best[name] = min(best[name], (time.thread_time() - t0) / calls)
            shutdown()
    return best


async def end_to_end(calls: int, rounds: int) -> dict[str, float]:
    best = {name: float("inf") for name in ["none", *VARIANTS]}
    async with forkcore.Server(id="s1", transport="memory", grains=[Bench]) as server:
        for _ in range(rounds):
            for name in best:
                observers: list[Any] = []
                shutdown: Callable[[], None] = lambda: None  # noqa: E731
                if name != "none":
                    observer, shutdown = VARIANTS[name]()
                    observers.append(observer)
                async with forkcore.Client(servers=[server.endpoint or ""], transport="memory",
                                           observers=observers) as client:
                    grain = client.get_grain(IBench, "player-1")
                    for i in range(200):  # warm up
                        await grain.ping(i)
                    t0 = time.process_time()
                    for i in range(calls):
                        await grain.ping(i)
                    best[name] = min(best[name], (time.process_time() - t0) / calls)
                shutdown()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()

    cost = observer_cost(args.calls * 5, args.rounds)
    print("observer alone (call_started + call_finished), per call:")
    for name, seconds in cost.items():
        print(f"  {name:11} {seconds * 1e6:7.2f} µs")
    e2e = anyio.run(end_to_end, args.calls, args.rounds, backend=args.backend)
    print(f"end to end on the memory transport ({args.backend}), per call:")
    base = e2e["none"]
    print(f"  {'none':11} {base * 1e6:7.2f} µs")
    for name in VARIANTS:
        print(f"  {name:11} {e2e[name] * 1e6:7.2f} µs  (+{(e2e[name] - base) * 1e6:.2f} µs)")


if __name__ == "__main__":
    main()
