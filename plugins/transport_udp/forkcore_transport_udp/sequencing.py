"""Datagram ordering rules: the sender's bounded queue and the receiver's sequence filter.

Sender: unsent datagram messages wait in a queue of at most `limit` entries (the oldest
is dropped beyond it; they are unreliable by contract). A sequenced message replaces a
queued one for the same key in place, so only the newest value of each key is pending.
Sequence numbers are given when a message leaves the queue, so they grow in send order.

Receiver: 16-bit sequence numbers are extended to unbounded integers against the highest
seen so far (as RTP does); a sequenced message is delivered only if it is newer than the
last one delivered for its key. Keys are remembered for the last WINDOW sequence numbers;
a message older than that is dropped, since it can no longer be judged (and so can never
be delivered after a newer one).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from . import envelope
from .envelope import SEQUENCED, UNRELIABLE


class DatagramQueue:
    """Unsent unreliable and sequenced messages, bounded, newest-wins per sequenced key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0
        self._queue: deque[list[object]] = deque()
        self._by_key: dict[int, list[object]] = {}
        self._next_seq = {UNRELIABLE: 0, SEQUENCED: 0}

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, kind: int, body: bytes) -> None:
        key = 0
        if kind == SEQUENCED:
            key = envelope.sequence_key(body)
            pending = self._by_key.get(key)
            if pending is not None:
                pending[2] = body
                return
        entry: list[object] = [kind, key, body]
        if len(self._queue) >= self.limit:
            self._forget(self._queue.popleft())
            self.dropped += 1
        self._queue.append(entry)
        if kind == SEQUENCED:
            self._by_key[key] = entry

    def pop(self) -> tuple[int, bytes]:
        """(kind, enveloped message) of the oldest entry, numbered now."""
        entry = self._queue.popleft()
        self._forget(entry)
        kind, key, body = entry
        assert isinstance(kind, int) and isinstance(key, int) and isinstance(body, bytes)
        seq = self._next_seq[kind]
        self._next_seq[kind] = (seq + 1) & 0xFFFF
        return kind, envelope.encode(kind, seq, key, body)

    def _forget(self, entry: list[object]) -> None:
        if entry[0] == SEQUENCED:
            self._by_key.pop(entry[1], None)  # type: ignore[call-overload]


class SequenceFilter:
    """Drops a sequenced message that is not newer than the last delivered for its key."""

    WINDOW = 16384

    def __init__(self) -> None:
        self._highest: int | None = None
        self._last: OrderedDict[int, int] = OrderedDict()  # key → extended seq, by update

    def accept(self, key: int, seq: int) -> bool:
        highest = self._highest
        if highest is None:
            ext = highest = seq
        else:
            diff = (seq - highest) & 0xFFFF
            ext = highest + (diff - 0x10000 if diff >= 0x8000 else diff)
            if ext < highest - self.WINDOW:
                return False
        last = self._last.get(key)
        if last is not None and ext <= last:
            return False
        self._last[key] = ext
        self._last.move_to_end(key)
        if ext > highest:
            highest = ext
        self._highest = highest
        self._evict(highest)
        return True

    def _evict(self, highest: int) -> None:
        last = self._last
        while last:
            key, ext = next(iter(last.items()))
            if ext >= highest - self.WINDOW and len(last) <= 2 * self.WINDOW:
                break
            del last[key]
