"""Observers see every call and every server state change, and cannot break calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from grains_sample import Counter, ICounter, IWhere, located
from test_multi import hosts, wait_until

import forkcore
from forkcore.errors import ConfigError, RemoteError
from forkcore.plugins import get_plugin_manager

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self, **options: Any) -> None:
        self.options = options
        self.calls: list[tuple[str, str, str, str | None]] = []
        self.states: list[tuple[str, str, str]] = []

    def call_started(self, grain_id: forkcore.GrainId, method: str, server_id: str) -> Any:
        return (str(grain_id), method, server_id)

    def call_finished(self, context: Any, error: BaseException | None) -> None:
        self.calls.append((*context, None if error is None else type(error).__name__))

    def server_state_changed(self, view: forkcore.ServerView, old: str, new: str) -> None:
        self.states.append((view.id, old, new))


class Broken:
    def call_started(self, grain_id: Any, method: str, server_id: str) -> Any:
        raise RuntimeError("observer bug")


async def test_observer_objects_see_calls_and_errors(forkcore_cluster: Any) -> None:
    recorder = Recorder()
    # the project's own pytest plugin: an in-process server and a connected client
    async with forkcore_cluster([Counter], client_options={
            "observers": [recorder, Broken()]}) as cluster:
        counter = cluster.client.get_grain(ICounter, "k")
        assert await counter.add(2) == 2
        with pytest.raises(RemoteError):
            await counter.fail("no")
    assert recorder.calls == [("test.counter/'k'", "add", "s1", None),
                              ("test.counter/'k'", "fail", "s1", "RemoteError")]


async def test_observer_sees_each_state_change_once() -> None:
    recorder = Recorder()
    async with hosts("memory") as h:
        eps = [await h.start("a", grains=[located("a")]), await h.start("b")]
        async with forkcore.Client(mode="multi", servers=eps, transport="memory",
                                   strategy="round_robin", observers=[recorder],
                                   reconnect_initial_delay=0.05) as client:
            h.stop("b")
            await wait_until(lambda: ("b", "draining", "unhealthy") in recorder.states)
            assert await client.get_grain(IWhere, 1).where() == "a"
    assert recorder.states.count(("b", "healthy", "draining")) == 1
    assert recorder.states.count(("b", "draining", "unhealthy")) == 1


@pytest.fixture
def registered_recorder() -> Iterator[None]:
    class Plugin:
        @forkcore.hookimpl
        def forkcore_register_observers(self, register: Any) -> None:
            register("recorder", Recorder)

    plugin = Plugin()
    get_plugin_manager().register(plugin, name="test-observers")
    yield
    get_plugin_manager().unregister(plugin)


@pytest.mark.usefixtures("registered_recorder")
def test_observers_are_plugins_enabled_by_name() -> None:
    client = forkcore.Client(servers=["127.0.0.1:1"], transport="memory",
                             observers=["recorder"],
                             observer_options={"recorder": {"sample": 0.5}})
    [(observer, _)] = client._observers._started
    assert isinstance(observer, Recorder) and observer.options == {"sample": 0.5}
    with pytest.raises(ConfigError, match="observer 'nope' is not installed"):
        forkcore.Client(servers=["127.0.0.1:1"], transport="memory", observers=["nope"])
