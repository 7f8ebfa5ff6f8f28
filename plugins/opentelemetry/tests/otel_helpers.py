"""Grains, servers and OpenTelemetry SDK readers shared by the forkcore-opentelemetry tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import forkcore


class IScore(forkcore.GrainInterface, name="otel.score"):
    async def add(self, amount: int) -> int: ...
    async def fail(self, message: str) -> None: ...
    async def wait(self) -> str: ...
    @forkcore.rpc(one_way=True)
    async def bump(self, amount: int) -> None: ...


class Score(forkcore.Grain, IScore):
    gate: anyio.Event | None = None  # `wait` blocks on it while a test looks at in-flight
    entered: anyio.Event | None = None

    def __init__(self) -> None:
        self.total = 0

    async def add(self, amount: int) -> int:
        self.total += amount
        return self.total

    async def fail(self, message: str) -> None:
        raise ValueError(message)

    async def wait(self) -> str:
        assert Score.gate is not None and Score.entered is not None
        Score.entered.set()
        await Score.gate.wait()
        return "released"

    async def bump(self, amount: int) -> None:
        self.total += amount


class Hosts:
    """Servers in their own tasks, so a test can stop one."""

    def __init__(self, tg: anyio.abc.TaskGroup, transport: str) -> None:
        self.tg = tg
        self.transport = transport
        self.stops: dict[str, anyio.Event] = {}

    async def start(self, server_id: str) -> str:
        stop = self.stops[server_id] = anyio.Event()
        return str(await self.tg.start(self._run, server_id, stop))

    async def _run(self, server_id: str, stop: anyio.Event, *,
                   task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        async with forkcore.Server(id=server_id, transport=self.transport, grains=[Score],
                                   drain_timeout=0.2) as server:
            task_status.started(server.endpoint or "")
            await stop.wait()

    def stop(self, server_id: str) -> None:
        self.stops[server_id].set()


@asynccontextmanager
async def hosts(transport: str) -> AsyncIterator[Hosts]:
    async with anyio.create_task_group() as tg:
        h = Hosts(tg, transport)
        try:
            yield h
        finally:
            for stop in h.stops.values():
                stop.set()


class Telemetry:
    """SDK providers exporting to memory, and readers of what they recorded."""

    def __init__(self) -> None:
        self.spans_exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    @property
    def options(self) -> dict[str, Any]:
        return {"meter_provider": self.meter_provider, "tracer_provider": self.tracer_provider}

    def client(self, transport: str, endpoints: Sequence[str], **more: Any) -> forkcore.Client:
        return forkcore.Client(mode="multi", servers=list(endpoints), transport=transport,
                               strategy="consistent_hash", observers=["opentelemetry"],
                               observer_options={"opentelemetry": self.options},
                               reconnect_initial_delay=0.02, reconnect_max_delay=0.1,
                               request_timeout=5.0, **more)

    def spans(self) -> list[ReadableSpan]:
        return list(self.spans_exporter.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        """The data points of metric `name` now (none if it was never recorded)."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def values(self, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """Metric `name` by attribute set: a sum's value, a histogram's (count, sum)."""
        result: dict[frozenset[tuple[str, Any]], Any] = {}
        for point in self.points(name):
            key = frozenset(dict(point.attributes).items())
            result[key] = (point.count, point.sum) if hasattr(point, "bucket_counts") else \
                point.value
        return result

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def call_attrs(interface: str, method: str, server: str,
               outcome: str | None = None) -> frozenset[tuple[str, Any]]:
    items: Mapping[str, Any] = {"rpc.service": interface, "rpc.method": method,
                                "forkcore.server.id": server}
    if outcome is not None:
        items = {**items, "forkcore.outcome": outcome}
    return frozenset(items.items())
