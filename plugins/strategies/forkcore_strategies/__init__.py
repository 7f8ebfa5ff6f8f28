"""Server selection strategies and affinity policies for forkcore.

Strategies: `round_robin`, `consistent_hash`, `grain_type_affinity`, `lowest_latency`,
`least_loaded`. Affinity policies: `sticky`, `zone`. They register through the entry
point `strategies` of group `forkcore`; the classes are importable for direct use.
"""

from .consistent_hash import ConsistentHash
from .grain_type_affinity import GrainTypeAffinity
from .least_loaded import LeastLoaded
from .lowest_latency import LowestLatency
from .ring import HashRing
from .round_robin import RoundRobin
from .sticky import Sticky
from .zone import Zone

__all__ = [
    "ConsistentHash",
    "GrainTypeAffinity",
    "HashRing",
    "LeastLoaded",
    "LowestLatency",
    "RoundRobin",
    "Sticky",
    "Zone",
]
