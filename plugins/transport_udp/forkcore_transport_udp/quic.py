"""aioquic's sans-IO `QuicConnection`, with bounded receive windows.

Every use of aioquic internals is in this module (the version range is pinned in
pyproject.toml and tests/test_quic_internals.py checks them):

- aioquic doubles a receive window whenever the peer has sent half of it, so a peer can
  make it grow without bound. Here windows slide with what the *application* consumed:
  the ordered stream may run `stream_window` bytes ahead of the frames taken by
  `receive()`, the whole connection `connection_window` bytes. Unordered message streams
  get a fixed window of one message, and the peer may have `max_uni_streams` of them
  open and unconsumed. That is backpressure, as TCP's receive buffer gives.
- The peer may open one bidirectional stream (the ordered stream, opened by the client).
- Acknowledgements ride on outgoing data instead of waiting for the ack delay
  (acknowledge_with_data), which halves the packets of a request and its response.
- The peer's announced max_ack_delay is capped (see _parse_transport_parameters).
- Accessors: whether a datagram decrypted (`heard`), the termination cause as soon as
  it is known (aioquic reports it only after the closing period), the peer's
  certificate, the peer's datagram frame limit, the datagrams aioquic still holds, and
  whether everything sent has been acknowledged.
- `initial_decrypts`: whether a client Initial opens with the keys its destination
  connection id gives (aioquic's initial salts), checked before any connection is built.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    QuicConnection,
    QuicConnectionState,
    stream_is_unidirectional,
)
from aioquic.quic.crypto import INITIAL_SALT_VERSION_1, INITIAL_SALT_VERSION_2
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicProtocolVersion
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Bytes of a 1-RTT packet around a DATAGRAM frame's payload, at worst: short header
# (1 + 20-byte connection id + 2-byte packet number), AEAD tag (16), frame type (1) and
# length (2).
DATAGRAM_OVERHEAD = 1 + 20 + 2 + 16 + 1 + 2
PEER_ACK_DELAY = 0.005  # seconds: what we assume of the peer's delayed acknowledgements


def _expand_label(label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label's info (RFC 8446 §7.1, empty context) and HKDF-Expand's counter
    byte: HMAC(secret, this) is the whole output for `length` ≤ 32 with SHA-256."""
    full = b"tls13 " + label
    return struct.pack("!HB", length, len(full)) + full + b"\x00\x01"


_IPAD, _OPAD = (int.from_bytes(bytes([pad]) * 64, "big") for pad in (0x36, 0x5C))
Pads = tuple[Any, Any]  # HMAC-SHA256's inner and outer hash, keyed


def _pads(key: bytes) -> Pads:
    k = int.from_bytes(key.ljust(64, b"\x00"), "big")
    return hashlib.sha256((k ^ _IPAD).to_bytes(64, "big")), \
        hashlib.sha256((k ^ _OPAD).to_bytes(64, "big"))


def _hmac(pads: Pads, message: bytes) -> bytes:
    """HMAC-SHA256 with the key's pads hashed once (three derivations share them)."""
    inner, outer = pads[0].copy(), pads[1].copy()
    inner.update(message)
    outer.update(inner.digest())
    return bytes(outer.digest())


# version → (initial salt's pads, then the labels of the client secret, key, iv and
# header protection key)
_INITIAL_KEYS = {
    int(version): (_pads(salt), _expand_label(b"client in", 32),
                   _expand_label(prefix + b" key", 16), _expand_label(prefix + b" iv", 12),
                   _expand_label(prefix + b" hp", 16))
    for version, salt, prefix in (
        (QuicProtocolVersion.VERSION_1, INITIAL_SALT_VERSION_1, b"quic"),
        (QuicProtocolVersion.VERSION_2, INITIAL_SALT_VERSION_2, b"quicv2"))}


def initial_decrypts(packet: bytes, pn_offset: int, dcid: bytes, version: int) -> bool:
    """Does this client Initial packet (one packet, header parsed up to its packet number
    at `pn_offset`) open with the Initial keys of `dcid` (RFC 9001 §5.2, §5.4)?

    The derivation and AEAD check aioquic makes, without building a connection (a TLS
    context, packet spaces, timers): the cheap refusal of Initial-looking junk. HMAC on
    hashlib with shared pads costs a fifth of aioquic's HKDFExpand objects."""
    keys = _INITIAL_KEYS.get(version)
    sample_at = pn_offset + 4
    if keys is None or sample_at + 16 > len(packet):
        return False
    salt, client_label, key_label, iv_label, hp_label = keys
    secret = _pads(_hmac(_pads(_hmac(salt, dcid)), client_label))
    mask = Cipher(algorithms.AES(_hmac(secret, hp_label)[:16]), modes.ECB()).encryptor() \
        .update(packet[sample_at:sample_at + 16])
    first = packet[0] ^ (mask[0] & 0x0F)
    pn_length = (first & 0x03) + 1
    header = bytearray(packet[:pn_offset + pn_length])
    header[0] = first
    number = 0
    for i in range(pn_length):
        header[pn_offset + i] ^= mask[1 + i]
        number = (number << 8) | header[pn_offset + i]
    # a client's first packets are numbered below 2^32, so the truncated packet number
    # is the full one
    iv = int.from_bytes(_hmac(secret, iv_label)[:12], "big")
    try:
        AESGCM(_hmac(secret, key_label)[:16]).decrypt(
            (iv ^ number).to_bytes(12, "big"), packet[pn_offset + pn_length:], bytes(header))
    except InvalidTag:
        return False
    return True


