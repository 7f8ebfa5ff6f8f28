"""Call context: small key → value entries that travel with every call started inside.

`with forkcore.call_context(tenant="eu", request_id="r-17"):` on a client or in a
grain makes every call started in the block carry the entries (in the Request's
headers, docs/protocol.md 6.5); a grain reads the entries of the call it serves with
`forkcore.current_context()`, and the calls it makes carry them on. Inner contexts add
to (and override) outer ones. A context is checked when it is entered, not per call:
at most `MAX_ENTRIES` entries and `MAX_BYTES` encoded, string keys, wire values.

The entries live in a `contextvars.ContextVar`, so they follow tasks the way anyio's
task groups copy contexts: a task started inside the block sees them too. A call with
no context pays one `ContextVar.get`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from .protocol import codec

MAX_ENTRIES = 64
MAX_BYTES = 8 * 1024

_EMPTY: Mapping[str, Any] = MappingProxyType({})
# the entries of the current context, or None for none: a plain dict (it goes onto the
# wire as it is) that nothing ever changes once it is set
_entries: ContextVar[dict[str, Any] | None] = ContextVar("forkcore_call_context",
                                                         default=None)


def check_entries(entries: Mapping[str, Any], what: str = "call_context") -> None:
    """`ValueError` (or `WireTypeError`) unless `entries` may travel as a call context."""
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"{what}: {len(entries)} entries; a call context holds at most "
                         f"{MAX_ENTRIES}: keep it to identifiers, not data")
    for key in entries:
        if not isinstance(key, str):
            raise ValueError(f"{what}: key {key!r} is not a string")
    size = len(codec.encode(dict(entries)))
    if size > MAX_BYTES:
        raise ValueError(f"{what}: {size} bytes encoded; a call context holds at most "
                         f"{MAX_BYTES}: keep it to identifiers, not data")


@contextmanager
def call_context(**entries: Any) -> Iterator[Mapping[str, Any]]:
    """Every call started inside carries `entries` (added to the outer context's)."""
    outer = _entries.get()
    merged = {**outer, **entries} if outer else entries
    check_entries(merged)
    token = _entries.set(merged or None)
    try:
        yield MappingProxyType(merged)
    finally:
        _entries.reset(token)


def current_context() -> Mapping[str, Any]:
    """The entries of the current context: in a grain, those of the call it serves (with
    any `call_context` opened inside the grain on top)."""
    entries = _entries.get()
    return _EMPTY if entries is None else MappingProxyType(entries)


# outgoing() -> dict | None: what a call started now carries (None: nothing); never
# change it. On every call's path, so the ContextVar's own method, not a function of ours.
outgoing = _entries.get


def enter_served(entries: dict[str, Any] | None) -> Any:
    """Make `entries` (of a call being served, checked on receipt) the current context;
    a token for `leave_served`."""
    return _entries.set(entries or None)


def leave_served(token: Any) -> None:
    _entries.reset(token)


__all__ = ["MAX_BYTES", "MAX_ENTRIES", "call_context", "check_entries", "current_context"]
