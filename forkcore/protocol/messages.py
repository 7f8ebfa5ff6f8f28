"""The protocol's messages and their CBOR array layout.

Every frame body is one CBOR array whose first element is the message type code; the
layout of each type is in docs/protocol.md. `to_wire` / `from_wire` convert between
message objects and those arrays, validating every field so a malformed message is a
`ProtocolError`, never an exception from deep inside the runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from ..errors import ProtocolError
from ..grains import KEY_TYPES, InterfaceInfo, Key

PROTOCOL_VERSION = 1

(HELLO, WELCOME, REQUEST, RESPONSE, FAILURE, ONE_WAY, PING, PONG, GOODBYE, CANCEL,
 AUTH_CHALLENGE, AUTH_PROOF, STATS_REQUEST, STATS) = range(1, 15)


@attrs.frozen(slots=True)
class Hello:
    """Client → server, first message: who is calling and what it speaks."""

    version: int
    client_id: str
    features: tuple[str, ...] = ()
    auth: dict[str, Any] | None = None


@attrs.frozen(slots=True)
class Welcome:
    """Server → client, answer to Hello: the server's identity and manifest."""

    version: int
    server_id: str
    zone: str | None
    metadata: dict[str, Any]
    manifest: tuple[InterfaceInfo, ...]
    features: tuple[str, ...] = ()


@attrs.frozen(slots=True)
class Request:
    """A call expecting an answer; `timeout` is the caller's remaining time in seconds."""

    id: int
    interface: str
    key: Key
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    timeout: float | None


@attrs.frozen(slots=True)
class Response:
    id: int
    result: Any


@attrs.frozen(slots=True)
class Failure:
    """A call's typed error: a `forkcore.errors` class name or the grain's exception name."""

    id: int
    kind: str
    type_name: str
    message: str


@attrs.frozen(slots=True)
class OneWay:
    interface: str
    key: Key
    method: str
    args: list[Any]
    kwargs: dict[str, Any]


@attrs.frozen(slots=True)
class Ping:
    nonce: int
    sent_at: float


@attrs.frozen(slots=True)
class Pong:
    nonce: int
    sent_at: float


@attrs.frozen(slots=True)
class Goodbye:
    """The sender is draining or closing; `reason` is for logs."""

    reason: str


@attrs.frozen(slots=True)
class Cancel:
    """The caller gave up on request `id`; the server may stop working on it."""

    id: int


@attrs.frozen(slots=True)
class AuthChallenge:
    """Server → client, answer to a Hello offering a pre-shared key: the server's nonce,
    its proof that it knows the key, and whether the session after the handshake is
    encrypted with the key (covered by the proofs)."""

    nonce: bytes
    proof: bytes
    encrypt: bool = True


@attrs.frozen(slots=True)
class AuthProof:
    """Client → server: the client's proof that it knows the key."""

    proof: bytes


@attrs.frozen(slots=True)
class StatsRequest:
    """Client → server: ask for the server's counters (for `forkcore status`)."""

    nonce: int


@attrs.frozen(slots=True)
class Stats:
    """Server → client: counters such as calls served, calls in flight, activations."""

    nonce: int
    values: dict[str, Any]


Message = (Hello | Welcome | Request | Response | Failure | OneWay | Ping | Pong | Goodbye
           | Cancel | AuthChallenge | AuthProof | StatsRequest | Stats)

# Failure kinds: which error the caller raises.
FAIL_REMOTE = "remote"  # the grain raised; RemoteError(type_name, message)
FAIL_NOT_FOUND = "method_not_found"
FAIL_TIMEOUT = "timeout"
FAIL_PROTOCOL = "protocol"
FAIL_UNAUTHORIZED = "unauthorized"
FAIL_UNAVAILABLE = "unavailable"  # the server is stopping or overloaded; safe to retry


