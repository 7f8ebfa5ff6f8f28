"""Registers the strategies and affinity policies of `forkcore-strategies` with forkcore
(entry point `strategies` in group `forkcore`)."""

from __future__ import annotations

from collections.abc import Callable

from forkcore import hookimpl
from forkcore.interfaces import (
    AffinityPolicy,
    RegisterAffinityPolicy,
    RegisterStrategy,
    Strategy,
)

from ._options import factory
from .consistent_hash import ConsistentHash
from .grain_type_affinity import GrainTypeAffinity
from .least_loaded import LeastLoaded
from .lowest_latency import LowestLatency
from .round_robin import RoundRobin
from .sticky import Sticky
from .zone import Zone

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "round_robin": RoundRobin,
    "consistent_hash": ConsistentHash,
    "grain_type_affinity": GrainTypeAffinity,
    "lowest_latency": LowestLatency,
    "least_loaded": LeastLoaded,
}
AFFINITY_POLICIES: dict[str, Callable[..., AffinityPolicy]] = {
    "sticky": Sticky,
    "zone": Zone,
}


@hookimpl
def forkcore_register_strategies(register: RegisterStrategy) -> None:
    for name, cls in STRATEGIES.items():
        register(name, factory("strategy", name, cls))


@hookimpl
def forkcore_register_affinity_policies(register: RegisterAffinityPolicy) -> None:
    for name, cls in AFFINITY_POLICIES.items():
        register(name, factory("affinity policy", name, cls))
