"""The distribution registers observer `opentelemetry`; its options, the switches, the
global providers, and what it costs per call."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import textwrap
import time
import weakref

import forkcore_opentelemetry.observer as observer_module
import pytest
from forkcore_opentelemetry import OpenTelemetryObserver, opentelemetry_observer
from otel_helpers import IScore, Telemetry, call_attrs, hosts

import forkcore
from forkcore.errors import ConfigError
from forkcore.plugins import registrations, registry


def test_otel_is_registered_by_its_distribution() -> None:
    assert registry("observer")["opentelemetry"] is opentelemetry_observer
    [reg] = [r for r in registrations("observer") if r.name == "opentelemetry"]
    assert reg.source == "forkcore-opentelemetry"
    out = subprocess.run([sys.executable, "-m", "forkcore.cli", "plugins"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert any(line.split() == ["observer", "opentelemetry", "forkcore-opentelemetry"]
               for line in out.stdout.splitlines()), out.stdout


def test_otel_options_are_checked_when_the_client_is_built(otel: Telemetry) -> None:
    def client(**options: object) -> forkcore.Client:
        return forkcore.Client(servers=["127.0.0.1:1"], transport="memory",
                               observers=["opentelemetry"],
                               observer_options={"opentelemetry": options})

    with pytest.raises(ConfigError, match="has no option 'meter'; its options are: "
                                          "meter_provider, tracer_provider, metrics, traces"):
        client(meter=otel.meter_provider)
    with pytest.raises(ConfigError, match="option 'traces' must be true or false"):
        client(traces="no")
    with pytest.raises(ConfigError, match=re.escape("'tracer_provider' must be an "
                                                    "opentelemetry.trace.TracerProvider")):
        client(tracer_provider="jaeger")
    with pytest.raises(ConfigError, match=re.escape("'meter_provider' must be an "
                                                    "opentelemetry.metrics.MeterProvider")):
        client(meter_provider=otel.tracer_provider)
    [(observer, _)] = client(**otel.options)._observers._started
    assert isinstance(observer, OpenTelemetryObserver)


def test_otel_is_enabled_from_a_configuration_file(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "client.toml"  # type: ignore[operator]
    path.write_text(textwrap.dedent("""\
        [client]
        mode = "multi"
        transport = "memory"
        servers = ["127.0.0.1:1"]
        observers = ["opentelemetry"]

        [client.observer_options.opentelemetry]
        traces = false
        """))
    client = forkcore.Client.from_config(path)
    [(observer, _)] = client._observers._started
    assert isinstance(observer, OpenTelemetryObserver)
    assert not observer.traces_enabled and observer.metrics_enabled
    path.write_text(path.read_text().replace("traces = false", "tracing = false"))
    with pytest.raises(ConfigError, match=r"client.toml.*observer_options.*has no option "
                                          r"'tracing'"):
        forkcore.Client.from_config(path)


@pytest.mark.anyio
async def test_otel_metrics_or_traces_can_be_switched_off(otel: Telemetry) -> None:
    async with hosts("memory") as h:
        eps = [await h.start("s1")]
        metrics_only = OpenTelemetryObserver(traces=False, **otel.options)
        async with forkcore.Client(mode="multi", servers=eps, transport="memory",
                                   observers=[metrics_only]) as client:
            assert await client.get_grain(IScore, "a").add(1) == 1
        assert otel.spans() == []
        assert otel.values("forkcore.client.calls") == {
            call_attrs("otel.score", "add", "s1", "ok"): 1}
        traces_only = OpenTelemetryObserver(metrics=False, **otel.options)
        async with forkcore.Client(mode="multi", servers=eps, transport="memory",
                                   observers=[traces_only]) as client:
            assert await client.get_grain(IScore, "a").add(1) == 2
        assert [s.name for s in otel.spans()] == ["otel.score/add"]
        assert otel.values("forkcore.client.calls") == {
            call_attrs("otel.score", "add", "s1", "ok"): 1}


@pytest.mark.anyio
async def test_otel_counts_of_clients_sharing_providers_add_up_and_outlive_them(
        otel: Telemetry) -> None:
    ok = call_attrs("otel.score", "add", "s1", "ok")
    async with hosts("memory") as h:
        eps = [await h.start("s1")]
        first, second = otel.client("memory", eps), otel.client("memory", eps)
        async with first, second:
            for client in (first, second):
                await client.get_grain(IScore, "a").add(1)
                await client.get_grain(IScore, "b").add(1)
            assert otel.values("forkcore.client.calls") == {ok: 4}
        gone = weakref.ref(first._observers._started[0][0])
        del first, second, client
        gc.collect()
        assert gone() is None
        assert otel.values("forkcore.client.calls") == {ok: 4}
        assert otel.values("forkcore.client.calls.in_flight") == {
            call_attrs("otel.score", "add", "s1"): 0}
        async with otel.client("memory", eps) as third:
            await third.get_grain(IScore, "a").add(1)
            assert otel.values("forkcore.client.calls") == {ok: 5}


def test_otel_many_routes_overflow_into_one_attribute_set(
        otel: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observer_module, "MAX_ROUTES", 2)
    observer = OpenTelemetryObserver(**otel.options)
    grain_id = forkcore.GrainId("otel.score", "k")
    for method in ("a", "b", "c", "d", "a"):
        observer.call_finished(observer.call_started(grain_id, method, "s1"), None)
    observer.call_finished(observer.call_started(grain_id, "e", "s1"), ValueError("x"))
    assert otel.values("forkcore.client.calls") == {
        call_attrs("otel.score", "a", "s1", "ok"): 2,
        call_attrs("otel.score", "b", "s1", "ok"): 1,
        frozenset({"otel.metric.overflow": True, "forkcore.outcome": "ok"}.items()): 2,
        frozenset({"otel.metric.overflow": True, "forkcore.outcome": "ValueError"}.items()): 1}
    assert [s.name for s in otel.spans()] == [f"otel.score/{m}" for m in "abcdae"]


@pytest.mark.anyio
async def test_otel_servers_of_a_collected_client_count_no_more(otel: Telemetry) -> None:
    def servers() -> dict[tuple[str, str], int]:
        return {(dict(k)["forkcore.server.id"], dict(k)["forkcore.server.state"]): v
                for k, v in otel.values("forkcore.client.servers").items()}

    async with hosts("memory") as h:
        eps = [await h.start("s1")]
        first, second = otel.client("memory", eps), otel.client("memory", eps)
        async with first, second:
            assert servers() == {("s1", "healthy"): 2}
        del first
        gc.collect()
        assert servers() == {("s1", "healthy"): 0, ("s1", "unhealthy"): 1}
        del second
        gc.collect()
        assert servers() == {("s1", "healthy"): 0, ("s1", "unhealthy"): 0}


def test_otel_uses_the_global_providers_by_default() -> None:
    """In a process of its own: global providers are set once per process."""
    script = textwrap.dedent("""\
        import json

        import anyio
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        import forkcore


        class IPing(forkcore.GrainInterface, name="otel.ping"):
            async def ping(self) -> str: ...


        class Ping(forkcore.Grain, IPing):
            async def ping(self) -> str:
                return "pong"


        async def main() -> None:
            async with forkcore.Server(id="s1", transport="memory", grains=[Ping]) as server:
                # the client is built before the providers are set: the API's proxies
                # switch over to them
                client = forkcore.Client(servers=[server.endpoint], transport="memory",
                                         observers=["opentelemetry"])
                exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
                tracer_provider = TracerProvider()
                tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
                trace.set_tracer_provider(tracer_provider)
                metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
                async with client:
                    assert await client.get_grain(IPing, 1).ping() == "pong"
            names = [m.name for rm in reader.get_metrics_data().resource_metrics
                     for sm in rm.scope_metrics for m in sm.metrics]
            print(json.dumps({"spans": [s.name for s in exporter.get_finished_spans()],
                              "metrics": sorted(names)}))


        anyio.run(main)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["spans"] == ["otel.ping/ping"]
    assert {"forkcore.client.calls", "forkcore.client.call.duration",
            "forkcore.client.calls.in_flight", "forkcore.client.servers",
            "forkcore.client.server.state_changes"} <= set(seen["metrics"])


def test_otel_costs_little_per_call_without_an_sdk() -> None:
    """With the API alone (no SDK providers) the observer adds a few microseconds; the
    bound here is loose, to catch an accidental slow path rather than to benchmark."""
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    observer = OpenTelemetryObserver(meter_provider=NoOpMeterProvider(),
                                     tracer_provider=NoOpTracerProvider())
    grain_id = forkcore.GrainId("otel.score", "k")
    n = 20_000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            observer.call_finished(observer.call_started(grain_id, "add", "s1"), None)
        best = min(best, (time.perf_counter() - start) / n)
    assert best < 50e-6, f"{best * 1e6:.1f} µs per call"
