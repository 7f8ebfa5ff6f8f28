"""The `opentelemetry` interceptor: W3C trace context through the call context, a CLIENT
span per call on the client (one, with the observer on too) and a SERVER span per served
call, its child; in one process and with the server in a `forkcore serve` process of its
own (which writes its finished spans to a file, see otel_traced_grains)."""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from forkcore_opentelemetry import OpenTelemetryInterceptor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from otel_helpers import IScore, Score, Telemetry
from otel_traced_grains import SPANS_FILE_VARIABLE, ITraced

import forkcore
from forkcore.errors import ConfigError, RemoteError

pytestmark = pytest.mark.anyio

WAIT = 10.0
TESTS_DIR = Path(__file__).resolve().parent
READY = re.compile(r"forkcore: serving (?P<id>\S+) on (?P<endpoint>\S+:\d+) \(")
TRACEPARENT = re.compile(r"^00-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-[0-9a-f]{2}$")


class IPeek(forkcore.GrainInterface, name="otel.peek"):
    async def context(self) -> dict[str, Any]: ...
    async def fail(self) -> None: ...


class Peek(forkcore.Grain, IPeek):
    async def context(self) -> dict[str, Any]:
        return dict(forkcore.current_context())

    async def fail(self) -> None:
        raise ValueError("a secret detail that must not reach telemetry")


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def parent_id(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


def of_kind(spans: list[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


@asynccontextmanager
async def traced_pair(otel: Telemetry, transport: str) -> AsyncIterator[forkcore.Client]:
    """A server and a client, both with the opentelemetry interceptor on `otel`."""
    async with forkcore.Server(id="s1", transport=transport, grains=[Peek],
                               interceptors=["opentelemetry"],
                               interceptor_options=traced(otel)) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport=transport,
                                   interceptors=["opentelemetry"],
                                   interceptor_options=traced(otel)) as client:
            yield client


def traced(otel: Telemetry) -> dict[str, Any]:
    return {"opentelemetry": {"tracer_provider": otel.tracer_provider}}


@pytest.fixture(params=["memory", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- registration and options -----------------------------------------------------------


def test_otel_interceptor_is_listed_by_forkcore_plugins() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FORKCORE_DISABLE_PLUGIN_AUTOLOAD"}
    result = subprocess.run([sys.executable, "-m", "forkcore.cli", "plugins"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["interceptor", "opentelemetry", "forkcore-opentelemetry"] in rows, result.stdout
    assert ["observer", "opentelemetry", "forkcore-opentelemetry"] in rows, result.stdout


def test_otel_interceptor_options_are_checked_when_built() -> None:
    with pytest.raises(ConfigError, match=r"has no option 'sampler'.*tracer_provider"):
        forkcore.Client(servers=["127.0.0.1:1"], interceptors=["opentelemetry"],
                        interceptor_options={"opentelemetry": {"sampler": 1}})
    with pytest.raises(ConfigError, match=r"must be an opentelemetry\.trace\.TracerProvider"):
        forkcore.Server(id="s", grains=[Peek], interceptors=["opentelemetry"],
                        interceptor_options={"opentelemetry": {"tracer_provider": "sdk"}})
    client = forkcore.Client(servers=["127.0.0.1:1"], interceptors=["opentelemetry"])
    assert any(isinstance(i, OpenTelemetryInterceptor) for i in client._interceptors)


# -- one process ------------------------------------------------------------------------


async def test_server_span_is_the_child_of_the_client_span(otel: Telemetry,
                                                           transport: str) -> None:
    async with traced_pair(otel, transport) as client:
        tracer = otel.tracer_provider.get_tracer("test")
        with anyio.fail_after(WAIT):
            with tracer.start_as_current_span("request") as root, \
                    forkcore.call_context(user="ann"):
                seen = await client.get_grain(IPeek, "k").context()
            # no current span: the client span is a root of its own trace
            await client.get_grain(IPeek, "k").context()

    spans = otel.spans()
    [first_client, second_client] = of_kind(spans, SpanKind.CLIENT)
    [first_server, second_server] = of_kind(spans, SpanKind.SERVER)
    root_trace, root_span = f"{root.get_span_context().trace_id:032x}", \
        f"{root.get_span_context().span_id:016x}"
    client_trace, client_span = hex_ids(first_client)
    assert (client_trace, parent_id(first_client)) == (root_trace, root_span)
    # what travelled is the client span's trace context, next to the caller's entries
    traceparent = seen.pop("traceparent")
    match = TRACEPARENT.match(traceparent)
    assert match is not None, traceparent
    assert (match["trace"], match["span"]) == (client_trace, client_span)
    assert seen == {"user": "ann"}
    assert hex_ids(first_server)[0] == client_trace
    assert parent_id(first_server) == client_span
    assert first_server.parent is not None and first_server.parent.is_remote
    assert parent_id(second_client) is None
    assert parent_id(second_server) == hex_ids(second_client)[1]
    for span in (first_client, first_server):
        assert span.name == "otel.peek/context"
        attrs = dict(span.attributes or {})
        assert {k: attrs[k] for k in ("rpc.system", "rpc.service", "rpc.method")} == {
            "rpc.system": "forkcore", "rpc.service": "otel.peek", "rpc.method": "context"}
        assert attrs["forkcore.grain.key_hash"] == \
            f"{forkcore.GrainId('otel.peek', 'k').stable_hash:016x}"
        assert span.status.status_code is StatusCode.UNSET


async def test_errors_mark_both_spans_with_the_type_only(otel: Telemetry,
                                                         transport: str) -> None:
    async with traced_pair(otel, transport) as client:
        with anyio.fail_after(WAIT), pytest.raises(RemoteError):
            await client.get_grain(IPeek, "k").fail()
    [client_span] = of_kind(otel.spans(), SpanKind.CLIENT)
    [server_span] = of_kind(otel.spans(), SpanKind.SERVER)
    assert parent_id(server_span) == hex_ids(client_span)[1]
    assert server_span.status.status_code is StatusCode.ERROR
    assert dict(server_span.attributes or {})["error.type"] == "ValueError"
    assert client_span.status.status_code is StatusCode.ERROR
    client_attrs = dict(client_span.attributes or {})
    assert (client_attrs["error.type"], client_attrs["forkcore.remote_error.type"]) == (
        "RemoteError", "ValueError")
    for span in (client_span, server_span):
        assert "secret" not in str(span.status.description)
        assert not span.events  # no exception event: its message may be user data


async def test_observer_and_interceptor_together_make_one_client_span(
        otel: Telemetry) -> None:
    """Both on: the observer adds the server id to the interceptor's span and keeps its
    metrics; it starts no span of its own."""
    async with forkcore.Server(id="s1", transport="memory", grains=[Score],
                               interceptors=["opentelemetry"],
                               interceptor_options=traced(otel)) as server:
        assert server.endpoint
        async with otel.client("memory", [server.endpoint], interceptors=["opentelemetry"],
                               interceptor_options=traced(otel)) as client:
            with anyio.fail_after(WAIT):
                for amount in (1, 2, 3):
                    await client.get_grain(IScore, "a").add(amount)
                await client.get_grain(IScore, "a").bump(1)  # one-way
                with pytest.raises(RemoteError):
                    await client.get_grain(IScore, "a").fail("x")
    spans = otel.spans()
    clients = of_kind(spans, SpanKind.CLIENT)
    servers = of_kind(spans, SpanKind.SERVER)
    assert [s.name for s in clients] == ["otel.score/add"] * 3 + ["otel.score/bump",
                                                                  "otel.score/fail"]
    assert all(dict(s.attributes or {})["forkcore.server.id"] == "s1" for s in clients)
    assert len(servers) == 5
    assert {parent_id(s) for s in servers} == {hex_ids(c)[1] for c in clients}
    assert clients[-1].status.status_code is StatusCode.ERROR
    calls = otel.values("forkcore.client.calls")
    assert sum(calls.values()) == 5


async def test_observer_alone_still_makes_its_own_client_span(otel: Telemetry) -> None:
    """With the observer and no client interceptor, spans are as before; the server
    interceptor sees no trace context and makes a root SERVER span."""
    async with forkcore.Server(id="s1", transport="memory", grains=[Score],
                               interceptors=["opentelemetry"],
                               interceptor_options=traced(otel)) as server:
        assert server.endpoint
        async with otel.client("memory", [server.endpoint]) as client:
            with anyio.fail_after(WAIT):
                await client.get_grain(IScore, "b").add(1)
    [client_span] = of_kind(otel.spans(), SpanKind.CLIENT)
    [server_span] = of_kind(otel.spans(), SpanKind.SERVER)
    assert dict(client_span.attributes or {})["forkcore.server.id"] == "s1"
    assert server_span.parent is None


async def test_a_trace_context_that_is_not_a_string_is_ignored(otel: Telemetry) -> None:
    async with forkcore.Server(id="s1", transport="memory", grains=[Peek],
                               interceptors=["opentelemetry"],
                               interceptor_options=traced(otel)) as server:
        assert server.endpoint
        async with forkcore.Client(servers=[server.endpoint], transport="memory") as client:
            with anyio.fail_after(WAIT):
                with forkcore.call_context(traceparent=7, tracestate=[1]):
                    assert await client.get_grain(IPeek, "x").context() == {
                        "traceparent": 7, "tracestate": [1]}
                with forkcore.call_context(traceparent="00-garbage"):
                    await client.get_grain(IPeek, "x").context()
    assert [s.parent for s in of_kind(otel.spans(), SpanKind.SERVER)] == [None, None]


# -- client and server in separate processes --------------------------------------------


class ServeProcess:
    def __init__(self, directory: Path, server_id: str) -> None:
        self.spans_file = directory / f"{server_id}.spans.jsonl"
        config = directory / f"{server_id}.toml"
        config.write_text(f'[server]\nid = "{server_id}"\nlisten = "127.0.0.1:0"\n'
                          'grains = ["otel_traced_grains"]\n'
                          'interceptors = ["opentelemetry"]\n', encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k != "FORKCORE_DISABLE_PLUGIN_AUTOLOAD"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR),
                                                        env.get("PYTHONPATH", "")) if p)
        env[SPANS_FILE_VARIABLE] = str(self.spans_file)
        self.stderr_path = directory / f"{server_id}.stderr"
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forkcore.cli", "serve", "-c", str(config)],
                cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=stderr, bufsize=0)
        self.endpoint = self._ready(time.monotonic() + 20.0)

    def _ready(self, deadline: float) -> str:
        assert self.proc.stdout is not None
        buffer = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    self.stop()
                    pytest.fail(f"forkcore serve not ready: {buffer!r}\n"
                                f"{self.stderr_path.read_text()}")
                if sel.select(min(remaining, 0.5)):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        continue  # exited: poll() says so next round
                    buffer += chunk
        match = READY.search(buffer.decode())
        assert match is not None, buffer
        return match["endpoint"]

    def spans(self, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        """The first `count` spans the server finished, waiting for them until
        `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.spans_file.read_text(encoding="utf-8") \
                if self.spans_file.exists() else ""
            spans = [json.loads(line) for line in text.splitlines() if line.strip()]
            if len(spans) >= count:
                return spans
            if time.monotonic() > deadline:
                pytest.fail(f"{len(spans)} of {count} server spans by the deadline: {spans}"
                            f"\n{self.stderr_path.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path_factory.mktemp("otel-serve"), "traced")
    try:
        yield process
    finally:
        process.stop()


async def test_server_process_span_is_the_child_of_the_client_span(
        otel: Telemetry, serve: ServeProcess) -> None:
    before = len(serve.spans(0))
    async with forkcore.Client(servers=[serve.endpoint], interceptors=["opentelemetry"],
                               interceptor_options=traced(otel),
                               request_timeout=5.0) as client:
        traced_grain = client.get_grain(ITraced, "p")
        with anyio.fail_after(WAIT):
            assert await traced_grain.hello("ann") == "hello ann"
            with pytest.raises(RemoteError):
                await traced_grain.fail()
    [hello_client, fail_client] = of_kind(otel.spans(), SpanKind.CLIENT)
    hello_server, fail_server = serve.spans(before + 2)[before:before + 2]

    for client_span, server_span, name in ((hello_client, hello_server, "hello"),
                                           (fail_client, fail_server, "fail")):
        trace_id, span_id = hex_ids(client_span)
        assert server_span["name"] == f"otel.traced/{name}"
        assert server_span["kind"] == "SERVER"
        assert server_span["trace_id"] == trace_id
        assert server_span["parent_id"] == span_id
        assert server_span["parent_remote"] is True
        assert server_span["attributes"]["rpc.method"] == name
        assert server_span["attributes"]["rpc.service"] == "otel.traced"
    assert hello_server["status"] == "UNSET"
    assert fail_server["status"] == "ERROR"
    assert fail_server["attributes"]["error.type"] == "ValueError"


async def test_a_grain_s_calls_continue_the_trace_across_processes(
        otel: Telemetry, serve: ServeProcess) -> None:
    """test CLIENT → server SERVER (relay) → its own CLIENT → SERVER (hello): one trace,
    each span the child of the one before."""
    before = len(serve.spans(0))
    async with forkcore.Client(servers=[serve.endpoint], interceptors=["opentelemetry"],
                               interceptor_options=traced(otel),
                               request_timeout=5.0) as client:
        with anyio.fail_after(WAIT):
            seen = await client.get_grain(ITraced, "r").relay(serve.endpoint, "bob")
    [outer_client] = of_kind(otel.spans(), SpanKind.CLIENT)
    trace_id, outer_id = hex_ids(outer_client)
    match = TRACEPARENT.match(seen["traceparent"])
    assert match is not None, seen
    assert match["span"] == outer_id
    # finished in this order: the inner SERVER, the inner CLIENT, the relay's SERVER
    inner_server, inner_client, relay_server = serve.spans(before + 3)[before:before + 3]
    assert (relay_server["kind"], relay_server["name"]) == ("SERVER", "otel.traced/relay")
    assert (inner_client["kind"], inner_client["name"]) == ("CLIENT", "otel.traced/hello")
    assert (inner_server["kind"], inner_server["name"]) == ("SERVER", "otel.traced/hello")
    assert {s["trace_id"] for s in (relay_server, inner_client, inner_server)} == {trace_id}
    assert relay_server["parent_id"] == outer_id
    assert inner_client["parent_id"] == relay_server["span_id"]
    assert inner_server["parent_id"] == inner_client["span_id"]
