"""The connection state machine, sans I/O.

`ProtocolConnection` turns frame bodies into validated messages and messages into frame
bodies, and enforces the handshake: a client must send Hello first and receive Welcome
first; a server must receive Hello first and answer Welcome. Anything else, or a
protocol version we do not speak, is a `ProtocolError` and the connection is done.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from ..errors import ProtocolError
from . import codec
from .messages import PROTOCOL_VERSION, Goodbye, Hello, Message, Welcome, from_wire, to_wire


class State(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


class ProtocolConnection:
    """One side of one connection."""

    __slots__ = ("max_depth", "peer_hello", "peer_welcome", "role", "state")

    def __init__(
        self, role: Literal["client", "server"], *, max_depth: int = codec.DEFAULT_MAX_DEPTH
    ) -> None:
        self.role = role
        self.state = State.HANDSHAKE
        self.max_depth = max_depth
        self.peer_hello: Hello | None = None
        self.peer_welcome: Welcome | None = None

    def encode(self, msg: Message) -> bytes:
        """The frame body for `msg`; raises `WireTypeError` for values that cannot cross.

        Goodbye may be sent in any state, even after a protocol error closed the
        connection, so the peer learns why it is being dropped."""
        if self.state is not State.OPEN and type(msg) is not Goodbye:
            expected = Hello if self.role == "client" else Welcome
            if self.state is State.CLOSED or type(msg) is not expected:
                raise ProtocolError(f"cannot send {type(msg).__name__} in state {self.state.value}")
            if self.role == "server":
                self.state = State.OPEN
        return codec.encode(to_wire(msg))

    def decode(self, body: bytes) -> Message:
        """The message in one frame body; a `ProtocolError` closes the connection."""
        if self.state is State.CLOSED:
            raise ProtocolError("connection is closed")
        try:
            msg = from_wire(codec.decode(body, max_depth=self.max_depth))
            if self.state is State.HANDSHAKE:
                self._handshake(msg)
        except ProtocolError:
            self.state = State.CLOSED
            raise
        return msg

    def _handshake(self, msg: Message) -> None:
        if isinstance(msg, Goodbye):
            raise ProtocolError(f"peer said goodbye during the handshake: {msg.reason}")
        if self.role == "server":
            if not isinstance(msg, Hello):
                raise ProtocolError(f"expected Hello first, got {type(msg).__name__}")
            if msg.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"client speaks protocol version {msg.version}, this server speaks "
                    f"{PROTOCOL_VERSION}: upgrade the older side"
                )
            self.peer_hello = msg
        else:
            if not isinstance(msg, Welcome):
                raise ProtocolError(f"expected Welcome first, got {type(msg).__name__}")
            if msg.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"server speaks protocol version {msg.version}, this client speaks "
                    f"{PROTOCOL_VERSION}: upgrade the older side"
                )
            self.peer_welcome = msg
            self.state = State.OPEN

    def close(self) -> None:
        self.state = State.CLOSED
