"""OpenTelemetry metrics and spans for forkcore clients (observer `opentelemetry`)."""

from .observer import OpenTelemetryObserver, opentelemetry_observer

__all__ = ["OpenTelemetryObserver", "opentelemetry_observer"]
