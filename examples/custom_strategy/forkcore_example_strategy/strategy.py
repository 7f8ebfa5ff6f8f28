"""Strategy `weighted_rendezvous`: weighted rendezvous (highest random weight) hashing.

For a call to grain g, every candidate server s gets the score

    weight(s) / -ln(u(g, s))

where u(g, s) is a hash of the grain id and the server id mapped into (0, 1), and the
call goes to the server with the highest score. So:

* a grain goes to the same server while the set of candidates is unchanged, in every
  process and on every machine: there is no state and no randomness;
* each server gets a share of the grains proportional to its weight;
* when a server leaves, only the grains it had move; when one joins, only the grains it
  now wins move, all of them onto it.

A server's weight is, in this order: its entry in the option `weights` (server id →
weight), the number under `metadata_key` (default "weight") in the metadata the server
announces (`[server] metadata = { weight = 3 }`), or `default_weight` (default 1).
A weight of 0 drains a server: it gets a grain only if every candidate weighs 0.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, TypeGuard

from forkcore import GrainId, ServerView
from forkcore.errors import ConfigError

log = logging.getLogger("forkcore_example_strategy")

NAME = "weighted_rendezvous"
OPTIONS = ("default_weight", "metadata_key", "weights")
_MASK = (1 << 64) - 1


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_weight(value: object) -> TypeGuard[int | float]:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _check_weight(option: str, value: object) -> float:
    if not _is_weight(value):
        raise ConfigError(f"strategy {NAME!r}: option {option!r} must be a finite number "
                          f">= 0, not {_describe(value)}")
    return float(value)


def _hash64(data: bytes) -> int:
    """64 bits of BLAKE2b: the same in every process, unlike Python's `hash()`."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@lru_cache(maxsize=4096)
def _server_hash(server_id: str) -> int:
    return _hash64(server_id.encode("utf-8", "surrogatepass"))


def _grain_hash(grain_id: GrainId) -> int:
    # repr() tells the key types apart (1 and "1" are different grains) and is stable
    return _hash64(f"{grain_id.interface}\0{grain_id.key!r}".encode("utf-8", "surrogatepass"))


def _unit(grain_hash: int, server_hash: int) -> float:
    """A uniform number in the open interval (0, 1) for one (grain, server) pair."""
    z = ((grain_hash ^ server_hash) + 0x9E3779B97F4A7C15) & _MASK  # splitmix64's mixer
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return ((z >> 11) + 0.5) / (1 << 53)


class WeightedRendezvous:
    """Weighted rendezvous hashing; see the module documentation.

    Options: `weights` (table of server id → weight; overrides the metadata),
    `metadata_key` (the metadata entry holding a server's weight, default "weight"),
    `default_weight` (for servers with neither, default 1)."""

    def __init__(self, *, weights: Mapping[str, float] | None = None,
                 metadata_key: str = "weight", default_weight: float = 1.0) -> None:
        if weights is None:
            weights = {}
        if not isinstance(weights, Mapping):
            raise ConfigError(f"strategy {NAME!r}: option 'weights' must be a table of "
                              f"server id = weight, not {_describe(weights)}")
        self.weights: dict[str, float] = {}
        for server_id, weight in weights.items():
            if not isinstance(server_id, str) or not server_id:
                raise ConfigError(f"strategy {NAME!r}: option 'weights' has the key "
                                  f"{_describe(server_id)}; keys are server ids (strings)")
            self.weights[server_id] = _check_weight(f"weights.{server_id}", weight)
        if not isinstance(metadata_key, str) or not metadata_key:
            raise ConfigError(f"strategy {NAME!r}: option 'metadata_key' must be a non-empty "
                              f"string, not {_describe(metadata_key)}")
        self.metadata_key = metadata_key
        self.default_weight = _check_weight("default_weight", default_weight)
        self._warned: set[tuple[str, str]] = set()

    def weight(self, server: ServerView) -> float:
        """The weight of `server`: option `weights`, then its metadata, then the default."""
        configured = self.weights.get(server.id)
        if configured is not None:
            return configured
        announced = server.metadata.get(self.metadata_key)
        if announced is None:
            return self.default_weight
        if _is_weight(announced):
            return float(announced)
        # A server's metadata is not configuration we can reject: warn once, carry on.
        warning = (server.id, repr(announced))
        if warning not in self._warned:
            self._warned.add(warning)
            log.warning("%s: server %s announces %s = %r, which is not a number >= 0; "
                        "using default_weight %g", NAME, server.id, self.metadata_key,
                        announced, self.default_weight)
        return self.default_weight

    def select(self, grain_id: GrainId, servers: Sequence[ServerView]) -> str:
        weighted = [(self.weight(s), s.id) for s in servers]
        if not any(w > 0 for w, _ in weighted):  # all drained: ignore the weights
            weighted = [(1.0, sid) for _, sid in weighted]
        g = _grain_hash(grain_id)
        best_score, best_id = -1.0, ""
        for w, sid in weighted:
            score = w / -math.log(_unit(g, _server_hash(sid)))
            if score > best_score or (score == best_score and sid > best_id):
                best_score, best_id = score, sid
        return best_id


def weighted_rendezvous(**options: Any) -> WeightedRendezvous:
    """The factory forkcore calls with `[client.strategy_options]`: rejects unknown options
    with a `ConfigError` listing the valid ones, then builds the strategy."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"strategy {NAME!r} has no option "
                          f"{', '.join(repr(u) for u in unknown)}; its options are: "
                          f"{', '.join(OPTIONS)}")
    return WeightedRendezvous(**options)
