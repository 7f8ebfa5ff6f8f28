"""The envelope of a message that does not travel on the ordered stream.

`reliable_unordered` messages (one QUIC stream each) and `unreliable` / `sequenced`
messages (QUIC DATAGRAM frames, or a stream of their own when too big for one datagram)
start with a small header:

    kind 0  plain       [0x00] body                      reliable_unordered
    kind 1  unreliable  [0x01] [seq:u16] body
    kind 2  sequenced   [0x02] [seq:u16] [key:u32] body

`seq` counts the channel's unreliable and sequenced messages (each kind on its own);
`key` names what a sequenced message updates: a 32-bit hash of the (interface, grain key,
method) of the OneWay call in `body`. The transport sees only frame bodies, so it reads
those three fields from the front of the CBOR array (docs/protocol.md, OneWay); a body
that is not a OneWay call gets key 0, one sequence shared by all such messages.
"""

from __future__ import annotations

import hashlib
import struct

from forkcore.errors import ProtocolError

PLAIN, UNRELIABLE, SEQUENCED = 0, 1, 2
KINDS = {"reliable_unordered": PLAIN, "unreliable": UNRELIABLE, "sequenced": SEQUENCED}
HEADER_SIZE = {PLAIN: 1, UNRELIABLE: 3, SEQUENCED: 7}
MAX_HEADER = 7

_SEQ = struct.Struct(">BH")
_SEQ_KEY = struct.Struct(">BHI")
_ONE_WAY = 6  # forkcore.protocol.messages.ONE_WAY


def plain(body: bytes) -> bytes:
    return b"\x00" + body


def encode(kind: int, seq: int, key: int, body: bytes) -> bytes:
    if kind == SEQUENCED:
        return _SEQ_KEY.pack(kind, seq & 0xFFFF, key) + body
    if kind == UNRELIABLE:
        return _SEQ.pack(kind, seq & 0xFFFF) + body
    return b"\x00" + body


def decode(data: bytes) -> tuple[int, int, int, bytes]:
    """(kind, seq, key, body) of one enveloped message; `ProtocolError` if malformed."""
    if not data:
        raise ProtocolError("empty message envelope")
    kind = data[0]
    if kind == PLAIN:
        return PLAIN, 0, 0, data[1:]
    if kind == UNRELIABLE and len(data) >= 3:
        _, seq = _SEQ.unpack_from(data)
        return UNRELIABLE, seq, 0, data[3:]
    if kind == SEQUENCED and len(data) >= 7:
        _, seq, key = _SEQ_KEY.unpack_from(data)
        return SEQUENCED, seq, key, data[7:]
    raise ProtocolError(f"malformed message envelope (kind {kind}, {len(data)} bytes)")


def sequence_key(body: bytes) -> int:
    """32-bit hash of the (interface, key, method) of a OneWay body; 0 for anything else."""
    try:
        pos = _skip_head(body, 0, expect_major=4)
        if pos is None or body[pos] != _ONE_WAY:
            return 0
        start = pos + 1
        end = start
        for _ in range(3):  # interface, grain key, method
            end = _skip_item(body, end, depth=0)
    except (IndexError, ValueError):
        return 0
    digest = hashlib.blake2b(body[start:end], digest_size=4).digest()
    return int.from_bytes(digest, "big") or 1


def _argument(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the CBOR item at `pos`."""
    initial = data[pos]
    major, info = initial >> 5, initial & 31
    if info < 24:
        return major, info, pos + 1
    if info > 27:
        raise ValueError("indefinite or reserved CBOR length")
    size = 1 << (info - 24)
    if pos + 1 + size > len(data):
        raise IndexError
    return major, int.from_bytes(data[pos + 1:pos + 1 + size], "big"), pos + 1 + size


def _skip_head(data: bytes, pos: int, expect_major: int) -> int | None:
    major, _count, after = _argument(data, pos)
    return after if major == expect_major else None


def _skip_item(data: bytes, pos: int, depth: int) -> int:
    if depth > 4:
        raise ValueError("grain key nested too deeply")
    major, arg, after = _argument(data, pos)
    if major in (2, 3):
        if after + arg > len(data):
            raise IndexError
        return after + arg
    if major == 6:
        return _skip_item(data, after, depth + 1)
    if major in (4, 5):
        for _ in range(arg * (2 if major == 5 else 1)):
            after = _skip_item(data, after, depth + 1)
        return after
    return after  # integers and simple values carry no payload