def to_wire(msg: Message) -> list[Any]:
    """The CBOR array for `msg` (see docs/protocol.md)."""
    t = type(msg)
    if t is Request:
        assert isinstance(msg, Request)
        return [REQUEST, msg.id, msg.interface, msg.key, msg.method, msg.args, msg.kwargs,
                msg.timeout]
    if t is Response:
        assert isinstance(msg, Response)
        return [RESPONSE, msg.id, msg.result]
    if t is Failure:
        assert isinstance(msg, Failure)
        return [FAILURE, msg.id, msg.kind, msg.type_name, msg.message]
    if t is OneWay:
        assert isinstance(msg, OneWay)
        return [ONE_WAY, msg.interface, msg.key, msg.method, msg.args, msg.kwargs]
    if t is Ping:
        assert isinstance(msg, Ping)
        return [PING, msg.nonce, msg.sent_at]
    if t is Pong:
        assert isinstance(msg, Pong)
        return [PONG, msg.nonce, msg.sent_at]
    if t is Hello:
        assert isinstance(msg, Hello)
        return [HELLO, msg.version, msg.client_id, list(msg.features), msg.auth]
    if t is Welcome:
        assert isinstance(msg, Welcome)
        manifest = [[i.name, i.version, sorted(i.methods)] for i in msg.manifest]
        return [WELCOME, msg.version, msg.server_id, msg.zone, msg.metadata, manifest,
                list(msg.features)]
    if t is Goodbye:
        assert isinstance(msg, Goodbye)
        return [GOODBYE, msg.reason]
    if t is Cancel:
        assert isinstance(msg, Cancel)
        return [CANCEL, msg.id]
    if t is AuthChallenge:
        assert isinstance(msg, AuthChallenge)
        return [AUTH_CHALLENGE, msg.nonce, msg.proof, msg.encrypt]
    if t is AuthProof:
        assert isinstance(msg, AuthProof)
        return [AUTH_PROOF, msg.proof]
    if t is StatsRequest:
        assert isinstance(msg, StatsRequest)
        return [STATS_REQUEST, msg.nonce]
    if t is Stats:
        assert isinstance(msg, Stats)
        return [STATS, msg.nonce, msg.values]
    raise TypeError(f"not a protocol message: {msg!r}")


# -- decoding with validation -----------------------------------------------------------


def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"malformed message: {what}")


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{what} must be an integer")
    return v


def _id(v: Any) -> int:
    n = _int(v, "request id")
    if not 0 <= n < 2**63:
        raise _bad("request id out of range")
    return n


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise _bad(f"{what} must be true or false")
    return v


def _str(v: Any, what: str, limit: int = 1024) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise _bad(f"{what} must be a string of at most {limit} characters")
    return v


def _opt_str(v: Any, what: str) -> str | None:
    return None if v is None else _str(v, what)


def _num(v: Any, what: str) -> float:
    try:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise _bad(f"{what} must be a finite number")
        return float(v)
    except OverflowError:  # an integer too big for a float
        raise _bad(f"{what} must be a finite number") from None


def _key(v: Any) -> Key:
    if isinstance(v, bool) or not isinstance(v, KEY_TYPES):
        raise _bad("grain key must be str, int, UUID or bytes")
    return v


