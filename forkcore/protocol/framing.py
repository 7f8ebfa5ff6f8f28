"""Length-prefixed framing for byte-stream transports (TCP, QUIC streams).

A frame is a 4-byte big-endian body length followed by the body. The length is checked
against the limit as soon as its 4 bytes arrive, before any of the body is buffered.
"""

from __future__ import annotations

import struct

from ..errors import ProtocolError

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024


def frame(body: bytes) -> bytes:
    """One frame: the length prefix and `body`."""
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Turns received bytes into frame bodies; holds at most one frame's worth of data."""

    __slots__ = ("_buffer", "_need", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._need = -1  # body length of the frame being read, -1 while reading a header

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the frame bodies they complete, in order."""
        buf = self._buffer
        buf += data
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
