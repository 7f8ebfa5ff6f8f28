"""Structures derived from a server list, cached on the list's identity.

The client passes the *same list object* for as long as a candidate set is unchanged and
a new list when it changes; each interface may have its own list. So a strategy can
build its ring or id set once per list and find it again with `is`. Entries are kept per
interface: a new list for an interface replaces that interface's old one, so memory is
bounded by the number of interfaces in use, not by the number of changes seen. Each entry
keeps a reference to its list, so the list's identity cannot be reused while the entry
lives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ListCache(Generic[T]):
    """`get(interface, servers)`: `build(servers)`, computed once per list object."""

    __slots__ = ("_build", "_entries", "_last", "_size")

    def __init__(self, build: Callable[[Sequence[Any]], T], size: int = 1024) -> None:
        self._build = build
        self._size = size
        self._entries: dict[str, tuple[Sequence[Any], T]] = {}
        self._last: tuple[Sequence[Any], T] | None = None

    def get(self, interface: str, servers: Sequence[Any]) -> T:
        entries = self._entries
        entry = entries.get(interface)
        if entry is not None and entry[0] is servers:
            return entry[1]
        last = self._last
        if last is not None and last[0] is servers:  # one list shared by interfaces
            value = last[1]
        else:
            value = self._build(servers)
        if entry is None and len(entries) >= self._size:
            del entries[next(iter(entries))]  # the oldest interface
        entries[interface] = self._last = (servers, value)
        return value

    def clear(self) -> None:
        self._entries.clear()
        self._last = None
