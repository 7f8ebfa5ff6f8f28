"""The `opentelemetry` interceptor: W3C trace context across calls, and a span per call.

- On a client (`[client] interceptors = ["opentelemetry"]`) it makes a CLIENT span around
  the call, a child of the current span, and puts that span's trace context
  (`traceparent`, `tracestate`, through the global propagator of `opentelemetry.propagate`)
  into the call context, so it travels in the Request's headers.
- On a server (`[server] interceptors = ["opentelemetry"]`) it extracts the caller's trace
  context from the call context and makes a SERVER span per served call, its child, current
  while the grain runs (calls the grain makes through a client with the interceptor are
  its children in turn).

One CLIENT span per call, not two: when the `opentelemetry` observer (traces on) runs
under this interceptor's span for the same call, it does not start a span of its own; it
adds the server id to this one (`CALL_SPAN` below), and keeps counting its metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import propagate
from opentelemetry import trace as otel_trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider

from forkcore import CallInfo
from forkcore.grains import GrainId
from forkcore.interceptors import Proceed

from .observer import (
    _VERSION,
    ATTR_ERROR_TYPE,
    ATTR_GRAIN_KEY_HASH,
    ATTR_REMOTE_ERROR_TYPE,
    ATTR_RPC_METHOD,
    ATTR_RPC_SERVICE,
    ATTR_RPC_SYSTEM,
    CALL_SPAN,
    INSTRUMENTATION_NAME,
    MAX_ROUTES,
    check_options,
    check_provider,
)

__all__ = ["CALL_SPAN", "OpenTelemetryInterceptor", "opentelemetry_interceptor"]

OPTIONS: Final = ("tracer_provider",)


class _ContextGetter(Getter[Mapping[str, Any]]):
    """Reads propagation fields from a call context: string values only (a call context
    may hold any wire value under any key; anything else is no trace context)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [k for k, v in carrier.items() if isinstance(v, str)]


_GETTER: Final = _ContextGetter()


class OpenTelemetryInterceptor:
    """Client side: CLIENT span + trace context injected; server side: SERVER span, child
    of the extracted context. `tracer_provider` defaults to the global one."""

    __slots__ = ("_attrs", "_tracer")

    def __init__(self, *, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = otel_trace.get_tracer(INSTRUMENTATION_NAME, _VERSION,
                                             tracer_provider=tracer_provider)
        # (interface, method) -> (span name, attributes): computed once per method
        self._attrs: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}

    def __repr__(self) -> str:
        return "OpenTelemetryInterceptor()"

    def _describe(self, grain_id: GrainId, method: str) -> tuple[str, dict[str, Any]]:
        interface = grain_id.interface
        found = self._attrs.get((interface, method))
        if found is None:
            found = (f"{interface}/{method}", {ATTR_RPC_SYSTEM: "forkcore",
                                               ATTR_RPC_SERVICE: interface,
                                               ATTR_RPC_METHOD: method})
            if len(self._attrs) < MAX_ROUTES:
                self._attrs[(interface, method)] = found
        name, base = found
        attrs = base.copy()
        # the key's hash only: a raw key may be user data
        attrs[ATTR_GRAIN_KEY_HASH] = f"{grain_id.stable_hash:016x}"
        return name, attrs

    async def intercept(self, call: CallInfo, proceed: Proceed) -> Any:
        name, attrs = self._describe(call.grain_id, call.method)
        if call.side == "client":
            span = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs)
            marked = CALL_SPAN.set((call.grain_id, span))
            try:
                with otel_trace.use_span(span, end_on_exit=True, record_exception=False,
                                         set_status_on_exception=False):
                    propagate.inject(call.context)  # the current span's: this one
                    return await _traced(span, proceed)
            finally:
                CALL_SPAN.reset(marked)
        parent = propagate.extract(call.context, getter=_GETTER)
        with self._tracer.start_as_current_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=attrs,
                record_exception=False, set_status_on_exception=False) as span:
            return await _traced(span, proceed)


async def _traced(span: Span, proceed: Proceed) -> Any:
    """`proceed()`, marking `span` with the error type (never the message: it may carry
    user data) when it raises."""
    try:
        return await proceed()
    except Exception as exc:
        if span.is_recording():
            type_name = type(exc).__name__
            span.set_attribute(ATTR_ERROR_TYPE, type_name)
            remote = getattr(exc, "type_name", None)
            if isinstance(remote, str):
                span.set_attribute(ATTR_REMOTE_ERROR_TYPE, remote)
            span.set_status(Status(StatusCode.ERROR, type_name))
        raise


def opentelemetry_interceptor(**options: Any) -> OpenTelemetryInterceptor:
    """The factory registered as interceptor `opentelemetry`: called with
    `interceptor_options["opentelemetry"]` of the `[client]` or `[server]`."""
    check_options("interceptor 'opentelemetry'", options, OPTIONS)
    check_provider("interceptor 'opentelemetry'", options, "tracer_provider", "get_tracer",
                   "opentelemetry.trace.TracerProvider")
    return OpenTelemetryInterceptor(tracer_provider=options.get("tracer_provider"))
