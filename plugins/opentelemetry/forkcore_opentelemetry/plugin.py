"""Hook implementations: the module the `forkcore` entry point names."""

from __future__ import annotations

from forkcore import hookimpl
from forkcore.interfaces import RegisterInterceptor, RegisterObserver

from .interceptor import opentelemetry_interceptor
from .observer import opentelemetry_observer


@hookimpl
def forkcore_register_observers(register: RegisterObserver) -> None:
    register("opentelemetry", opentelemetry_observer)


@hookimpl
def forkcore_register_interceptors(register: RegisterInterceptor) -> None:
    register("opentelemetry", opentelemetry_interceptor)
