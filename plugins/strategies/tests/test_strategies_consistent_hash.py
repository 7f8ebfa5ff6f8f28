"""consistent_hash: minimal disruption, balance, determinism, bounded loads."""

from __future__ import annotations

import hashlib
import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from forkcore_strategies import ConsistentHash
from forkcore_strategies.ring import HashRing, ring_for

from forkcore import GrainId, ServerView


def views(ids: list[str]) -> list[ServerView]:
    return [ServerView(id=i, endpoint=f"10.0.0.{n}:7000", healthy=True, state="healthy")
            for n, i in enumerate(ids)]


IDS = [f"server-{i}" for i in range(10)]
KEYS_20K = [GrainId("game", k) for k in range(20_000)]


def mapping(strategy: ConsistentHash, servers: list[ServerView],
            keys: list[GrainId]) -> list[str]:
    return [strategy.select(g, servers) for g in keys]


def test_leaving_server_moves_only_its_keys() -> None:
    strategy = ConsistentHash()
    before = mapping(strategy, views(IDS), KEYS_20K)
    for gone in ("server-0", "server-4", "server-9"):
        after = mapping(strategy, views([i for i in IDS if i != gone]), KEYS_20K)
        moved = [k for k, (b, a) in enumerate(zip(before, after, strict=True)) if b != a]
        owned = [k for k, b in enumerate(before) if b == gone]
        assert moved == owned  # exactly its keys, no others
        assert len(moved) <= 1.3 / len(IDS) * len(KEYS_20K)
        print(f"{gone} left: {len(moved)} of {len(KEYS_20K)} keys moved "
              f"({len(moved) / len(KEYS_20K):.3f}, 1/N = {1 / len(IDS):.3f})")


def test_joining_server_takes_keys_only_onto_itself() -> None:
    strategy = ConsistentHash()
    before = mapping(strategy, views(IDS), KEYS_20K)
    for new in ("server-10", "joiner", "10.1.2.3:11111"):
        after = mapping(strategy, views([*IDS, new]), KEYS_20K)
        moved = [k for k, (b, a) in enumerate(zip(before, after, strict=True)) if b != a]
        assert all(after[k] == new for k in moved)
        assert moved == [k for k, a in enumerate(after) if a == new]
        assert 0 < len(moved) <= 1.3 / (len(IDS) + 1) * len(KEYS_20K)
        print(f"{new} joined: {len(moved)} of {len(KEYS_20K)} keys moved")


@pytest.mark.parametrize("ids", [
    IDS,
    [f"10.0.0.{i}:11111" for i in range(1, 11)],
    [f"node-{c}" for c in "abcdefghij"],
])
def test_balance_over_100k_keys(ids: list[str]) -> None:
    strategy = ConsistentHash()
    servers = views(ids)
    counts = Counter(strategy.select(GrainId("game", k), servers) for k in range(100_000))
    mean = 100_000 / len(ids)
    worst = max(counts.values()) / mean
    print(f"max/mean over 100000 keys, 10 servers: {worst:.3f} "
          f"(min/mean {min(counts.values()) / mean:.3f})")
    assert len(counts) == len(ids)
    assert worst <= 1.25


def test_same_mapping_whatever_the_list_order() -> None:
    keys = KEYS_20K[:5000]
    expected = mapping(ConsistentHash(), views(IDS), keys)
    rng = random.Random(7)
    for _ in range(3):
        shuffled = IDS[:]
        rng.shuffle(shuffled)
        assert mapping(ConsistentHash(), views(shuffled), keys) == expected


_DIGEST_SCRIPT = """
import hashlib, random, sys
from forkcore import GrainId, ServerView
from forkcore_strategies import ConsistentHash
ids = [f"server-{i}" for i in range(10)]
random.Random(int(sys.argv[1])).shuffle(ids)
servers = [ServerView(id=i, endpoint="x:1", healthy=True) for i in ids]
s = ConsistentHash()
keys = [GrainId("game", k) for k in range(3000)]
keys += [GrainId("chat", f"room-{k}") for k in range(1000)]
print(hashlib.sha256("\\n".join(s.select(g, servers) for g in keys).encode()).hexdigest())
"""


def test_same_mapping_in_every_process() -> None:
    servers = views(IDS)
    keys = [GrainId("game", k) for k in range(3000)] + \
        [GrainId("chat", f"room-{k}") for k in range(1000)]
    strategy = ConsistentHash()
    here = hashlib.sha256("\n".join(strategy.select(g, servers) for g in keys).encode()
                          ).hexdigest()
    for seed, order in (("0", "1"), ("12345", "2"), ("random", "3")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT, order], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == here


def test_result_is_always_a_candidate_and_lists_are_cached_by_identity() -> None:
    strategy = ConsistentHash()
    a = views(IDS)
    b = views(IDS[:3])
    keys = KEYS_20K[:2000]
    for _ in range(2):  # alternate lists, as calls to two interfaces would
        assert {strategy.select(g, a) for g in keys} == set(IDS)
        assert {strategy.select(g, b) for g in keys} == set(IDS[:3])


