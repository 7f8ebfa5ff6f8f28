"""OpenTelemetry for forkcore: metrics and client spans (observer `opentelemetry`), and
W3C trace context across calls with client and server spans (interceptor
`opentelemetry`)."""

from .interceptor import OpenTelemetryInterceptor, opentelemetry_interceptor
from .observer import OpenTelemetryObserver, opentelemetry_observer

__all__ = ["OpenTelemetryInterceptor", "OpenTelemetryObserver", "opentelemetry_interceptor",
           "opentelemetry_observer"]
