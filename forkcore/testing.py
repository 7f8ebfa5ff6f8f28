"""The `forkcore` pytest plugin: in-process clusters for testing your own grains.

    async def test_counter(forkcore_cluster):
        async with forkcore_cluster([Counter]) as cluster:
            assert await cluster.client.get_grain(ICounter, "k").add(1) == 1

`cluster(...)` can also be used without pytest. Servers and client are stopped when the
block ends; everything runs on whichever anyio backend the test runs on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import attrs

from .client.client import Client
from .server.server import Server


@attrs.define
class Cluster:
    """Running servers and a client connected to them."""

    servers: list[Server]
    client: Client

    @property
    def endpoints(self) -> list[str]:
        return [s.endpoint or "" for s in self.servers]


async def _host(server: Server, stop: anyio.Event, *,
                task_status: anyio.abc.TaskStatus[Server] = anyio.TASK_STATUS_IGNORED) -> None:
    async with server:
        task_status.started(server)
        await stop.wait()


@asynccontextmanager
async def cluster(grains: Iterable[Any], *, servers: int = 1, transport: str = "memory",
                  server_options: Mapping[str, Any] | None = None,
                  client_options: Mapping[str, Any] | None = None) -> AsyncIterator[Cluster]:
    """Start `servers` servers hosting `grains` on `transport` (ids s1, s2, ...), and a
    client connected to them; stop everything on exit."""
    grains = list(grains)
    stop = anyio.Event()
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        try:
            running = [await tg.start(_host, Server(id=f"s{i + 1}", transport=transport,
                                                    grains=grains, **dict(server_options or {})),
                                      stop)
                       for i in range(servers)]
            options = {"servers": [s.endpoint for s in running], "transport": transport,
                       **dict(client_options or {})}
            async with Client(**options) as client:
                try:
                    yield Cluster(running, client)
                except Exception as exc:
                    error = exc  # re-raised as is, not wrapped in an exception group
        finally:
            stop.set()
    if error is not None:
        raise error


try:  # the fixture exists only where pytest does; `cluster` works without it
    import pytest
except ImportError:  # pragma: no cover
    pass
else:
    @pytest.fixture
    def forkcore_cluster() -> Callable[..., Any]:
        """The `forkcore.testing.cluster` factory:
        `async with forkcore_cluster([Grain]) as c:`."""
        return cluster
