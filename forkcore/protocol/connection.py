"""The connection state machine, sans I/O.

`ProtocolConnection` turns frame bodies into validated messages and messages into frame
bodies, and enforces the handshake: a client must send Hello first and receive Welcome
first; a server must receive Hello first and answer Welcome. Anything else, or a
protocol version we do not speak, is a `ProtocolError` and the connection is done.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from ..errors import ProtocolError
from ..security import SessionCipher
from . import codec
from .messages import (
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    AuthChallenge,
    AuthProof,
    Goodbye,
    Hello,
    Message,
    OneWay,
    Welcome,
    from_wire,
    to_wire,
)

ARGUMENT_NAMES = ("args", "kwargs", "headers")  # how an encoding error names the parts


class State(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


class ProtocolConnection:
    """One side of one connection."""

    __slots__ = ("_expect", "cipher", "max_depth", "peer_hello", "peer_welcome", "role",
                 "state")

    def __init__(
        self, role: Literal["client", "server"], *, max_depth: int = codec.DEFAULT_MAX_DEPTH
    ) -> None:
        self.role = role
        self.state = State.HANDSHAKE
        self.max_depth = max_depth
        self.peer_hello: Hello | None = None
        self.peer_welcome: Welcome | None = None
        self.cipher: SessionCipher | None = None  # set once a PSK session is established
        # what the peer may send next during the handshake
        self._expect: tuple[type, ...] = (Hello,) if role == "server" else (
            Welcome, AuthChallenge)

    def encode(self, msg: Message) -> bytes:
        """The frame body for `msg`; raises `WireTypeError` for values that cannot cross.

        Goodbye may be sent in any state, even after a protocol error closed the
        connection, so the peer learns why it is being dropped."""
        t = type(msg)
        if self.state is not State.OPEN and t is not Goodbye:
            allowed = (Hello, AuthProof) if self.role == "client" else (AuthChallenge, Welcome)
            if self.state is State.CLOSED or t not in allowed:
                raise ProtocolError(f"cannot send {t.__name__} in state {self.state.value}")
            if t is Welcome:
                self.state = State.OPEN
            elif t is AuthChallenge:
                self._expect = (AuthProof,)
        if isinstance(msg, OneWay):  # its arguments, named, are what may not cross
            body = codec.encode_if_plain(to_wire(msg), msg.args, msg.kwargs, msg.headers,
                                         names=ARGUMENT_NAMES)
        else:
            body = codec.encode(to_wire(msg))
        cipher = self.cipher
        return body if cipher is None else cipher.seal(body)

    def encode_request(self, rid: int, interface: str, key: Any, method: str,
                       args: list[Any], kwargs: dict[str, Any], timeout: float,
                       headers: dict[str, Any] | None = None) -> bytes:
        """The frame body of a Request on an open connection: the hot path, without a
        message object built only to be taken apart. Only the arguments (and headers)
        can hold values of any type, so only they are checked for types that need our
        encoders. Without headers the array has no ninth element."""
        if headers:
            body = codec.encode_if_plain([REQUEST, rid, interface, key, method, args, kwargs,
                                          timeout, headers], args, kwargs, headers,
                                         names=ARGUMENT_NAMES)
        else:
            body = codec.encode_if_plain([REQUEST, rid, interface, key, method, args,
                                          kwargs, timeout], args, kwargs, names=ARGUMENT_NAMES)
        cipher = self.cipher
        return body if cipher is None else cipher.seal(body)

    def encode_response(self, rid: int, result: Any) -> bytes:
        """The frame body of a Response on an open connection (see `encode_request`)."""
        body = codec.encode_if_plain([RESPONSE, rid, result], result, names=("result",))
        cipher = self.cipher
        return body if cipher is None else cipher.seal(body)

    def decode_item(self, body: bytes) -> list[Any]:
        """An open connection's frame body as its array, not yet validated: the caller
        validates it with `from_wire` or, for the hot path, `request_fields`."""
        if self.state is not State.OPEN:
            raise ProtocolError(f"cannot read a message in state {self.state.value}")
        try:
            cipher = self.cipher
            if cipher is not None:
                body = cipher.open(body)
            item = codec.decode(body, max_depth=self.max_depth)
            if type(item) is not list or not item:
                raise ProtocolError("malformed message: a message is a non-empty array")
        except ProtocolError:
            self.state = State.CLOSED
            raise
        return item

    def decode(self, body: bytes) -> Message:
        """The message in one frame body; a `ProtocolError` closes the connection.

        During the handshake a Goodbye is returned (the connection is then closed), so
        the caller can report the peer's reason."""
        if self.state is State.CLOSED:
            raise ProtocolError("connection is closed")
        try:
            cipher = self.cipher
            if cipher is not None:
                body = cipher.open(body)
            msg = from_wire(codec.decode(body, max_depth=self.max_depth))
            if self.state is State.HANDSHAKE:
                self._handshake(msg)
        except ProtocolError:
            self.state = State.CLOSED
            raise
        return msg

    def _handshake(self, msg: Message) -> None:
        if isinstance(msg, Goodbye):
            self.state = State.CLOSED
            return
        if not isinstance(msg, self._expect):
            if not self._expect:
                raise ProtocolError(f"{type(msg).__name__} arrived before the handshake was "
                                    "complete; wait for the answer to Hello")
            expected = " or ".join(t.__name__ for t in self._expect)
            raise ProtocolError(f"expected {expected}, got {type(msg).__name__}")
        if isinstance(msg, AuthChallenge):
            self._expect = (Welcome,)
            return
        if isinstance(msg, AuthProof):
            self._expect = ()
            return
        if self.role == "server":
            assert isinstance(msg, Hello)
            if msg.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"client speaks protocol version {msg.version}, this server speaks "
                    f"{PROTOCOL_VERSION}: upgrade the older side"
                )
            self.peer_hello = msg
            self._expect = ()
        else:
            assert isinstance(msg, Welcome)
            if msg.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"server speaks protocol version {msg.version}, this client speaks "
                    f"{PROTOCOL_VERSION}: upgrade the older side"
                )
            self.peer_welcome = msg
            self.state = State.OPEN

    def close(self) -> None:
        self.state = State.CLOSED
