"""Every async test runs on asyncio and on trio. The tests need the OpenTelemetry SDK
(the `test` extra of forkcore-opentelemetry)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

try:
    import opentelemetry.sdk  # noqa: F401
except ImportError as exc:  # say what to install rather than fail on a helper's import
    raise ImportError("the forkcore-opentelemetry tests need the OpenTelemetry SDK: "
                      "pip install './plugins/opentelemetry[test]'") from exc

from otel_helpers import Telemetry


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    """SDK tracer and meter providers exporting to memory, shut down after the test."""
    telemetry = Telemetry()
    try:
        yield telemetry
    finally:
        telemetry.shutdown()
