"""`QuicChannel`: a forkcore Channel over one QUIC connection, either role.

Outbound, by delivery mode:
- `reliable`: length-prefixed frames (forkcore.protocol.framing) on one long
  bidirectional stream, id 0, which the client opens with a 4-byte preface. Frames sent
  during one loop turn are joined and handed to QUIC at once.
- `reliable_unordered`: one unidirectional stream per message (enveloped, see
  envelope.py). New streams are opened only while less than UNORDERED_AHEAD bytes of
  earlier ones are unsent, so the peer can always finish what was started.
- `unreliable` / `sequenced`: DATAGRAM frames from a bounded, newest-wins queue
  (sequencing.py). A message too big for one datagram goes on a stream of its own with
  the same envelope, so it still arrives at most once and the sequence filter still
  applies: it is never lost for being big, and never blocks later datagrams.

Inbound, every message from every stream and datagram is queued in arrival order for
`receive()`; taking a message is what opens the peer's flow-control windows again.

Liveness: `received_at` is the `time.monotonic()` time of the last packet from the peer
that decrypted, whatever it carried (stream bytes, a datagram, an acknowledgement, a
PING). Unlike TCP, whose kernel acknowledges for a frozen process, every QUIC packet comes
from the peer's own event loop, so it is proof of life; and the QUIC PING sent every
`ping_interval` makes the peer answer with an acknowledgement even while a forkcore Pong
waits behind a large message on the ordered stream.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
from aioquic.quic import events
from aioquic.quic.packet import QuicErrorCode

from forkcore.errors import ConfigError, ConnectError, ForkcoreError, ProtocolError
from forkcore.protocol.framing import HEADER, FrameDecoder

from . import envelope
from .envelope import KINDS, MAX_HEADER, PLAIN, SEQUENCED
from .quic import BoundedQuicConnection
from .sequencing import DatagramQueue, SequenceFilter

log = logging.getLogger("forkcore.transport.udp")

PREFACE = b"FKC\x01"  # first bytes of the ordered stream, client → server
ORDERED = 0  # the ordered stream's id
UNI_TAG, DATAGRAM_TAG = -1, -2  # where a queued inbound message came from
APP_PROTOCOL_ERROR = 0x1  # application close code: the peer broke the protocol

Address = Any


class QuicChannel:
    # QUIC encrypts (TLS 1.3). A client's channel is secure only once the server's
    # certificate is verified: the transport sets it False for `insecure` connections.
    secure = True
    HIGH_WATER = 4 * 1024 * 1024  # unsent bytes above which drain() waits
    UNORDERED_AHEAD = 64 * 1024
    FLUSH_TIMEOUT = 1.0  # seconds a closing channel waits for its data to be acknowledged
    DATAGRAMS_HELD = 8  # datagrams handed to aioquic ahead of sending

    def __init__(self, quic: BoundedQuicConnection, *, peer: str, addr: Address,
                 is_client: bool, max_frame_size: int, ping_interval: float,
                 max_pending_datagrams: int, idle_timeout: float,
                 touch: Callable[[QuicChannel], None]) -> None:
        self.peer = peer
        self.addr = addr
        self.quic = quic
        self.is_client = is_client
        self._touch = touch
        self._max_frame_size = max_frame_size
        self._ping_interval = ping_interval
        self._idle_timeout = idle_timeout
        # lifecycle: "handshake" → "open" → "closed"
        self.state = "handshake"
        self.handshake_done = anyio.Event()  # handshake completed, or the connection ended
        self.failure: ConnectError | None = None  # why it ended
        self.close_code: int | None = None
        self.close_reason = ""
        self.on_open: Callable[[QuicChannel], None] | None = None  # server: preface seen
        self.on_end: Callable[[QuicChannel], None] | None = None
        self.on_connection_id: Callable[[bytes, bool], None] | None = None
        self.deadline_at: float | None = None  # server: handshake must be done by then
        self.received_at = time.monotonic()  # last packet from the peer (see the docstring)
        self._closing = False  # sends refused; flushing before the close
        self._local_closed = False  # receive() refused
        self._close_sent = anyio.Event()
        self._close_pending = False  # we closed: a CONNECTION_CLOSE is to be sent
        self._progress = anyio.Event()
        self._next_ping: float | None = None
        self._ping_id = 0
        # outbound
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._written = 0  # bytes handed to QUIC on the ordered stream
        self._fin_pending = False
        self._unordered: deque[bytes] = deque()
        self._unordered_bytes = 0
        self._in_progress: list[tuple[int, int]] = []  # (stream id, length) not fully sent
        self._datagrams = DatagramQueue(max_pending_datagrams)
        self._warned_big_datagram = False
        self._drained = anyio.Event()
        self._drained.set()
        # inbound
        self._frames: deque[tuple[bytes, int, int]] = deque()
        self._readable = anyio.Event()
        self._decoder = FrameDecoder(max_frame_size)
        self._preface = bytearray() if not is_client else None
        self._partial: dict[int, bytearray] = {}
        self._filter = SequenceFilter()
        self._unread_datagrams = 0
        self._max_unread_datagrams = max_pending_datagrams
        self._error: ForkcoreError | None = None
        self._peer_finished = False
        self._unsent_stream = 0  # ordered-stream bytes handed to QUIC but not yet sent
        self._unchecked = 0  # bytes taken since the flow-control windows were checked
        self._check_every = max(1, quic.smallest_window // 16)

    # -- the Channel interface ------------------------------------------------------------

    def send(self, body: bytes, delivery: str = "reliable") -> None:
        if self.state != "open" or self._closing:
            raise self._closed_error()
        if delivery == "reliable":
            self._out.append(HEADER.pack(len(body)))
            self._out.append(body)
            self._out_bytes += len(body) + 4
        elif delivery == "reliable_unordered":
            self._queue_unordered(envelope.plain(body))
        elif delivery in ("unreliable", "sequenced"):
            self._datagrams.push(KINDS[delivery], body)
        else:
            raise ConfigError(f"unknown delivery mode {delivery!r}; use one of reliable, "
                              "reliable_unordered, sequenced, unreliable")
        # the stream's unsent bytes as of the last transmit (exact: QUIC sends only then)
        if self._drained.is_set() and self._out_bytes + self._unsent_stream \
                + self._unordered_bytes > self.HIGH_WATER:
            self._drained = anyio.Event()
        self._touch(self)

    async def drain(self) -> None:
        # a loop, as in StreamChannel: `send` arms the event from the backlog of the last
        # transmit, so it may still be set while the live backlog is over the mark
        while self._backlog() > self.HIGH_WATER and self.state == "open" \
                and not self._closing:
            if self._drained.is_set():
                self._drained = anyio.Event()
            await self._drained.wait()  # transmit sets it once below the mark (or closed)
        if self.state != "open" or self._closing:
            raise self._closed_error()

    async def receive(self) -> bytes:
        frames = self._frames
        while not frames:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._local_closed or self.state == "closed":
                raise self._closed_error()
            if self._peer_finished:
                raise ConnectError(f"{self.peer} closed the connection")
            self._readable = anyio.Event()
            await self._readable.wait()
        body, tag, size = frames.popleft()
        quic = self.quic
        if tag == DATAGRAM_TAG:
            self._unread_datagrams -= 1
            return body
        quic.consumed_total += size
        if tag == UNI_TAG:
            quic.uni_released += 1
            self._unchecked = self._check_every  # a stream slot freed: check now
        else:
            quic.consumed[tag] = quic.consumed.get(tag, 0) + size
        # a window update is due once a quarter of a window is consumed; checking every
        # sixteenth of the smallest window finds it in time, at a fraction of the cost
        self._unchecked += size
        if self._unchecked >= self._check_every:
            self._unchecked = 0
            if self.state == "open" and quic.window_update_due():
                self._touch(self)
        return body

    async def aclose(self) -> None:
        """Close: refuse sends and receives now, let what was sent be acknowledged
        (bounded by FLUSH_TIMEOUT), then close the connection."""
        self._local_closed = True
        self._readable.set()
        with anyio.CancelScope(shield=True):
            await self.close()

    # -- closing --------------------------------------------------------------------------

    async def close(self, reason: str = "closed") -> None:
        """Graceful close: finish the ordered stream, wait (bounded) until the peer has
        acknowledged everything, then close the connection."""
        if self.state == "open" and not self._closing:
            self._closing = True
            self._fin_pending = True
            self._touch(self)
            with anyio.move_on_after(self.FLUSH_TIMEOUT):
                while self.state == "open" and not self._flushed():
                    self._progress = anyio.Event()
                    await self._progress.wait()
        self.close_now(reason)
        if self._close_pending:
            with anyio.move_on_after(0.5):
                await self._close_sent.wait()

    def close_now(self, reason: str, code: int = QuicErrorCode.NO_ERROR,
                  application: bool = True) -> None:
        """Close the connection at once; the peer is told `reason`."""
        self._closing = True
        if self.state != "closed":
            self.quic.close(error_code=code, reason_phrase=reason,
                            frame_type=None if application else 0)
            self._close_pending = True
            self._check_termination()
            self._touch(self)

    def _flushed(self) -> bool:
        return not (self._out or self._unordered or self._fin_pending or self._in_progress) \
            and self.quic.all_acknowledged()

    def abort(self, message: str) -> None:
        """The connection is gone without a word (say, an ICMP port unreachable)."""
        if self.state != "closed":
            self.quic.close(reason_phrase=message)
            self.state = "closed"
            self.failure = ConnectError(message)
            for event in (self._readable, self._drained, self._progress, self.handshake_done,
                          self._close_sent):
                event.set()
            if self.on_end is not None:
                self.on_end(self)

    def _closed_error(self) -> ConnectError:
        return self.failure or ConnectError(f"connection to {self.peer} is closed")

    # -- driven by the engine ---------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Closed, and our CONNECTION_CLOSE (if we closed) has been sent."""
        return self.state == "closed" and (not self._close_pending or self._close_sent.is_set())

    def datagram_received(self, data: bytes, addr: Address, now: float) -> None:
        quic = self.quic
        heard = quic.heard
        quic.receive_datagram(data, addr, now)
        if quic.heard != heard:  # a packet decrypted
            self.received_at = time.monotonic()
        self.process_events()
        if self._closing and not self._progress.is_set():
            self._progress.set()

    def timer_fired(self, now: float) -> None:
        quic = self.quic
        timer = quic.get_timer()
        if timer is not None and timer <= now:
            quic.handle_timer(now)
        if self._next_ping is not None and now >= self._next_ping and self.state == "open":
            self._ping_id += 1
            quic.send_ping(self._ping_id)
            self._next_ping = now + self._ping_interval
        if self.deadline_at is not None and now >= self.deadline_at and self.state != "open":
            self.deadline_at = None
            self.close_now("handshake not completed in time", QuicErrorCode.CONNECTION_REFUSED,
                           application=False)
        self.process_events()

    def deadline(self) -> float | None:
        candidates = [t for t in (self.quic.get_timer(), self._next_ping, self.deadline_at)
                      if t is not None]
        return min(candidates) if candidates else None

    def transmit(self, now: float) -> list[tuple[bytes, Address]]:
        quic = self.quic
        if self.state == "open":
            if self._out or self._unordered or self._datagrams:
                quic.acknowledge_with_data(now)
            if self._out:
                data = b"".join(self._out)
                self._out.clear()
                self._out_bytes = 0
                quic.send_stream_data(ORDERED, data)
                self._written += len(data)
            if self._fin_pending:
                self._fin_pending = False
                quic.send_stream_data(ORDERED, b"", end_stream=True)
        datagrams: list[tuple[bytes, Address]] = []
        while True:
            if self.state == "open":
                self._feed_datagrams()
                self._feed_unordered()
            datagrams += quic.datagrams_to_send(now)
            if self.state != "open" or not self._datagrams or quic.datagrams_held():
                break
        self.process_events()
        sent = quic.sent_offset(ORDERED)
        self._unsent_stream = 0 if sent is None else self._written - sent
        if self.state == "closed":
            self._close_sent.set()
        if not self._drained.is_set() and (self._backlog() <= self.HIGH_WATER
                                           or self.state != "open"):
            self._drained.set()
        if self._closing and not self._progress.is_set():
            self._progress.set()
        return datagrams

    # -- outbound helpers ----------------------------------------------------------------

    def _backlog(self) -> int:
        sent = self.quic.sent_offset(ORDERED)
        unsent_stream = 0 if sent is None else self._written - sent
        return self._out_bytes + unsent_stream + self._unordered_bytes

    def _queue_unordered(self, message: bytes) -> None:
        self._unordered.append(message)
        self._unordered_bytes += len(message)

    def _feed_unordered(self) -> None:
        quic = self.quic
        unsent = 0
        still: list[tuple[int, int]] = []
        for stream_id, length in self._in_progress:
            sent = quic.sent_offset(stream_id)
            if sent is not None and sent < length:
                still.append((stream_id, length))
                unsent += length - sent
        self._in_progress = still
        queue = self._unordered
        while queue and (not still or unsent + len(queue[0]) <= self.UNORDERED_AHEAD):
            message = queue.popleft()
            self._unordered_bytes -= len(message)
            stream_id = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(stream_id, message, end_stream=True)
            still.append((stream_id, len(message)))
            unsent += len(message)

    def _feed_datagrams(self) -> None:
        quic = self.quic
        limit = quic.max_datagram_payload()
        queue = self._datagrams
        while queue and quic.datagrams_held() < self.DATAGRAMS_HELD:
            _kind, message = queue.pop()
            if len(message) > limit:
                if not self._warned_big_datagram:
                    self._warned_big_datagram = True
                    log.info("a %d-byte datagram message to %s exceeds the %d-byte datagram "
                             "limit; such messages go on a stream of their own", len(message),
                             self.peer, limit)
                self._queue_unordered(message)
                continue
            quic.send_datagram_frame(message)

    # -- inbound ---------------------------------------------------------------------------

    def process_events(self) -> None:
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                self._stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.DatagramFrameReceived):
                self._datagram(event.data)
            elif isinstance(event, events.HandshakeCompleted):
                self.handshake_done.set()
            elif isinstance(event, events.StreamReset):
                self._stream_reset(event.stream_id)
            elif self.on_connection_id is not None:
                if isinstance(event, events.ConnectionIdIssued):
                    self.on_connection_id(event.connection_id, True)
                elif isinstance(event, events.ConnectionIdRetired):
                    self.on_connection_id(event.connection_id, False)
        self._check_termination()

    def _stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if self.state == "closed":
            return
        if stream_id == ORDERED:
            if self._preface is not None:
                self._preface += data
                if len(self._preface) < len(PREFACE) and not end:
                    return
                if bytes(self._preface[:len(PREFACE)]) != PREFACE:
                    self._protocol_error("the peer is not a forkcore udp client (bad preface)")
                    return
                data = bytes(self._preface[len(PREFACE):])
                self._preface = None
                self.quic.consumed[ORDERED] = len(PREFACE)
                self.quic.consumed_total += len(PREFACE)
                self._open()
            if data:
                try:
                    bodies = self._decoder.feed(data)
                except ProtocolError as exc:
                    self._protocol_error(str(exc), exc)
                    return
                if bodies:
                    frames = self._frames
                    for body in bodies:
                        frames.append((body, ORDERED, len(body) + 4))
                    self._readable.set()
            if end:
                self._peer_finished = True
                self._readable.set()
        elif stream_id & 2 and bool(stream_id & 1) == self.is_client:
            buffer = self._partial.setdefault(stream_id, bytearray())
            buffer += data
            if len(buffer) > self._max_frame_size + MAX_HEADER:
                self._protocol_error(f"unordered message exceeds the limit of "
                                     f"{self._max_frame_size} bytes")
                return
            if end:
                del self._partial[stream_id]
                self._message(bytes(buffer))
        else:
            self._protocol_error(f"data on unexpected stream {stream_id}")

    def _message(self, data: bytes) -> None:
        """A whole message from a stream of its own."""
        try:
            kind, seq, key, body = envelope.decode(data)
        except ProtocolError as exc:
            self._protocol_error(str(exc), exc)
            return
        if kind == SEQUENCED and not self._filter.accept(key, seq):
            self.quic.consumed_total += len(data)
            self.quic.uni_released += 1
            return
        self._frames.append((body, UNI_TAG, len(data)))
        self._readable.set()

    def _datagram(self, data: bytes) -> None:
        if self.state != "open":
            return  # before the ordered stream is open (its first packet was lost): drop
        try:
            kind, seq, key, body = envelope.decode(data)
        except ProtocolError as exc:
            self._protocol_error(str(exc), exc)
            return
        if kind == PLAIN:
            self._protocol_error("a datagram without a sequence header")
            return
        if kind == SEQUENCED and not self._filter.accept(key, seq):
            return
        if self._unread_datagrams >= self._max_unread_datagrams:
            return  # the application is not reading: drop, as a full network would
        self._unread_datagrams += 1
        self._frames.append((body, DATAGRAM_TAG, 0))
        self._readable.set()

    def _stream_reset(self, stream_id: int) -> None:
        if stream_id == ORDERED:
            self._peer_finished = True
            self._readable.set()
            return
        partial = self._partial.pop(stream_id, None)
        if partial is not None:
            self.quic.consumed_total += len(partial)
            self.quic.uni_released += 1

    def _protocol_error(self, message: str, exc: ProtocolError | None = None) -> None:
        log.warning("closing udp connection with %s: %s", self.peer, message)
        self._error = exc or ProtocolError(message)
        self.close_now(f"protocol error: {message}"[:200], APP_PROTOCOL_ERROR)
        self._readable.set()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Client: the handshake is done and the server verified; open the ordered stream."""
        self.quic.consumed[ORDERED] = 0
        self._out.append(PREFACE)
        self._out_bytes += len(PREFACE)
        self._open()
        self._touch(self)

    def _open(self) -> None:
        if self.state != "handshake":
            return
        self.state = "open"
        self.deadline_at = None
        self._next_ping = anyio.current_time() + self._ping_interval
        if self.on_open is not None:
            self.on_open(self)

    def _check_termination(self) -> None:
        if self.state == "closed":
            return
        term = self.quic.termination()
        if term is None:
            return
        self.state = "closed"
        self._close_pending = True  # if aioquic has a CONNECTION_CLOSE to send, let it go
        self.close_code = term.error_code
        self.close_reason = term.reason_phrase
        self.failure = ConnectError(self._describe(term))
        self._next_ping = None
        self.deadline_at = None
        for event in (self._readable, self._drained, self._progress, self.handshake_done):
            event.set()
        if self.on_end is not None:
            self.on_end(self)

    def _describe(self, term: events.ConnectionTerminated) -> str:
        reason = term.reason_phrase
        code = term.error_code
        if reason == "Idle timeout":
            return (f"no packet from {self.peer} for {self._idle_timeout:g}s (idle timeout); "
                    "the peer is gone or unreachable")
        if QuicErrorCode.CRYPTO_ERROR <= code < QuicErrorCode.CRYPTO_ERROR + 0x100:
            return f"TLS handshake with {self.peer} failed: {reason or hex(code)}"
        if code == QuicErrorCode.CONNECTION_REFUSED:
            return f"{self.peer} refused the connection: {reason or 'no reason given'}"
        if code == QuicErrorCode.NO_ERROR:
            return f"connection to {self.peer} closed ({reason or 'no reason given'})"
        return f"connection to {self.peer} closed with error 0x{code:x}: {reason or '-'}"
