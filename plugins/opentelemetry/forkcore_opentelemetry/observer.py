"""The `opentelemetry` observer: metrics and one span per call for a forkcore client.

It runs on every call's path, so it does as little as it can there:

- everything that does not depend on the call is computed once: the instruments once per
  meter provider, and the attribute mappings, span name and error statuses once per
  (interface, method, server) and per error type;
- the counters (calls, errors), the calls in flight and the servers' states are kept in
  plain integers and reported through asynchronous instruments, which the SDK reads when
  it collects; only the latency histogram is recorded on each call (an SDK measurement
  costs several microseconds, an integer increment a few nanoseconds).

Several clients may share a meter provider: its instruments are created once and report
the sum over the clients (the counts of clients gone are kept, so counters never go
down).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    MeterProvider,
    Observation,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from forkcore.errors import ConfigError
from forkcore.grains import GrainId

__all__ = [
    "CALL_SPAN",
    "DURATION_BUCKETS",
    "INSTRUMENTATION_NAME",
    "OpenTelemetryObserver",
    "opentelemetry_observer",
]

INSTRUMENTATION_NAME: Final = "forkcore_opentelemetry"

METRIC_CALLS: Final = "forkcore.client.calls"
METRIC_ERRORS: Final = "forkcore.client.errors"
METRIC_DURATION: Final = "forkcore.client.call.duration"
METRIC_IN_FLIGHT: Final = "forkcore.client.calls.in_flight"
METRIC_SERVERS: Final = "forkcore.client.servers"
METRIC_STATE_CHANGES: Final = "forkcore.client.server.state_changes"

ATTR_RPC_SYSTEM: Final = "rpc.system"
ATTR_RPC_SERVICE: Final = "rpc.service"
ATTR_RPC_METHOD: Final = "rpc.method"
ATTR_SERVER_ID: Final = "forkcore.server.id"
ATTR_GRAIN_KEY_HASH: Final = "forkcore.grain.key_hash"
ATTR_OUTCOME: Final = "forkcore.outcome"
ATTR_ERROR_TYPE: Final = "error.type"
ATTR_REMOTE_ERROR_TYPE: Final = "forkcore.remote_error.type"
ATTR_SERVER_STATE: Final = "forkcore.server.state"
ATTR_STATE_FROM: Final = "forkcore.server.state.from"
ATTR_STATE_TO: Final = "forkcore.server.state.to"
ATTR_OVERFLOW: Final = "otel.metric.overflow"

#: Histogram bucket boundaries for call durations, in seconds (100 µs to 10 s).
DURATION_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                           0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Distinct (interface, method, server) triples one observer counts apart; calls beyond
#: them are counted together under the attribute `otel.metric.overflow = true`.
MAX_ROUTES: Final = 2000

OPTIONS: Final = ("meter_provider", "tracer_provider", "metrics", "traces")

try:
    _VERSION = version("forkcore-opentelemetry")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = ""

_clock = time.perf_counter

#: (grain id, span) while the `opentelemetry` interceptor's CLIENT span of a call is open:
#: the observer then adds to that span instead of starting a second one for the call.
CALL_SPAN: ContextVar[tuple[GrainId, Span] | None] = ContextVar("forkcore_otel_call_span",
                                                                default=None)

Attrs = Mapping[str, Any]


class _Tally:
    """Counts for one (interface, method, server), read by the asynchronous instruments."""

    __slots__ = ("attrs", "errors", "in_flight", "key", "ok", "ok_attrs")

    def __init__(self, key: tuple[str, ...], attrs: Attrs) -> None:
        self.key = key
        self.attrs = attrs
        self.ok_attrs: Attrs = {**attrs, ATTR_OUTCOME: "ok"}
        self.ok = 0
        self.in_flight = 0
        self.errors: dict[str, int] = {}


class _Route:
    """Everything precomputed for one (interface, method, server) triple."""

    __slots__ = ("errors", "ok_attrs", "span_attrs", "span_name", "tally")

    def __init__(self, interface: str, method: str, server_id: str, tally: _Tally | None
                 ) -> None:
        self.span_name = f"{interface}/{method}"
        base = {ATTR_RPC_SERVICE: interface, ATTR_RPC_METHOD: method,
                ATTR_SERVER_ID: server_id}
        self.span_attrs: dict[str, Any] = {ATTR_RPC_SYSTEM: "forkcore", **base}
        self.tally = tally if tally is not None else _Tally((interface, method, server_id),
                                                            base)
        self.ok_attrs = self.tally.ok_attrs
        # error type name -> (metric attributes, span status)
        self.errors: dict[str, tuple[Attrs, Status]] = {}

    def error(self, type_name: str) -> tuple[Attrs, Status]:
        found = self.errors.get(type_name)
        if found is None:
            found = ({**self.tally.attrs, ATTR_OUTCOME: type_name},
                     Status(StatusCode.ERROR, type_name))
            self.errors[type_name] = found
        return found


class _Instruments:
    """The instruments of one meter provider, shared by every observer using it."""

    def __init__(self, meter: Meter) -> None:
        # reentrant: an observer's finalizer may run in a callback holding it
        self._lock = threading.RLock()
        self._observers: weakref.WeakSet[OpenTelemetryObserver] = weakref.WeakSet()
        # the counts of observers gone (their clients closed and collected), so that the
        # counters never go down
        self._retired: dict[tuple[str, ...], _Tally] = {}
        self._attrs: dict[tuple[str | None, ...], Attrs] = {}
        meter.create_observable_counter(
            METRIC_CALLS, [self._observe_calls], unit="{call}",
            description="Calls sent by the client, by interface, method, server and outcome")
        meter.create_observable_counter(
            METRIC_ERRORS, [self._observe_errors], unit="{call}",
            description="Calls that failed, by interface, method, server and error type")
        meter.create_observable_up_down_counter(
            METRIC_IN_FLIGHT, [self._observe_in_flight], unit="{call}",
            description="Calls sent and not answered yet, by interface, method and server")
        self.duration = _histogram(meter)
        # every (server, state) reported so far: one a server left is reported as 0
        self._server_keys: dict[tuple[str, str], Attrs] = {}
        meter.create_observable_up_down_counter(
            METRIC_SERVERS, [self._observe_servers], unit="{server}",
            description="Servers known to the client, by server id and state (each server "
                        "counts 1 in the state it is in)")
        self.state_changes: Counter = meter.create_counter(
            METRIC_STATE_CHANGES, unit="{change}",
            description="Changes of a server's state as the client sees it")

    def add(self, observer: OpenTelemetryObserver, tallies: list[_Tally]) -> None:
        with self._lock:
            self._observers.add(observer)
        weakref.finalize(observer, self._retire, tallies)

    def _retire(self, tallies: list[_Tally]) -> None:
        with self._lock:
            for tally in list(tallies):
                kept = self._retired.get(tally.key)
                if kept is None:
                    kept = self._retired[tally.key] = _Tally(tally.key, tally.attrs)
                kept.ok += tally.ok
                for type_name, n in list(tally.errors.items()):
                    kept.errors[type_name] = kept.errors.get(type_name, 0) + n

    def _tallies(self) -> list[_Tally]:
        with self._lock:
            observers = list(self._observers)  # alive until this returns
            tallies = [t for o in observers for t in list(o.tallies)]
            tallies.extend(self._retired.values())
        return tallies

    def _totals(self, items: Iterable[tuple[_Tally, str | None, int]]) -> list[Observation]:
        """One observation per attribute set: several clients may count the same
        (interface, method, server), and their counts add up."""
        totals: dict[tuple[str | None, ...], list[Any]] = {}
        for tally, outcome, n in items:
            key = (*tally.key, outcome)
            entry = totals.get(key)
            if entry is not None:
                entry[1] += n
                continue
            attrs = self._attrs.get(key)
            if attrs is None:
                attrs = self._attrs[key] = tally.attrs if outcome is None else \
                    {**tally.attrs, ATTR_OUTCOME: outcome}
            totals[key] = [attrs, n]
        return [Observation(n, attrs) for attrs, n in totals.values()]

    def _observe_calls(self, _options: CallbackOptions) -> Iterable[Observation]:
        items: list[tuple[_Tally, str | None, int]] = []
        for tally in self._tallies():
            if tally.ok:
                items.append((tally, "ok", tally.ok))
            items.extend((tally, type_name, n) for type_name, n in list(tally.errors.items()))
        return self._totals(items)

    def _observe_errors(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._totals((tally, type_name, n) for tally in self._tallies()
                            for type_name, n in list(tally.errors.items()))

    def _observe_in_flight(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._totals((tally, None, tally.in_flight) for tally in self._tallies())

    def server_state(self, server_id: str, state: str) -> None:
        """Note that a server was in `state`: from now on it is reported, as 0 when no
        server is in it."""
        key = (server_id, state)
        if key not in self._server_keys:
            with self._lock:
                self._server_keys[key] = {ATTR_SERVER_ID: server_id, ATTR_SERVER_STATE: state}

    def _observe_servers(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            observers = list(self._observers)
            for observer in observers:
                for key in list(observer.server_states.items()):
                    counts[key] = counts.get(key, 0) + 1
            return [Observation(counts.get(key, 0), attrs)
                    for key, attrs in self._server_keys.items()]


_instruments_lock = threading.Lock()
_instruments: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_global_instruments: list[_Instruments] = []


def _instruments_for(provider: MeterProvider | None) -> _Instruments:
    with _instruments_lock:
        if provider is None:  # the global provider, now or once it is set
            if not _global_instruments:
                _global_instruments.append(_Instruments(_meter(None)))
            return _global_instruments[0]
        try:
            found = _instruments.get(provider)
        except TypeError:  # not weakly referenceable: instruments of its own
            return _Instruments(_meter(provider))
        if found is None:
            found = _instruments[provider] = _Instruments(_meter(provider))
        return found


class OpenTelemetryObserver:
    """A forkcore observer recording OpenTelemetry metrics and a CLIENT span per call.

    `meter_provider` and `tracer_provider` default to the global providers (set with
    `opentelemetry.metrics.set_meter_provider` and `opentelemetry.trace.set_tracer_provider`,
    before or after the client is built). `metrics=False` or `traces=False` turns one
    half off.
    """

    __slots__ = ("__weakref__", "_instruments", "_overflow", "_routes", "_state_attrs",
                 "_tracer", "metrics_enabled", "server_states", "tallies", "traces_enabled")

    def __init__(self, *, meter_provider: MeterProvider | None = None,
                 tracer_provider: TracerProvider | None = None,
                 metrics: bool = True, traces: bool = True) -> None:
        self.metrics_enabled = metrics
        self.traces_enabled = traces
        self._routes: dict[tuple[str, str, str], _Route] = {}
        self._overflow: _Tally | None = None
        self.tallies: list[_Tally] = []  # one per route, and the overflow
        self.server_states: dict[str, str] = {}  # server id -> its state now
        self._state_attrs: dict[tuple[str, ...], Attrs] = {}
        self._tracer: Tracer | None = _tracer(tracer_provider) if traces else None
        self._instruments: _Instruments | None = None
        if metrics:
            self._instruments = _instruments_for(meter_provider)
            self._instruments.add(self, self.tallies)

    def __repr__(self) -> str:
        return (f"OpenTelemetryObserver(metrics={self.metrics_enabled}, "
                f"traces={self.traces_enabled})")

    # -- calls ----------------------------------------------------------------------------

    def _new_route(self, interface: str, method: str, server_id: str) -> _Route:
        if len(self._routes) < MAX_ROUTES:
            route = _Route(interface, method, server_id, None)
            self._routes[(interface, method, server_id)] = route
            self.tallies.append(route.tally)
            return route
        if self._overflow is None:
            self._overflow = _Tally(("", "", ""), {ATTR_OVERFLOW: True})
            self.tallies.append(self._overflow)
        return _Route(interface, method, server_id, self._overflow)  # not kept

    def call_started(self, grain_id: GrainId, method: str, server_id: str) -> Any:
        interface = grain_id.interface
        route = self._routes.get((interface, method, server_id))
        if route is None:
            route = self._new_route(interface, method, server_id)
        route.tally.in_flight += 1
        tracer = self._tracer
        if tracer is None:
            return (route, None, _clock())
        outer = CALL_SPAN.get()
        if outer is not None and outer[0] is grain_id:
            # the interceptor's span of this call: one span per call, ours adds the server
            # (of the last attempt) and leaves ending and the status to the interceptor
            span = outer[1]
            if span.is_recording():
                span.set_attribute(ATTR_SERVER_ID, server_id)
            return (route, None, _clock())
        attrs = route.span_attrs.copy()
        attrs[ATTR_GRAIN_KEY_HASH] = f"{grain_id.stable_hash:016x}"
        return (route, tracer.start_span(route.span_name, kind=SpanKind.CLIENT,
                                         attributes=attrs), _clock())

    def call_finished(self, context: Any, error: BaseException | None) -> None:
        route, span, started = context
        elapsed = _clock() - started
        tally = route.tally
        tally.in_flight -= 1
        instruments = self._instruments
        if error is None:
            tally.ok += 1
            if instruments is not None:
                instruments.duration.record(elapsed, route.ok_attrs)
            if span is not None:
                span.end()
            return
        type_name = type(error).__name__
        errors = tally.errors
        errors[type_name] = errors.get(type_name, 0) + 1
        attrs, status = route.error(type_name)
        if instruments is not None:
            instruments.duration.record(elapsed, attrs)
        if span is not None:
            if span.is_recording():
                # The type only: an error's message may carry grain keys or user data.
                span.set_attribute(ATTR_ERROR_TYPE, type_name)
                remote = getattr(error, "type_name", None)
                if isinstance(remote, str):
                    span.set_attribute(ATTR_REMOTE_ERROR_TYPE, remote)
                span.set_status(status)
            span.end()

    # -- servers --------------------------------------------------------------------------

    def server_state_changed(self, view: Any, old: str, new: str) -> None:
        """Note the server's state for `forkcore.client.servers` and count the change.
        A server counts in no state before its first change (the client starts every
        server in "connecting" without announcing it), and in none once removed or once
        its client is garbage-collected."""
        instruments = self._instruments
        if instruments is None:
            return
        server_id = view.id
        if new == "removed":
            self.server_states.pop(server_id, None)
        else:
            instruments.server_state(server_id, new)
            self.server_states[server_id] = new
        key = (server_id, old, new)
        attrs = self._state_attrs.get(key)
        if attrs is None:
            attrs = self._state_attrs[key] = {ATTR_SERVER_ID: server_id, ATTR_STATE_FROM: old,
                                              ATTR_STATE_TO: new}
        instruments.state_changes.add(1, attrs)


def _meter(provider: MeterProvider | None) -> Meter:
    return otel_metrics.get_meter(INSTRUMENTATION_NAME, _VERSION, meter_provider=provider)


def _tracer(provider: TracerProvider | None) -> Tracer:
    return otel_trace.get_tracer(INSTRUMENTATION_NAME, _VERSION, tracer_provider=provider)


def _histogram(meter: Meter) -> Histogram:
    description = "Duration of calls from sending to the reply, in seconds"
    try:
        return meter.create_histogram(METRIC_DURATION, unit="s", description=description,
                                      explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
    except TypeError:  # pragma: no cover - an API older than 1.23 has no bucket advice
        return meter.create_histogram(METRIC_DURATION, unit="s", description=description)


def opentelemetry_observer(**options: Any) -> OpenTelemetryObserver:
    """The factory registered as observer `opentelemetry`: called with the client's
    `observer_options["opentelemetry"]`."""
    check_options("observer 'opentelemetry'", options, OPTIONS)
    for flag in ("metrics", "traces"):
        if not isinstance(options.get(flag, True), bool):
            raise ConfigError(f"observer 'opentelemetry': option {flag!r} must be true or "
                              f"false, not {options[flag]!r}")
    check_provider("observer 'opentelemetry'", options, "meter_provider", "get_meter",
                   "opentelemetry.metrics.MeterProvider")
    check_provider("observer 'opentelemetry'", options, "tracer_provider", "get_tracer",
                   "opentelemetry.trace.TracerProvider")
    return OpenTelemetryObserver(**options)


def check_options(label: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """`ConfigError` naming the first option `label` does not have, and those it has."""
    known = tuple(known)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"{label} has no option {unknown[0]!r}; its options are: "
                          f"{', '.join(known)}")


def check_provider(label: str, options: Mapping[str, Any], name: str, method: str,
                   kind: str) -> None:
    """`ConfigError` unless option `name`, if given, is a provider (has `method`)."""
    provider = options.get(name)
    if provider is not None and not hasattr(provider, method):
        raise ConfigError(f"{label}: option {name!r} must be an {kind} (pass it from "
                          f"Python), not {provider!r}")
