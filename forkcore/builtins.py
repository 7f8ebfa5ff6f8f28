"""The plugins built into the core, registered through the plugin manager like any other."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from .grains import Affinity, GrainId, InterfaceInfo
from .hookspecs import hookimpl
from .interfaces import (
    RegisterAffinityPolicy,
    RegisterConflictResolver,
    RegisterTransport,
)
from .transport import MemoryTransport

log = logging.getLogger("forkcore.resolver")


class HighestVersion:
    """Only servers declaring the highest version of an interface serve it, so a rolling
    upgrade moves traffic to upgraded servers as they join."""

    def resolve(self, interface: str, offers: Mapping[str, InterfaceInfo]) -> Collection[str]:
        if not offers:
            return ()
        top = max(info.version for info in offers.values())
        return {sid for sid, info in offers.items() if info.version == top}


class Union:
    """Every server offering the interface serves it, whatever its version."""

    def resolve(self, interface: str, offers: Mapping[str, InterfaceInfo]) -> Collection[str]:
        return set(offers)


class Strict:
    """Servers whose methods differ from the majority for the same name and version are
    excluded (and reported once), so a half-deployed change never serves calls."""

    def __init__(self) -> None:
        self.excluded: dict[str, set[str]] = {}

    def resolve(self, interface: str, offers: Mapping[str, InterfaceInfo]) -> Collection[str]:
        allowed: set[str] = set()
        excluded: set[str] = set()
        for version in {info.version for info in offers.values()}:
            group = {sid: info.methods for sid, info in offers.items() if info.version == version}
            counts = Counter(group.values())
            majority = max(counts, key=lambda m: (counts[m], sorted(m)))
            for sid, methods in group.items():
                (allowed if methods == majority else excluded).add(sid)
        if excluded != self.excluded.get(interface, set()):
            if excluded:
                log.warning("strict: interface %s: servers %s declare methods that differ from "
                            "the others of the same version; they are excluded",
                            interface, ", ".join(sorted(excluded)))
            self.excluded[interface] = excluded
        return allowed


class NoAffinity:
    """No affinity: every call goes through the strategy."""

    def affinity(self, grain_id: GrainId, servers: Sequence[Any]) -> Affinity | None:
        return None


def _no_options(cls: type) -> Any:
    def factory() -> Any:
        return cls()

    factory.__doc__ = cls.__doc__
    return factory


@hookimpl
def forkcore_register_transports(register: RegisterTransport) -> None:
    register("memory", MemoryTransport)


@hookimpl
def forkcore_register_conflict_resolvers(register: RegisterConflictResolver) -> None:
    register("highest_version", _no_options(HighestVersion))
    register("union", _no_options(Union))
    register("strict", _no_options(Strict))


@hookimpl
def forkcore_register_affinity_policies(register: RegisterAffinityPolicy) -> None:
    register("none", _no_options(NoAffinity))