def test_derived_rings_equal_built_rings() -> None:
    rng = random.Random(3)
    pool = [f"s{i}" for i in range(40)]
    current = set(rng.sample(pool, 12))
    ring = HashRing(current, 64)
    for _ in range(30):
        change = rng.sample(pool, rng.randint(1, 4))
        target = (current ^ set(change)) or {pool[0]}
        derived = ring.derive(target)
        built = HashRing(target, 64)
        assert derived.ids == built.ids
        assert derived.points == built.points
        assert derived.owners == built.owners
        ring, current = derived, target
    assert ring_for(current, 64).owners == HashRing(current, 64).owners


def test_equal_points_are_ordered_by_id_however_the_ring_is_built(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {"a": (10, 20), "b": (10, 30), "c": (20, 40)}  # 10 and 20 collide
    monkeypatch.setattr("forkcore_strategies.ring.vnode_points", lambda sid, v: fake[sid])
    built = HashRing(["c", "b", "a"], 2)
    assert built.points == [10, 10, 20, 20, 30, 40]
    assert built.owners[:-1] == ["a", "b", "a", "c", "b", "c"]
    for start in (["a", "c"], ["b"], ["c"], ["a"]):
        derived = HashRing(start, 2).derive(["a", "b", "c"])
        assert (derived.points, derived.owners) == (built.points, built.owners)
    assert built.lookup(5) == "a" and built.lookup(10) == "a" and built.lookup(45) == "a"


def simulate_bounded(strategy: ConsistentHash, n: int, calls: int, *, completions: bool,
                     seed: int) -> tuple[int, int]:
    """Route `calls` calls with skewed keys, updating in_flight like a client; return
    (calls that left their ring owner, worst overshoot above the exact bound)."""
    rng = random.Random(seed)
    servers = views([f"server-{i}" for i in range(n)])
    plain = ConsistentHash()
    hot = [GrainId("game", k) for k in range(5)]
    cold = [GrainId("game", k) for k in range(5, 5000)]
    c = strategy.load_factor
    assert c is not None
    moved = 0
    overshoot = 0
    for _ in range(calls):
        grain = rng.choice(hot) if rng.random() < 0.6 else rng.choice(cold)
        total = sum(s.in_flight for s in servers)
        bound = math.ceil(c * (total + 1) / n)
        chosen = strategy.select(grain, servers)
        view = next(s for s in servers if s.id == chosen)
        view.in_flight += 1
        overshoot = max(overshoot, view.in_flight - bound)
        if chosen != plain.select(grain, servers):
            moved += 1
        if completions and rng.random() < 0.9:  # at most one completion per call
            rng.choice([s for s in servers if s.in_flight]).in_flight -= 1
    return moved, overshoot


def test_bounded_load_never_exceeds_its_bound_when_counting_every_call() -> None:
    for c in (1.0, 1.25, 2.0):
        strategy = ConsistentHash(load_factor=c, recount_every=1)
        moved, overshoot = simulate_bounded(strategy, 10, 4000, completions=True, seed=1)
        assert overshoot <= 0, c
        assert moved > 0  # hot keys did spill over


def test_bounded_load_estimate_is_exact_without_completions() -> None:
    strategy = ConsistentHash(load_factor=1.25)
    moved, overshoot = simulate_bounded(strategy, 10, 3000, completions=False, seed=2)
    assert overshoot <= 0
    assert moved > 0


def test_bounded_load_estimate_stays_close_with_completions() -> None:
    # Counted every 16 calls; at most 16 completions between counts loosen the bound
    # by at most ceil(c * 16 / N).
    strategy = ConsistentHash(load_factor=1.25)
    _moved, overshoot = simulate_bounded(strategy, 10, 4000, completions=True, seed=3)
    assert overshoot <= math.ceil(1.25 * 16 / 10)


def test_bounded_load_keeps_keys_home_when_nothing_is_busy() -> None:
    bounded = ConsistentHash(load_factor=1.25)
    plain = ConsistentHash()
    servers = views(IDS)
    for s in servers:
        s.in_flight = 3  # evenly loaded: nobody above the bound
    keys = KEYS_20K[:3000]
    assert mapping(bounded, servers, keys) == mapping(plain, servers, keys)


def test_memory_follows_interfaces_not_list_changes() -> None:
    strategy = ConsistentHash()
    grain = GrainId("game", 1)
    for n in range(40):  # forty membership changes of one interface's candidates
        strategy.select(grain, views([f"server-{i}" for i in range(n % 7, n % 7 + 5)]))
    other = views(IDS)
    strategy.select(GrainId("chat", 1), other)
    assert len(strategy._cache._entries) == 2  # one list kept per interface
