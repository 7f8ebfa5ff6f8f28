"""Grains for `forkcore serve` processes in the interceptor tests. Importing this module
(which `forkcore serve` does, as `[server] grains`) installs an SDK tracer provider as
the global one, writing every finished span as one JSON line to the file named by
FORKCORE_OTEL_SPANS_FILE, for the test to read."""

from __future__ import annotations

import json
import os
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

import forkcore

SPANS_FILE_VARIABLE = "FORKCORE_OTEL_SPANS_FILE"


def span_line(span: ReadableSpan) -> str:
    """One finished span as a JSON line: ids in hex, as W3C trace context writes them."""
    context = span.context
    parent = span.parent
    return json.dumps({
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}" if context else None,
        "span_id": f"{context.span_id:016x}" if context else None,
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "parent_remote": parent.is_remote if parent else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
    }) + "\n"


def _install() -> None:
    path = os.environ.get(SPANS_FILE_VARIABLE)
    if not path:
        return
    provider = TracerProvider()
    out = open(path, "a", encoding="utf-8")
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
        out=out, formatter=span_line)))
    trace.set_tracer_provider(provider)


_install()


class ITraced(forkcore.GrainInterface, name="otel.traced"):
    async def hello(self, name: str) -> str: ...
    async def fail(self) -> None: ...
    async def relay(self, endpoint: str, name: str) -> dict[str, Any]: ...


class Traced(forkcore.Grain, ITraced):
    async def hello(self, name: str) -> str:
        return f"hello {name}"

    async def fail(self) -> None:
        raise ValueError("a secret detail that must not reach telemetry")

    async def relay(self, endpoint: str, name: str) -> dict[str, Any]:
        """Calls `hello` on `endpoint` through a client with the interceptor: its CLIENT
        span is a child of this call's SERVER span. Returns what this grain saw."""
        seen = dict(forkcore.current_context())
        async with forkcore.Client(servers=[endpoint], interceptors=["opentelemetry"],
                                   request_timeout=5.0) as client:
            await client.get_grain(ITraced, "inner").hello(name)
        return seen
