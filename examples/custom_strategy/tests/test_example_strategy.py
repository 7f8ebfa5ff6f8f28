"""Strategy `weighted_rendezvous`: the object on its own, its options, and in a cluster.

Run from this folder with `python -m pytest` (after `pip install -e ".[test]"`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from forkcore_example_strategy import WeightedRendezvous, plugin, weighted_rendezvous

import forkcore
from forkcore.errors import ConfigError
from forkcore.plugins import get_plugin_manager, registrations

KEYS = [forkcore.GrainId("game", k) for k in range(10_000)]


def view(server_id: str, **metadata: Any) -> forkcore.ServerView:
    return forkcore.ServerView(id=server_id, endpoint=f"{server_id}.example:7000",
                               metadata=metadata, healthy=True, state="healthy")


def owners(strategy: WeightedRendezvous, servers: list[forkcore.ServerView]) -> list[str]:
    return [strategy.select(g, servers) for g in KEYS]


# -- the strategy object ------------------------------------------------------------------


def test_same_grain_same_server_whatever_the_order_or_instance() -> None:
    servers = [view(f"s{i}", weight=i + 1) for i in range(5)]
    first = owners(WeightedRendezvous(), servers)
    assert owners(WeightedRendezvous(), servers[::-1]) == first
    assert set(first) == {s.id for s in servers}


def test_the_mapping_is_the_same_in_every_process() -> None:
    # it depends on nothing but grain ids, server ids and weights: not on PYTHONHASHSEED,
    # the process or the machine (these owners were computed once, elsewhere)
    servers = [view("a"), view("b"), view("c")]
    strategy = WeightedRendezvous()
    by_int = [strategy.select(forkcore.GrainId("game", k), servers) for k in range(8)]
    by_str = [strategy.select(forkcore.GrainId("game", str(k)), servers) for k in range(8)]
    assert "".join(by_int) == "baacbabc"
    assert "".join(by_str) == "bbaccccc"  # 1 and "1" are different grains


@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 2, 3, 4], [5, 1]])
def test_shares_follow_the_weights(weights: list[int]) -> None:
    servers = [view(f"s{i}", weight=w) for i, w in enumerate(weights)]
    tally = Counter(owners(WeightedRendezvous(), servers))
    total = sum(weights)
    for server, weight in zip(servers, weights, strict=True):
        share = tally[server.id] / len(KEYS)
        assert share == pytest.approx(weight / total, abs=0.02), (server.id, tally)


def test_without_metadata_a_server_weighs_default_weight() -> None:
    servers = [view("light"), view("heavy", weight=3)]
    tally = Counter(owners(WeightedRendezvous(), servers))
    assert tally["heavy"] / len(KEYS) == pytest.approx(0.75, abs=0.02)
    tally = Counter(owners(WeightedRendezvous(default_weight=3), servers))
    assert tally["heavy"] / len(KEYS) == pytest.approx(0.5, abs=0.02)


def test_weights_option_and_metadata_key() -> None:
    servers = [view("a", weight=1, capacity=1), view("b", weight=1, capacity=9)]
    assert Counter(owners(WeightedRendezvous(metadata_key="capacity"), servers))["b"] \
        / len(KEYS) == pytest.approx(0.9, abs=0.02)
    # `weights` beats the metadata
    only_a = WeightedRendezvous(weights={"b": 0}, metadata_key="capacity")
    assert set(owners(only_a, servers)) == {"a"}


def test_weight_zero_drains_unless_every_server_weighs_zero() -> None:
    servers = [view("a", weight=0), view("b", weight=2), view("c", weight=0.0)]
    assert set(owners(WeightedRendezvous(), servers)) == {"b"}
    drained = [view("a", weight=0), view("b", weight=0)]
    assert set(owners(WeightedRendezvous(), drained)) == {"a", "b"}


def test_leaving_and_joining_move_only_what_they_must() -> None:
    servers = [view(f"s{i}", weight=1 + i % 3) for i in range(6)]
    strategy = WeightedRendezvous()
    before = owners(strategy, servers)
    after = owners(strategy, [s for s in servers if s.id != "s2"])
    for old, new in zip(before, after, strict=True):
        assert old == new or old == "s2"
    joined = owners(strategy, [*servers, view("s9", weight=2)])
    for old, new in zip(before, joined, strict=True):
        assert old == new or new == "s9"
    assert Counter(joined)["s9"] / len(KEYS) == pytest.approx(2 / 14, abs=0.02)


@pytest.mark.parametrize("bad", ["heavy", -1, float("nan"), True, [3]])
def test_a_bad_announced_weight_warns_once_and_uses_the_default(
        bad: object, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "forkcore_example_strategy")
    strategy = WeightedRendezvous(default_weight=2)
    odd = view("odd", weight=bad)
    assert strategy.weight(odd) == 2.0
    assert strategy.weight(odd) == 2.0
    [record] = caplog.records
    assert "server odd" in record.getMessage() and "default_weight" in record.getMessage()


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"weight": {"a": 1}}, "has no option 'weight'; its options are: default_weight, "
                           "metadata_key, weights"),
    ({"weights": [1, 2]}, "option 'weights' must be a table of server id = weight"),
    ({"weights": {"a": -1}}, "option 'weights.a' must be a finite number >= 0, not -1"),
    ({"weights": {"a": "2"}}, "option 'weights.a' must be a finite number >= 0"),
    ({"weights": {1: 2}}, "keys are server ids"),
    ({"metadata_key": ""}, "option 'metadata_key' must be a non-empty string"),
    ({"default_weight": float("inf")}, "option 'default_weight' must be a finite number"),
    ({"default_weight": False}, "option 'default_weight' must be a finite number"),
])
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        weighted_rendezvous(**options)
    assert message in str(info.value)


def test_good_options_are_kept() -> None:
    strategy = weighted_rendezvous(weights={"a": 2, "b": 0.5}, metadata_key="w",
                                   default_weight=0)
    assert strategy.weights == {"a": 2.0, "b": 0.5}
    assert (strategy.metadata_key, strategy.default_weight) == ("w", 0.0)


# -- through forkcore: registration, configuration, a running cluster ---------------------


@pytest.fixture
def registered() -> Iterator[None]:
    """The plugin registered with forkcore: already so when the package is installed (the
    entry point loaded it), else registered here for the test and removed after."""
    pm = get_plugin_manager()
    if pm.is_registered(plugin):
        yield
        return
    pm.register(plugin, name="forkcore-example-strategy")
    try:
        yield
    finally:
        pm.unregister(plugin)


@pytest.mark.usefixtures("registered")
def test_registered_under_its_name() -> None:
    [reg] = [r for r in registrations("strategy") if r.name == "weighted_rendezvous"]
    assert reg.factory is weighted_rendezvous
    assert reg.source == "forkcore-example-strategy"


@pytest.mark.usefixtures("registered")
def test_a_client_names_the_option_that_is_wrong() -> None:
    with pytest.raises(ConfigError) as info:
        forkcore.Client(mode="multi", servers=["127.0.0.1:1"], transport="memory",
                        strategy="weighted_rendezvous", strategy_options={"wieghts": {}})
    message = str(info.value)
    assert "strategy_options" in message and "'wieghts'" in message
    assert "its options are: default_weight, metadata_key, weights" in message


class ICounter(forkcore.GrainInterface, name="example.counter"):
    async def add(self, amount: int) -> int: ...


class CounterGrain(forkcore.Grain, ICounter):
    def __init__(self) -> None:
        self.total = 0

    async def add(self, amount: int) -> int:
        self.total += amount
        return self.total


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "trio":
        pytest.importorskip("trio")
    return str(request.param)


@pytest.mark.anyio
@pytest.mark.usefixtures("registered")
async def test_in_a_cluster_calls_follow_the_weights(forkcore_cluster: Any) -> None:
    client_options = {"mode": "multi", "strategy": "weighted_rendezvous",
                      "strategy_options": {"weights": {"s1": 0, "s3": 0}}}
    async with forkcore_cluster([CounterGrain], servers=3,
                                client_options=client_options) as cluster:
        client = cluster.client
        assert isinstance(client.strategy, WeightedRendezvous)
        assert sorted(s.id for s in client.servers) == ["s1", "s2", "s3"]
        for key in range(20):
            assert client.route(ICounter, key) == "s2"
            counter = client.get_grain(ICounter, key)
            assert await counter.add(2) == 2
            assert await counter.add(3) == 5  # one activation: same server every time
