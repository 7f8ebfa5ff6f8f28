"""Length-prefixed framing for byte-stream transports (TCP, QUIC streams).

A frame is a 4-byte big-endian body length followed by the body. The length is checked
against the limit as soon as its 4 bytes arrive, before any of the body is buffered.

On a byte stream each side first sends the 4-byte preamble `FKC` + protocol version, so
a peer that is not forkcore (an HTTP server, a port of something else) or speaks another
version is told apart at once, by name, instead of its bytes being read as a length.
"""

from __future__ import annotations

import struct

from ..errors import ProtocolError

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
MAGIC = b"FKC"
VERSION = 1  # the protocol version (forkcore.protocol.messages.PROTOCOL_VERSION)
PREAMBLE = MAGIC + bytes([VERSION])


class WrongPeer(ProtocolError):
    """The stream did not start with our preamble: `sent` is what it started with."""

    def __init__(self, sent: bytes) -> None:
        super().__init__(f"not a forkcore peer (it sent {printable(sent)!r})")
        self.sent = sent

    def describe(self, peer: str, kind: str) -> str:
        """What to tell the user: `peer` is not a forkcore `kind`, or speaks another
        version."""
        sent = self.sent
        if sent.startswith(MAGIC) and len(sent) > len(MAGIC):
            version = sent[len(MAGIC)]
            return (f"{peer} speaks forkcore protocol version {version}, this side speaks "
                    f"{VERSION}: upgrade the older side")
        return f"{peer} is not a forkcore {kind} (it sent {printable(sent)!r})"


def printable(data: bytes, limit: int = 40) -> str:
    """The start of `data` as text a person can read (its first line, at most `limit`)."""
    text = data[:limit].decode("latin-1").split("\n", 1)[0].split("\r", 1)[0]
    return "".join(c if c.isprintable() else "." for c in text)


def frame(body: bytes) -> bytes:
    """One frame: the length prefix and `body`."""
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Turns received bytes into frame bodies; holds at most one frame's worth of data."""

    __slots__ = ("_buffer", "_need", "_preamble", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, *,
                 preamble: bool = False) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._need = -1  # body length of the frame being read, -1 while reading a header
        self._preamble = preamble  # the stream must start with PREAMBLE (not yet seen)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the frame bodies they complete, in order.
        `WrongPeer` if the stream does not start with the preamble it must."""
        buf = self._buffer
        buf += data
        if self._preamble:
            size = len(PREAMBLE)
            if buf[:size] != PREAMBLE[:len(buf)]:
                raise WrongPeer(bytes(buf[:64]))
            if len(buf) < size:
                return []
            del buf[:size]
            self._preamble = False
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while True:
            if self._need < 0:
                if end - pos < 4:
                    break
                (size,) = HEADER.unpack_from(buf, pos)
                if size > self.max_frame_size:
                    raise ProtocolError(
                        f"frame of {size} bytes exceeds the limit of {self.max_frame_size} "
                        "bytes (raise max_frame_size on both sides if this is intended)"
                    )
                self._need = size
                pos += 4
            if end - pos < self._need:
                break
            frames.append(bytes(buf[pos:pos + self._need]))
            pos += self._need
            self._need = -1
        if pos:
            del buf[:pos]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)
