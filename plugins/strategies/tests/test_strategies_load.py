"""round_robin, least_loaded and lowest_latency."""

from __future__ import annotations

from collections import Counter

import pytest
from forkcore_strategies import LeastLoaded, LowestLatency, RoundRobin

from forkcore import GrainId, ServerView

GRAIN = GrainId("game", 1)


def views(n: int, **attrs: object) -> list[ServerView]:
    return [ServerView(id=f"server-{i}", endpoint=f"10.0.0.{i}:7000", healthy=True,
                       state="healthy", **attrs)  # type: ignore[arg-type]
            for i in range(n)]


# -- round_robin ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_round_robin_is_fair_over_k_times_n_calls(n: int, k: int) -> None:
    servers = views(n)
    strategy = RoundRobin()
    counts = Counter(strategy.select(GRAIN, servers) for _ in range(k * n))
    assert set(counts.values()) == {k}
    assert len(counts) == n


def test_round_robin_is_fair_to_one_over_any_run_of_calls() -> None:
    servers = views(7)
    strategy = RoundRobin(seed=5)
    counts: Counter[str] = Counter()
    for _ in range(200):
        counts[strategy.select(GRAIN, servers)] += 1
        assert max(counts.values()) - min(counts[s.id] for s in servers) <= 1


def test_round_robin_starts_at_a_random_offset_per_instance() -> None:
    servers = views(10)
    firsts = {RoundRobin().select(GRAIN, servers) for _ in range(50)}
    assert len(firsts) > 1
    assert RoundRobin(seed=3).select(GRAIN, servers) == RoundRobin(seed=3).select(GRAIN, servers)


def test_round_robin_follows_list_changes() -> None:
    strategy = RoundRobin(seed=1)
    small = views(3)
    assert {strategy.select(GRAIN, small) for _ in range(3)} == {s.id for s in small}
    large = views(5)
    assert {strategy.select(GRAIN, large) for _ in range(5)} == {s.id for s in large}


# -- least_loaded --------------------------------------------------------------------


def test_least_loaded_prefers_low_in_flight() -> None:
    servers = views(5)
    for s, load in zip(servers, (0, 4, 4, 4, 9), strict=True):
        s.in_flight = load
    strategy = LeastLoaded(seed=1)
    counts = Counter(strategy.select(GRAIN, servers) for _ in range(10_000))
    # server-0 wins every draw it is in: 2 of 5 servers drawn -> 40 %
    assert 0.36 < counts["server-0"] / 10_000 < 0.44
    assert counts["server-0"] == max(counts.values())
    assert counts["server-4"] == 0  # the busiest never wins a draw


def test_least_loaded_balances_under_feedback() -> None:
    servers = views(10)
    strategy = LeastLoaded(seed=2)
    for _ in range(1000):  # calls that never complete: the loads must stay level
        chosen = strategy.select(GRAIN, servers)
        next(s for s in servers if s.id == chosen).in_flight += 1
    loads = [s.in_flight for s in servers]
    assert max(loads) - min(loads) <= 3


def test_least_loaded_single_server() -> None:
    assert LeastLoaded().select(GRAIN, views(1)) == "server-0"


# -- lowest_latency ------------------------------------------------------------------


def with_rtts(rtts: list[float | None]) -> list[ServerView]:
    servers = views(len(rtts))
    for s, rtt in zip(servers, rtts, strict=True):
        s.rtt = rtt
    return servers


def test_lowest_latency_gives_most_but_not_all_traffic_to_the_fastest() -> None:
    servers = with_rtts([0.008, 0.001, 0.002, 0.004, 0.016])
    strategy = LowestLatency(seed=1)
    counts = Counter(strategy.select(GRAIN, servers) for _ in range(20_000))
    share = {k: v / 20_000 for k, v in counts.items()}
    print("lowest_latency shares by rtt 8/1/2/4/16 ms:",
          {k: round(v, 3) for k, v in sorted(share.items())})
    assert counts.most_common(1)[0][0] == "server-1"
    assert 0.35 < share["server-1"] < 0.5  # wins every draw it is in (2 of 5)
    assert share["server-1"] > share["server-2"] > share["server-3"] > share["server-0"]
    assert share["server-4"] < 0.02  # the slowest only gets the explore trickle


def test_lowest_latency_never_gives_everything_even_to_one_of_two() -> None:
    servers = with_rtts([0.001, 0.010])
    strategy = LowestLatency(seed=2)
    counts = Counter(strategy.select(GRAIN, servers) for _ in range(10_000))
    assert 0.97 < counts["server-0"] / 10_000 < 1.0
    assert counts["server-1"] > 0
    strict = LowestLatency(seed=2, explore=0)
    assert {strict.select(GRAIN, servers) for _ in range(1000)} == {"server-0"}


def test_lowest_latency_weighs_load() -> None:
    servers = with_rtts([0.001, 0.004])
    servers[0].in_flight = 9  # 1 ms * 10 > 4 ms * 1
    strategy = LowestLatency(seed=3, explore=0)
    assert strategy.select(GRAIN, servers) == "server-1"
    servers[0].in_flight = 2  # 1 ms * 3 < 4 ms * 1
    assert strategy.select(GRAIN, servers) == "server-0"


def test_lowest_latency_tries_servers_without_rtt() -> None:
    servers = with_rtts([0.002, 0.003, None])  # a new server: counts as the best, 2 ms
    strategy = LowestLatency(seed=4, explore=0)
    counts = Counter(strategy.select(GRAIN, servers) for _ in range(6000))
    assert counts["server-2"] > 1000
    nothing_known = with_rtts([None, None, None])
    assert len({strategy.select(GRAIN, nothing_known) for _ in range(200)}) == 3


def test_lowest_latency_peak_ewma_reacts_at_once_and_forgets_slowly() -> None:
    now = [100.0]
    strategy = LowestLatency(seed=5, explore=0, decay=10.0)
    strategy.clock = lambda: now[0]
    servers = with_rtts([0.002, 0.003])
    assert strategy.select(GRAIN, servers) == "server-0"
    servers[0].rtt = 0.050  # a spike: taken at once
    assert strategy.select(GRAIN, servers) == "server-1"
    servers[0].rtt = 0.002  # back to normal: the peak decays with time
    now[0] += 1.0  # 50 -> 2 + 48 * e^-0.1 ~ 45 ms: still worse
    assert strategy.select(GRAIN, servers) == "server-1"
    now[0] += 60.0  # 6 time constants later: ~2.1 ms, better again
    assert strategy.select(GRAIN, servers) == "server-0"