class BoundedQuicConnection(QuicConnection):
    def __init__(self, *, configuration: QuicConfiguration, stream_window: int,
                 message_window: int, connection_window: int, max_uni_streams: int,
                 **kwargs: Any) -> None:
        super().__init__(configuration=configuration, **kwargs)
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._max_uni_streams = max_uni_streams
        self._max_bidi_streams = 0 if configuration.is_client else 1
        # initial limits (announced in the transport parameters, hence also "sent")
        for limit, value in ((self._local_max_data, connection_window),
                             (self._local_max_streams_bidi, self._max_bidi_streams),
                             (self._local_max_streams_uni, max_uni_streams)):
            limit.value = limit.sent = value
        self._local_max_stream_data_bidi_local = stream_window
        self._local_max_stream_data_bidi_remote = stream_window
        self._local_max_stream_data_uni = message_window
        self.consumed: dict[int, int] = {}  # ordered stream id → bytes the app has taken
        self.consumed_total = 0  # stream bytes taken by the app or discarded, all streams
        self.uni_released = 0  # peer message streams whose message was taken or dropped

    def _parse_transport_parameters(self, data: bytes, *args: Any, **kwargs: Any) -> None:
        super()._parse_transport_parameters(data, *args, **kwargs)
        # The peer is this same code (ALPN forkcore/1), which acknowledges within about a
        # millisecond but announces aioquic's fixed 25 ms; counting 25 ms into every probe
        # timeout would triple the time a lost packet takes to be resent on a fast path.
        self._loss.max_ack_delay = min(self._loss.max_ack_delay, PEER_ACK_DELAY)

    # -- windows ----------------------------------------------------------------------

    @property
    def smallest_window(self) -> int:
        """The smaller of the stream and connection receive windows, in bytes."""
        return min(self._stream_window, self._connection_window)

    def window_update_due(self) -> bool:
        """Would a MAX_DATA or MAX_STREAM_DATA go out if we transmitted now?"""
        if self.consumed_total + self._connection_window - self._local_max_data.value \
                >= self._connection_window // 4:
            return True
        for stream_id, consumed in self.consumed.items():
            stream = self._streams.get(stream_id)
            if stream is not None and consumed + self._stream_window \
                    - stream.max_stream_data_local >= self._stream_window // 4:
                return True
        limit = self._local_max_streams_uni
        return self.uni_released + self._max_uni_streams - limit.sent >= \
            max(1, self._max_uni_streams // 4)

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if stream.max_stream_data_local and not stream_is_unidirectional(stream.stream_id):
            target = self.consumed.get(stream.stream_id, 0) + self._stream_window
            if target - stream.max_stream_data_local >= self._stream_window // 4:
                stream.max_stream_data_local = target
        receiver = stream.receiver
        highest = receiver.highest_offset
        receiver.highest_offset = 0  # so aioquic does not double the window
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = highest

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        max_data = self._local_max_data
        target = self.consumed_total + self._connection_window
        if target - max_data.value >= self._connection_window // 4:
            max_data.value = target
        # stream credit follows what the application took, not what aioquic discarded
        for limit, allowed in ((self._local_max_streams_uni,
                                self.uni_released + self._max_uni_streams),
                               (self._local_max_streams_bidi, self._max_bidi_streams)):
            limit.value = max(limit.sent, allowed)
        used = max_data.used
        max_data.used = 0  # so aioquic does not double the window
        try:
            super()._write_connection_limits(builder, space)
        finally:
            max_data.used = used

    # -- accessors --------------------------------------------------------------------

    @property
    def heard(self) -> float | None:
        """Changes whenever a packet from the peer decrypts (aioquic then moves the idle
        deadline); compared before and after `receive_datagram`, it is the cheapest
        "did that datagram come from the peer?"."""
        return self._close_at

    def accepted_a_packet(self) -> bool:
        """Has any packet decrypted? (A datagram that only looks like an Initial has not.)"""
        return self._state is not QuicConnectionState.FIRSTFLIGHT

    def acknowledge_with_data(self, now: float) -> None:
        """We are about to send data: let a pending acknowledgement ride along now instead
        of leaving in a packet of its own when the ack delay runs out."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None and space.ack_at > now:
            space.ack_at = now

    def termination(self) -> ConnectionTerminated | None:
        """Why the connection ended (or is ending), as soon as either side decided."""
        return self._close_event

    def peer_certificate(self) -> x509.Certificate | None:
        tls = getattr(self, "tls", None)
        return None if tls is None else tls._peer_certificate

    def max_datagram_payload(self) -> int:
        """The largest DATAGRAM payload that fits one packet and the peer's limit (0 if
        the peer takes no datagrams)."""
        peer_limit = self._remote_max_datagram_frame_size
        if not peer_limit:
            return 0
        return max(0, min(self._configuration.max_datagram_size - DATAGRAM_OVERHEAD,
                          peer_limit - 4))

    def datagrams_held(self) -> int:
        """Datagrams handed to aioquic that it has not sent yet."""
        return len(self._datagrams_pending)

    def sent_offset(self, stream_id: int) -> int | None:
        """Bytes of a local stream sent at least once (None once the stream is gone)."""
        stream = self._streams.get(stream_id)
        return None if stream is None else int(stream.sender.highest_offset)

    def all_acknowledged(self) -> bool:
        """Has the peer acknowledged everything we sent on streams?"""
        return all(stream.sender.is_finished for stream in self._streams.values())
