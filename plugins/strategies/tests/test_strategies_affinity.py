"""grain_type_affinity, and the affinity policies sticky and zone."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from forkcore_strategies import ConsistentHash, GrainTypeAffinity, RoundRobin, Sticky, Zone

from forkcore import Affinity, AffinityMode, GrainId, ServerView
from forkcore.errors import ConfigError


def views(ids: list[str], zones: list[str | None] | None = None) -> list[ServerView]:
    zones = zones or [None] * len(ids)
    return [ServerView(id=i, endpoint=f"10.0.0.{n}:7000", zone=z, healthy=True,
                       state="healthy") for n, (i, z) in enumerate(zip(ids, zones, strict=True))]


IDS = [f"server-{i}" for i in range(10)]


# -- grain_type_affinity -------------------------------------------------------------


def test_all_grains_of_an_interface_on_one_server() -> None:
    strategy = GrainTypeAffinity()
    servers = views(IDS)
    for interface in ("game", "chat", "inventory"):
        chosen = {strategy.select(GrainId(interface, k), servers) for k in range(2000)}
        assert len(chosen) == 1
    spread = {strategy.select(GrainId(f"iface-{i}", 0), servers) for i in range(60)}
    assert len(spread) >= 6  # different interfaces land on different servers


def test_grain_type_affinity_is_order_independent_and_falls_back_along_the_ring() -> None:
    strategy = GrainTypeAffinity()
    servers = views(IDS)
    home = {f"iface-{i}": strategy.select(GrainId(f"iface-{i}", 0), servers)
            for i in range(40)}
    shuffled = IDS[:]
    random.Random(1).shuffle(shuffled)
    other = GrainTypeAffinity()
    assert {i: other.select(GrainId(i, 0), views(shuffled)) for i in home} == home
    gone = home["iface-0"]
    fewer = views([i for i in IDS if i != gone])
    after = {i: strategy.select(GrainId(i, 0), fewer) for i in home}
    assert after["iface-0"] != gone
    # only the interfaces of the server that left move
    assert {i for i in home if after[i] != home[i]} == {i for i in home if home[i] == gone}
    assert len({strategy.select(GrainId("iface-0", k), fewer) for k in range(500)}) == 1


def test_grain_type_affinity_mapping_and_its_fallback() -> None:
    strategy = GrainTypeAffinity(mapping={"game": "server-3", "chat": "nowhere"})
    servers = views(IDS)
    assert {strategy.select(GrainId("game", k), servers) for k in range(300)} == {"server-3"}
    hashed = GrainTypeAffinity().select(GrainId("chat", 0), servers)
    assert strategy.select(GrainId("chat", 0), servers) == hashed  # unknown server: ring
    without = views([i for i in IDS if i != "server-3"])
    fallback = {strategy.select(GrainId("game", k), without) for k in range(300)}
    assert len(fallback) == 1 and "server-3" not in fallback
    assert fallback == {GrainTypeAffinity().select(GrainId("game", 0), without)}
    assert strategy.select(GrainId("game", 1), servers) == "server-3"  # and back


# -- sticky --------------------------------------------------------------------------


def route(policy: Sticky | Zone, strategy: object, grain: GrainId,
          servers: list[ServerView]) -> str:
    """What the client does: policy affinity first, else the strategy; then `routed`."""
    affinity = policy.affinity(grain, servers)
    chosen = affinity.server if affinity is not None \
        else strategy.select(grain, servers)  # type: ignore[attr-defined]
    routed = getattr(policy, "routed", None)
    if routed is not None:
        routed(grain, chosen)
    return chosen


def test_sticky_keeps_grains_when_servers_are_added() -> None:
    policy = Sticky()
    strategy = ConsistentHash()
    grains = [GrainId("game", k) for k in range(3000)]
    servers = views(IDS[:5])
    first = {g: route(policy, strategy, g, servers) for g in grains}
    grown = views(IDS)  # five servers join: consistent hashing alone would move ~half
    assert sum(strategy.select(g, grown) != first[g] for g in grains) > 1000
    assert {g: route(policy, strategy, g, grown) for g in grains} == first
    a = policy.affinity(grains[0], grown)
    assert a == Affinity(first[grains[0]], AffinityMode.PREFERRED)


def test_sticky_lets_go_when_the_server_is_gone_and_stays_on_the_new_one() -> None:
    policy = Sticky()
    strategy = RoundRobin(seed=0)
    grain = GrainId("game", "alice")
    servers = views(IDS[:3])
    home = route(policy, strategy, grain, servers)
    assert all(route(policy, strategy, grain, servers) == home for _ in range(10))
    without = views([i for i in IDS[:3] if i != home])
    assert policy.affinity(grain, without) is None
    new_home = route(policy, strategy, grain, without)
    assert new_home != home
    assert policy.affinity(grain, servers) == Affinity(new_home, AffinityMode.PREFERRED)
    assert policy.affinity(GrainId("game", "never-seen"), servers) is None


def test_sticky_memory_is_bounded_lru() -> None:
    policy = Sticky(max_grains=3)
    servers = views(IDS[:2])
    grains = [GrainId("game", k) for k in range(4)]
    for g in grains[:3]:
        policy.routed(g, "server-0")
    policy.routed(grains[0], "server-0")  # grains[0] is now the most recent
    policy.routed(grains[3], "server-1")  # evicts grains[1], the least recent
    assert len(policy) == 3
    assert policy.affinity(grains[1], servers) is None
    assert policy.affinity(grains[0], servers) is not None
    assert policy.affinity(grains[3], servers) == Affinity("server-1", AffinityMode.PREFERRED)


# -- zone ----------------------------------------------------------------------------


ZONED = views([f"eu-{i}" for i in range(4)] + [f"us-{i}" for i in range(4)] + ["plain"],
              ["eu"] * 4 + ["us"] * 4 + [None])


def test_zone_prefers_servers_of_the_grains_zone() -> None:
    policy = Zone(zones={"1": "eu", "2": "us", "room": "us"}, default_zone="eu")
    a1 = policy.affinity(GrainId("game", 1), ZONED)  # int key, TOML string "1"
    assert a1 is not None and a1.server.startswith("eu-")
    assert a1.mode is AffinityMode.PREFERRED
    a2 = policy.affinity(GrainId("game", 2), ZONED)
    assert a2 is not None and a2.server.startswith("us-")
    a3 = policy.affinity(GrainId("chat", "room"), ZONED)
    assert a3 is not None and a3.server.startswith("us-")
    other = policy.affinity(GrainId("game", 99), ZONED)  # default zone
    assert other is not None and other.server.startswith("eu-")


def test_zone_choice_is_stable_spread_and_order_independent() -> None:
    policy = Zone(default_zone="us")
    grains = [GrainId("game", k) for k in range(2000)]
    chosen = [policy.affinity(g, ZONED) for g in grains]
    assert all(a is not None for a in chosen)
    servers = Counter(a.server for a in chosen if a is not None)
    assert set(servers) == {f"us-{i}" for i in range(4)}
    assert min(servers.values()) > 300  # spread over the zone, by consistent hash
    shuffled = ZONED[:]
    random.Random(2).shuffle(shuffled)
    again = Zone(default_zone="us")
    assert [again.affinity(g, shuffled) for g in grains] == chosen


def test_zone_returns_none_without_a_matching_server_or_zone() -> None:
    policy = Zone(zones={"a": "ap"})
    assert policy.affinity(GrainId("game", "a"), ZONED) is None  # no server in "ap"
    assert policy.affinity(GrainId("game", "b"), ZONED) is None  # grain has no zone


def test_zone_of_callable_comes_first() -> None:
    policy = Zone(zone_of=lambda g: "us" if g.interface == "game" else None,
                  zones={"k": "eu"})
    a = policy.affinity(GrainId("game", "k"), ZONED)
    assert a is not None and a.server.startswith("us-")
    b = policy.affinity(GrainId("chat", "k"), ZONED)  # callable says None: zones decide
    assert b is not None and b.server.startswith("eu-")


def test_zone_follows_candidate_changes() -> None:
    policy = Zone(default_zone="eu")
    grain = GrainId("game", 7)
    first = policy.affinity(grain, ZONED)
    assert first is not None
    fewer = [s for s in ZONED if s.id != first.server]
    second = policy.affinity(grain, fewer)
    assert second is not None and second.server != first.server
    assert second.server.startswith("eu-")
    only_us = [s for s in ZONED if s.zone == "us"]
    assert policy.affinity(grain, only_us) is None


def test_zone_needs_some_way_to_find_a_zone() -> None:
    with pytest.raises(ConfigError, match="zones"):
        Zone()
