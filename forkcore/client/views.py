"""`ServerView`: the picture of one server that strategies, policies and users see."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ..grains import InterfaceInfo


@attrs.define(slots=True, eq=False)
class ServerView:
    """One server as the client sees it, kept current by the client.

    Read-only for everyone but the client: the client updates `healthy`, `rtt`,
    `in_flight`, `state` and `last_error` in place as things change, so a strategy reads
    live values without the client building new objects on every call. `rtt` is the
    smoothed round-trip time in seconds (None until measured); `state` is one of
    "connecting", "healthy", "unhealthy", "ejected", "draining", "removed"; `last_error` says
    why it is not healthy (None once it is healthy again); `versions` maps each
    interface the server declares to what it declared.
    """

    id: str
    endpoint: str
    zone: str | None = None
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    interfaces: frozenset[str] = frozenset()
    healthy: bool = False
    rtt: float | None = None
    in_flight: int = 0
    state: str = "connecting"
    last_error: str | None = None
    versions: Mapping[str, InterfaceInfo] = attrs.field(factory=dict)
