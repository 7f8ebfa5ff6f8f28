"""Admission: whether a server takes one call, decided without I/O.

`admit` looks at the call's target, the caller's role, whether the server drains and
how busy the connection is, and returns either the target's reentrancy (take it) or a
`Refusal` (answer with it, run nothing). The order of the checks is part of the
protocol (docs/protocol.md, section 6.4): an unknown method is reported before a role
refusal, and both before the server's own state.
"""

from __future__ import annotations

import attrs

from ..protocol.messages import FailureKind
from ..security import Identity
from .hosting import Targets


@attrs.frozen(slots=True)
class Refusal:
    """A call the server will not run, and what the caller is told."""

    kind: FailureKind
    type_name: str
    message: str


def admit(targets: Targets, interface: str, method: str, identity: Identity,
          draining: bool, busy: int, max_in_flight: int) -> bool | Refusal:
    """The call's reentrancy if the server takes it, else why not. `busy` is what the
    connection has queued or running (calls and one-way calls)."""
    target = targets.table.get((interface, method))
    if target is None:
        return Refusal(FailureKind.NOT_FOUND, "MethodNotFound",
                       targets.explain(interface, method))
    required, reentrant = target
    if required > identity.role:
        return Refusal(FailureKind.UNAUTHORIZED, "Unauthorized",
                       f"{interface}.{method} requires role '{required.name.lower()}'; this "
                       f"connection is '{identity.role.name.lower()}' ({identity.name})")
    if draining:
        return Refusal(FailureKind.UNAVAILABLE, "ServerDraining",
                       f"server {targets.server_id} is shutting down; call another server")
    if busy >= max_in_flight:
        return Refusal(FailureKind.UNAVAILABLE, "TooManyCalls",
                       f"more than {max_in_flight} calls in flight on one connection; wait "
                       "for some to finish")
    return reentrant
