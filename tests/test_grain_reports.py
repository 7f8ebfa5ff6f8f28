"""A grain's failure leaves a trace on the server: exceptions with their tracebacks at
WARNING (rate-limited per method, with a count of what was held back), timeouts,
cancellations and results that cannot be encoded; and with `debug = true` the caller's
RemoteError carries the server's traceback."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
from serving import CLI, cli_env, start_server, write

import forkcore
from forkcore.errors import RemoteError, RequestTimeout

pytestmark = pytest.mark.anyio
GRAINS_LOG = "forkcore.server.grains"


class IBuggy(forkcore.GrainInterface, name="reports.buggy"):
    async def broken(self) -> int: ...
    @forkcore.rpc(timeout=0.2)
    async def slow(self) -> None: ...
    async def unencodable(self) -> Any: ...
    async def wait(self) -> None: ...


class Buggy(forkcore.Grain, IBuggy):
    async def broken(self) -> int:
        return self.no_such_attribute  # type: ignore[attr-defined, no-any-return]

    async def slow(self) -> None:
        await anyio.sleep(5)

    async def unencodable(self) -> Any:
        return object()

    async def wait(self) -> None:
        await anyio.sleep(5)


def records(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == GRAINS_LOG and needle in r.getMessage()]


async def test_grain_exceptions_are_logged_with_tracebacks_and_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, GRAINS_LOG)
    async with forkcore.Server(id="r1", transport="memory", grains=[Buggy]) as server:
        server.catalog.reports.interval = 0.3
        async with forkcore.Client(servers=[server.endpoint or ""], transport="memory") as c:
            grain = c.get_grain(IBuggy, "b")
            for _ in range(20):
                with pytest.raises(RemoteError, match="AttributeError") as caught:
                    await grain.broken()
            assert caught.value.traceback is None  # debug is off by default
            reported = records(caplog, "raised AttributeError")
            assert len(reported) == 1 and reported[0].levelno == logging.WARNING
            message = reported[0].getMessage()  # the traceback is in the log
            assert "Traceback (most recent call last)" in message and "in broken" in message
            await anyio.sleep(0.35)
            with pytest.raises(RemoteError):
                await grain.broken()
    reported = records(caplog, "raised AttributeError")
    assert len(reported) == 2
    assert "19 more since the last report" in reported[1].getMessage()


async def test_timeouts_cancellations_and_unencodable_results_are_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, GRAINS_LOG)
    async with forkcore.Server(id="r2", transport="memory", grains=[Buggy]) as server:
        async with forkcore.Client(servers=[server.endpoint or ""], transport="memory") as c:
            grain = c.get_grain(IBuggy, "b")
            with pytest.raises(RequestTimeout):
                await grain.slow()
            with pytest.raises(RemoteError, match="WireTypeError"):
                await grain.unencodable()
            with anyio.move_on_after(0.2):
                await c.get_grain(IBuggy, "other").wait()  # the caller gives up
            with anyio.fail_after(5):
                while not (records(caplog, "timed out")
                           and records(caplog, "cancelled by its caller")):
                    await anyio.sleep(0.02)
    assert "reports.buggy" in records(caplog, "cannot cross the wire")[0].getMessage()
    assert records(caplog, "cancelled by its caller")[0].levelno == logging.INFO


async def test_debug_servers_send_their_traceback() -> None:
    async with forkcore.Server(id="r3", transport="memory", grains=[Buggy],
                               debug=True) as server:
        async with forkcore.Client(servers=[server.endpoint or ""], transport="memory") as c:
            with pytest.raises(RemoteError) as caught:
                await c.get_grain(IBuggy, "b").broken()
    trace = caught.value.traceback
    assert trace is not None and "Traceback" in trace
    assert "in broken" in trace and "no_such_attribute" in trace


def test_forkcore_debug_call_prints_the_servers_traceback(tmp_path: Path) -> None:
    server = start_server(tmp_path, "dbg", "debug = true\n")
    try:
        config = write(tmp_path / "client.toml",
                       f'[client]\nservers = ["127.0.0.1:{server.port}"]\n')
        result = subprocess.run([*CLI, "--debug", "call", "-c", str(config), "test.counter",
                                 "k", "fail", '"boom 44"'], cwd=tmp_path, env=cli_env(),
                                capture_output=True, text=True, timeout=20,
                                stdin=subprocess.DEVNULL)
    finally:
        server.stop()
    assert result.returncode != 0 and result.stdout == ""
    assert "the server's traceback" in result.stderr
    assert "in fail" in result.stderr and "ValueError: boom 44" in result.stderr
    # and the server logged it too
    assert "raised ValueError: boom 44" in server.stderr_path.read_text()