def _args(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise _bad("arguments must be an array")
    return v


def _kwargs(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _bad("keyword arguments must be a map with string keys")
    return v


def _strs(v: Any, what: str) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > 4096:
        raise _bad(f"{what} must be an array of strings")
    return tuple(_str(s, what) for s in v)


def _manifest(v: Any) -> tuple[InterfaceInfo, ...]:
    if not isinstance(v, list):
        raise _bad("manifest must be an array")
    out = []
    for entry in v:
        if not isinstance(entry, list) or len(entry) != 3:
            raise _bad("manifest entry must be [name, version, methods]")
        out.append(InterfaceInfo(_str(entry[0], "interface name"),
                                 _int(entry[1], "interface version"),
                                 frozenset(_strs(entry[2], "method names"))))
    return tuple(out)


def _bytes(v: Any, what: str, limit: int = 64) -> bytes:
    if not isinstance(v, bytes) or len(v) > limit:
        raise _bad(f"{what} must be at most {limit} bytes")
    return v


def _timeout(v: Any) -> float | None:
    if v is None:
        return None
    t = _num(v, "timeout")
    if not t >= 0:  # also rejects NaN
        raise _bad("timeout must be >= 0")
    return t


def _metadata(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad("metadata must be a map")
    return v


def _auth(v: Any) -> dict[str, Any] | None:
    return None if v is None else _metadata(v)


_LAYOUTS: dict[int, tuple[int, Callable[[list[Any]], Message]]] = {
    HELLO: (5, lambda a: Hello(_int(a[1], "version"), _str(a[2], "client id"),
                                _strs(a[3], "features"), _auth(a[4]))),
    WELCOME: (7, lambda a: Welcome(_int(a[1], "version"), _str(a[2], "server id"),
                                    _opt_str(a[3], "zone"), _metadata(a[4]), _manifest(a[5]),
                                    _strs(a[6], "features"))),
    REQUEST: (8, lambda a: Request(_id(a[1]), _str(a[2], "interface"), _key(a[3]),
                                    _str(a[4], "method"), _args(a[5]), _kwargs(a[6]),
                                    _timeout(a[7]))),
    RESPONSE: (3, lambda a: Response(_id(a[1]), a[2])),
    FAILURE: (5, lambda a: Failure(_id(a[1]), _str(a[2], "failure kind"),
                                    _str(a[3], "type name"), _str(a[4], "message", 65536))),
    ONE_WAY: (6, lambda a: OneWay(_str(a[1], "interface"), _key(a[2]), _str(a[3], "method"),
                                   _args(a[4]), _kwargs(a[5]))),
    PING: (3, lambda a: Ping(_int(a[1], "nonce"), _num(a[2], "timestamp"))),
    PONG: (3, lambda a: Pong(_int(a[1], "nonce"), _num(a[2], "timestamp"))),
    GOODBYE: (2, lambda a: Goodbye(_str(a[1], "reason", 65536))),
    CANCEL: (2, lambda a: Cancel(_id(a[1]))),
    AUTH_CHALLENGE: (4, lambda a: AuthChallenge(_bytes(a[1], "nonce"), _bytes(a[2], "proof"),
                                                _bool(a[3], "encrypt"))),
    AUTH_PROOF: (2, lambda a: AuthProof(_bytes(a[1], "proof"))),
    STATS_REQUEST: (2, lambda a: StatsRequest(_int(a[1], "nonce"))),
    STATS: (3, lambda a: Stats(_int(a[1], "nonce"), _metadata(a[2]))),
}


_MAX_ID = 2**63


def request_fields(a: list[Any]) -> tuple[int, str, Key, str, list[Any], dict[str, Any],
                                          float | None]:
    """The fields of a Request array, validated as `from_wire` does but faster: the
    server runs this for every call. The common types are checked inline; anything else
    goes to the general validators, which accept it or say what is wrong."""
    if len(a) != 8:
        raise _bad(f"message type {REQUEST} has {len(a)} fields, expected 8")
    _, rid, interface, key, method, args, kwargs, timeout = a
    if type(rid) is not int or not 0 <= rid < _MAX_ID:
        rid = _id(rid)
    if type(interface) is not str or len(interface) > 1024:
        interface = _str(interface, "interface")
    tk = type(key)
    if tk is not str and tk is not int and tk is not bytes:
        key = _key(key)
    if type(method) is not str or len(method) > 1024:
        method = _str(method, "method")
    if type(args) is not list:
        args = _args(args)
    if type(kwargs) is not dict or kwargs:
        kwargs = _kwargs(kwargs)
    if timeout is not None and (type(timeout) is not float or not 0.0 <= timeout < math.inf):
        timeout = _timeout(timeout)
    return rid, interface, key, method, args, kwargs, timeout


def from_wire(item: Any) -> Message:
    """The message for a decoded CBOR item, or `ProtocolError` if it is not one."""
    if not isinstance(item, list) or not item:
        raise _bad("a message is a non-empty array")
    code = item[0]
    layout = _LAYOUTS.get(code) if type(code) is int else None
    if layout is None:
        raise _bad(f"unknown message type {code!r}")
    length, build = layout
    if len(item) != length:
        raise _bad(f"message type {code} has {len(item)} fields, expected {length}")
    return build(item)
