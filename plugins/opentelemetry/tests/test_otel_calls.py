"""The `opentelemetry` observer on real servers and a multi-mode client: spans and metric
points for successful calls, grain errors and server state changes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from opentelemetry.trace import SpanKind, StatusCode
from otel_helpers import IScore, Score, Telemetry, call_attrs, hosts

import forkcore
from forkcore.errors import RemoteError

pytestmark = pytest.mark.anyio

SERVICE = "otel.score"
SECRET_KEY = "player-secret-7"  # a raw key that must never show up in telemetry


def key_hash(key: Any) -> str:
    return f"{forkcore.GrainId(SERVICE, key).stable_hash:016x}"


def span_values(otel: Telemetry) -> list[Any]:
    values: list[Any] = []
    for span in otel.spans():
        values.append(span.name)
        values.extend((span.attributes or {}).values())
        values.append(span.status.description)
    return values


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_otel_successful_calls_make_spans_and_metrics(otel: Telemetry,
                                                            transport: str) -> None:
    keys = [SECRET_KEY, 1, 2, 3, 4, 5]
    async with hosts(transport) as h:
        eps = [await h.start("s1"), await h.start("s2")]
        async with otel.client(transport, eps) as client:
            routes = {key: client.route(IScore, key) for key in keys}
            for key in keys:
                assert await client.get_grain(IScore, key).add(2) == 2
            await client.get_grain(IScore, SECRET_KEY).bump(1)  # one-way: a call too
            assert await client.get_grain(IScore, SECRET_KEY).add(0) == 3

    spans = otel.spans()
    assert len(spans) == len(keys) + 2
    adds = [s for s in spans if s.name == f"{SERVICE}/add"]
    assert len(adds) == len(keys) + 1
    for span, key in zip(adds, [*keys, SECRET_KEY], strict=True):
        assert span.kind is SpanKind.CLIENT
        assert dict(span.attributes or {}) == {
            "rpc.system": "forkcore", "rpc.service": SERVICE, "rpc.method": "add",
            "forkcore.server.id": routes[key], "forkcore.grain.key_hash": key_hash(key)}
        assert span.status.status_code is StatusCode.UNSET
        assert span.end_time is not None and span.start_time is not None
        assert span.end_time >= span.start_time
    [bump] = [s for s in spans if s.name == f"{SERVICE}/bump"]
    assert bump.attributes is not None and bump.attributes["rpc.method"] == "bump"
    assert bump.attributes["forkcore.grain.key_hash"] == key_hash(SECRET_KEY)
    assert not any(SECRET_KEY in str(v) for v in span_values(otel))

    expected: dict[str, int] = {}
    for key in [*keys, SECRET_KEY]:
        expected[routes[key]] = expected.get(routes[key], 0) + 1
    calls = otel.values("forkcore.client.calls")
    for server, count in expected.items():
        assert calls[call_attrs(SERVICE, "add", server, "ok")] == count
    assert calls[call_attrs(SERVICE, "bump", routes[SECRET_KEY], "ok")] == 1
    assert sum(calls.values()) == len(keys) + 2
    assert all(dict(k)["forkcore.outcome"] == "ok" for k in calls)
    assert otel.values("forkcore.client.errors") == {}

    durations = otel.values("forkcore.client.call.duration")
    for server, count in expected.items():
        n, total = durations[call_attrs(SERVICE, "add", server, "ok")]
        assert n == count and 0 < total < 5 * count
    [duration_metric] = [m for rm in otel.reader.get_metrics_data().resource_metrics
                         for sm in rm.scope_metrics for m in sm.metrics
                         if m.name == "forkcore.client.call.duration"]
    assert duration_metric.unit == "s"
    assert duration_metric.data.data_points[0].explicit_bounds[0] < 0.001  # seconds buckets

    in_flight = otel.values("forkcore.client.calls.in_flight")
    assert in_flight and set(in_flight.values()) == {0}
    assert set(in_flight) >= {call_attrs(SERVICE, "add", s) for s in expected}


async def test_otel_counts_calls_in_flight(otel: Telemetry) -> None:
    Score.gate, Score.entered = anyio.Event(), anyio.Event()
    async with hosts("memory") as h:
        eps = [await h.start("s1")]
        async with otel.client("memory", eps) as client, anyio.create_task_group() as tg:
            results: list[str] = []

            async def wait() -> None:
                results.append(await client.get_grain(IScore, "k").wait())

            tg.start_soon(wait)
            await Score.entered.wait()
            waiting = call_attrs(SERVICE, "wait", "s1")
            assert otel.values("forkcore.client.calls.in_flight")[waiting] == 1
            assert [s.name for s in otel.spans()] == []  # the span ends with the call
            Score.gate.set()
        assert results == ["released"]
    assert otel.values("forkcore.client.calls.in_flight")[waiting] == 0
    assert [s.name for s in otel.spans()] == [f"{SERVICE}/wait"]


async def test_otel_remote_error_sets_error_status_and_counts(otel: Telemetry) -> None:
    async with hosts("memory") as h:
        eps = [await h.start("s1"), await h.start("s2")]
        async with otel.client("memory", eps) as client:
            server = client.route(IScore, SECRET_KEY)
            grain = client.get_grain(IScore, SECRET_KEY)
            with pytest.raises(RemoteError) as caught:
                await grain.fail(f"no luck for {SECRET_KEY}")
            assert caught.value.type_name == "ValueError"
            assert await grain.add(1) == 1

    failed, ok = otel.spans()
    assert failed.name == f"{SERVICE}/fail" and failed.kind is SpanKind.CLIENT
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "RemoteError"
    assert dict(failed.attributes or {}) == {
        "rpc.system": "forkcore", "rpc.service": SERVICE, "rpc.method": "fail",
        "forkcore.server.id": server, "forkcore.grain.key_hash": key_hash(SECRET_KEY),
        "error.type": "RemoteError", "forkcore.remote_error.type": "ValueError"}
    assert ok.status.status_code is StatusCode.UNSET
    assert not any(SECRET_KEY in str(v) for v in span_values(otel))
    assert not failed.events  # no exception event: its message may carry user data

    error = call_attrs(SERVICE, "fail", server, "RemoteError")
    assert otel.values("forkcore.client.calls") == {
        error: 1, call_attrs(SERVICE, "add", server, "ok"): 1}
    assert otel.values("forkcore.client.errors") == {error: 1}
    count, _ = otel.values("forkcore.client.call.duration")[error]
    assert count == 1
    assert otel.values("forkcore.client.calls.in_flight")[call_attrs(SERVICE, "fail",
                                                                      server)] == 0


async def test_otel_server_states_follow_a_stopped_server(otel: Telemetry) -> None:
    def servers() -> dict[tuple[str, str], int]:
        return {(dict(k)["forkcore.server.id"], dict(k)["forkcore.server.state"]): v
                for k, v in otel.values("forkcore.client.servers").items()}

    def changes() -> dict[tuple[str, str, str], int]:
        return {(dict(k)["forkcore.server.id"], dict(k)["forkcore.server.state.from"],
                 dict(k)["forkcore.server.state.to"]): v
                for k, v in otel.values("forkcore.client.server.state_changes").items()}

    async with hosts("memory") as h:
        eps = [await h.start("s1"), await h.start("s2")]
        async with otel.client("memory", eps) as client:
            assert servers() == {("s1", "healthy"): 1, ("s2", "healthy"): 1}
            assert changes() == {("s1", "connecting", "healthy"): 1,
                                 ("s2", "connecting", "healthy"): 1}
            h.stop("s2")
            await wait_until(lambda: servers().get(("s2", "unhealthy")) == 1)
            assert servers() == {("s1", "healthy"): 1, ("s2", "healthy"): 0,
                                 ("s2", "draining"): 0, ("s2", "unhealthy"): 1}
            assert changes() == {("s1", "connecting", "healthy"): 1,
                                 ("s2", "connecting", "healthy"): 1,
                                 ("s2", "healthy", "draining"): 1,
                                 ("s2", "draining", "unhealthy"): 1}
            # in each state, the sum over servers is how many servers are in it
            by_state: dict[str, int] = {}
            for (_, state), n in servers().items():
                by_state[state] = by_state.get(state, 0) + n
            assert by_state == {"healthy": 1, "draining": 0, "unhealthy": 1}
            for key in range(5):
                assert await client.get_grain(IScore, key).add(1) == 1
            assert {dict(k)["forkcore.server.id"]
                    for k in otel.values("forkcore.client.calls")} == {"s1"}


async def test_otel_removed_server_leaves_every_state(otel: Telemetry) -> None:
    async with hosts("memory") as h:
        eps = [await h.start("s1"), await h.start("s2")]
        async with otel.client("memory", eps) as client:
            await client.remove_server("s2")
            counts = {(dict(k)["forkcore.server.id"], dict(k)["forkcore.server.state"]): v
                      for k, v in otel.values("forkcore.client.servers").items()}
            assert counts == {("s1", "healthy"): 1, ("s2", "healthy"): 0}
            changes = otel.values("forkcore.client.server.state_changes")
            assert changes[frozenset({"forkcore.server.id": "s2",
                                      "forkcore.server.state.from": "healthy",
                                      "forkcore.server.state.to": "removed"}.items())] == 1


async def test_otel_call_span_is_a_child_of_the_current_span(otel: Telemetry) -> None:
    tracer = otel.tracer_provider.get_tracer("test")
    async with hosts("memory") as h:
        eps = [await h.start("s1")]
        async with otel.client("memory", eps) as client:
            with tracer.start_as_current_span("handle request") as parent:
                await client.get_grain(IScore, "k").add(1)
            await client.get_grain(IScore, "k").add(1)
    child, outer, alone = otel.spans()
    assert outer.name == "handle request" and child.name == f"{SERVICE}/add"
    assert child.parent is not None
    assert child.parent.span_id == parent.get_span_context().span_id
    assert child.context is not None
    assert child.context.trace_id == parent.get_span_context().trace_id
    assert alone.parent is None
