"""The protocol's messages, each declared once: code, fields, checks.

Every frame body is one CBOR array whose first element is the message type code, then
the message's fields in declaration order (docs/protocol.md, section 4). A message is
an attrs class decorated with `@message(CODE)`; each field names its check (wire value
→ Python value, or `ProtocolError`) and, where the two differ, how it goes onto the
wire. Encoding (`to_wire`), decoding with validation (`from_wire`) and the layout table
in the docs all come from that one declaration, so adding a field is one line.

Fields with a default are optional on the wire: trailing fields equal to their default
are left off, so a Request without headers is the same 8 elements as before, and a
peer that does not know a new trailing field never sees it.

The two hot messages keep hand-written fast paths (`request_fields` here, and the
encoders in `connection.py`); `tests/test_messages.py` checks them against the
general ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, TypeVar

import attrs

from ..errors import ProtocolError
from ..grains import KEY_TYPES, InterfaceInfo, Key

PROTOCOL_VERSION = 1

(HELLO, WELCOME, REQUEST, RESPONSE, FAILURE, ONE_WAY, PING, PONG, GOODBYE, CANCEL,
 AUTH_CHALLENGE, AUTH_PROOF, STATS_REQUEST, STATS, STREAM_ITEM, STREAM_CREDIT,
 STREAM_END) = range(1, 18)

# features a side may list in Hello / Welcome (docs/protocol.md, section 4.12)
FEATURE_HEADERS = "headers"  # Request and OneWay may carry a headers map
FEATURE_STREAMS = "streams"  # a Request may open a stream (Stream* messages)
FEATURE_CALLBACKS = "callbacks"  # the server may send Requests to the client

# request header names (docs/protocol.md, section 6.5)
HEADER_CONTEXT = "ctx"  # call context entries: {str: value}
HEADER_CHAIN = "chain"  # the grain-call chain: [[interface, key], ...]
HEADER_STREAM = "stream"  # this Request opens a stream; the value is the initial credit
MAX_CONTEXT_ENTRIES = 64  # entries of a call context (forkcore.context)


class FailureKind(StrEnum):
    """Why a Request failed: selects the caller's exception (docs/protocol.md, 6.4)."""

    REMOTE = "remote"  # the grain raised; RemoteError(type_name, message)
    NOT_FOUND = "method_not_found"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"
    UNAUTHORIZED = "unauthorized"
    UNAVAILABLE = "unavailable"  # the server is stopping or overloaded; safe to retry
    ERROR = "error"  # a forkcore.errors type named by type_name (raised by an interceptor)


# -- field checks: wire value → Python value, or ProtocolError --------------------------


def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"malformed message: {what}")


def integer(what: str) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(f"{what} must be an integer")
        return v
    return check


_MAX_ID = 2**63


def request_id(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad("request id must be an integer")
    if not 0 <= v < _MAX_ID:
        raise _bad("request id out of range")
    return v


def boolean(what: str) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise _bad(f"{what} must be true or false")
        return v
    return check


def text(what: str, limit: int = 1024) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or len(v) > limit:
            raise _bad(f"{what} must be a string of at most {limit} characters")
        return v
    return check


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def maybe(v: Any) -> Any:
        return None if v is None else check(v)
    return maybe


def number(what: str) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        try:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise _bad(f"{what} must be a finite number")
            return float(v)
        except OverflowError:  # an integer too big for a float
            raise _bad(f"{what} must be a finite number") from None
    return check


def grain_key(v: Any) -> Key:
    if isinstance(v, bool) or not isinstance(v, KEY_TYPES):
        raise _bad("grain key must be str, int, UUID or bytes")
    return v


def arguments(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise _bad("arguments must be an array")
    return v


def keyword_arguments(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _bad("keyword arguments must be a map with string keys")
    return v


def strings(what: str) -> Callable[[Any], tuple[str, ...]]:
    item = text(what)

    def check(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list) or len(v) > 4096:
            raise _bad(f"{what} must be an array of strings")
        return tuple(item(s) for s in v)
    return check


def manifest(v: Any) -> tuple[InterfaceInfo, ...]:
    if not isinstance(v, list):
        raise _bad("manifest must be an array")
    name, version, methods = text("interface name"), integer("interface version"), \
        strings("method names")
    out = []
    for entry in v:
        if not isinstance(entry, list) or len(entry) != 3:
            raise _bad("manifest entry must be [name, version, methods]")
        out.append(InterfaceInfo(name(entry[0]), version(entry[1]), frozenset(methods(entry[2]))))
    return tuple(out)


def manifest_to_wire(v: tuple[InterfaceInfo, ...]) -> list[Any]:
    return [[i.name, i.version, sorted(i.methods)] for i in v]


def octets(what: str, limit: int = 64) -> Callable[[Any], bytes]:
    def check(v: Any) -> bytes:
        if not isinstance(v, bytes) or len(v) > limit:
            raise _bad(f"{what} must be at most {limit} bytes")
        return v
    return check


def timeout(v: Any) -> float | None:
    if v is None:
        return None
    t = number("timeout")(v)
    if not t >= 0:  # also rejects NaN
        raise _bad("timeout must be >= 0")
    return t


def mapping(what: str) -> Callable[[Any], dict[str, Any]]:
    def check(v: Any) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise _bad(f"{what} must be a map")
        return v
    return check


def headers(v: Any) -> dict[str, Any] | None:
    """A request's headers: a map with string keys, or null (none). Known headers are
    checked; unknown ones are ignored (a newer peer's)."""
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _bad("headers must be a map with string keys")
    context = v.get(HEADER_CONTEXT)
    if context is not None and (
            not isinstance(context, dict) or len(context) > MAX_CONTEXT_ENTRIES
            or not all(isinstance(k, str) for k in context)):
        raise _bad(f"header {HEADER_CONTEXT!r} must be a map of at most "
                   f"{MAX_CONTEXT_ENTRIES} entries with string keys")
    return v or None


def failure_kind(v: Any) -> FailureKind | str:
    """A known kind as its enum member; an unknown one stays a string (the caller gets a
    ProtocolError for that call, the connection lives on)."""
    kind = text("failure kind")(v)
    try:
        return FailureKind(kind)
    except ValueError:
        return kind


def anything(v: Any) -> Any:
    return v


def as_list(v: Any) -> list[Any]:
    return list(v)


def as_str(v: Any) -> str:
    return str(v)


# -- declaring messages -----------------------------------------------------------------


def field(check: Callable[[Any], Any], *, wire: Callable[[Any], Any] | None = None,
          default: Any = attrs.NOTHING, trailing: bool = False) -> Any:
    """A message field: `check` validates the wire value, `wire` converts to it.

    `trailing` fields (last in the declaration, with a default) may be left off the
    array: they are omitted when equal to their default. Other defaults are for Python
    callers only; the field is always on the wire."""
    if trailing and default is attrs.NOTHING:
        raise TypeError("a trailing field needs a default")
    return attrs.field(default=default,
                       metadata={"check": check, "wire": wire, "trailing": trailing})


@attrs.frozen(slots=True)
class Layout:
    """One message type's wire layout, derived from its declaration."""

    code: int
    cls: type
    names: tuple[str, ...]
    checks: tuple[Callable[[Any], Any], ...]
    wires: tuple[Callable[[Any], Any] | None, ...]
    defaults: tuple[Any, ...]  # of the optional (trailing) fields
    required: int  # elements of the shortest valid array, code included

    @property
    def longest(self) -> int:
        return len(self.names) + 1


LAYOUTS: dict[int, Layout] = {}
_BY_CLASS: dict[type, Layout] = {}
M = TypeVar("M", bound=type)


def message(code: int) -> Callable[[M], M]:
    """Declare an attrs class as the message with type `code`."""
    def declare(cls: M) -> M:
        fields = attrs.fields(cls)
        optional_from = next((i for i, f in enumerate(fields) if f.metadata["trailing"]),
                             len(fields))
        if not all(f.metadata["trailing"] for f in fields[optional_from:]):
            raise TypeError(f"{cls.__name__}: trailing fields must come last")
        layout = Layout(code, cls, tuple(f.name for f in fields),
                        tuple(f.metadata["check"] for f in fields),
                        tuple(f.metadata["wire"] for f in fields),
                        tuple(f.default for f in fields[optional_from:]), optional_from + 1)
        if code in LAYOUTS:
            raise TypeError(f"message code {code} declared twice")
        LAYOUTS[code] = layout
        _BY_CLASS[cls] = layout
        cls.CODE = code  # type: ignore[attr-defined]
        return cls
    return declare


@message(HELLO)
@attrs.frozen(slots=True)
class Hello:
    """Client → server, first message: who is calling and what it speaks."""

    version: int = field(integer("version"))
    client_id: str = field(text("client id"))
    features: tuple[str, ...] = field(strings("features"), wire=as_list, default=())
    auth: dict[str, Any] | None = field(optional(mapping("metadata")), default=None)


@message(WELCOME)
@attrs.frozen(slots=True)
class Welcome:
    """Server → client, answer to Hello: the server's identity and manifest."""

    version: int = field(integer("version"))
    server_id: str = field(text("server id"))
    zone: str | None = field(optional(text("zone")))
    metadata: dict[str, Any] = field(mapping("metadata"))
    manifest: tuple[InterfaceInfo, ...] = field(manifest, wire=manifest_to_wire)
    features: tuple[str, ...] = field(strings("features"), wire=as_list, default=())


@message(REQUEST)
@attrs.frozen(slots=True)
class Request:
    """A call expecting an answer, from either side; `timeout` is the caller's remaining
    time in seconds; `headers` carries call context, call chain, stream credit."""

    id: int = field(request_id)
    interface: str = field(text("interface"))
    key: Key = field(grain_key)
    method: str = field(text("method"))
    args: list[Any] = field(arguments)
    kwargs: dict[str, Any] = field(keyword_arguments)
    timeout: float | None = field(timeout)
    headers: dict[str, Any] | None = field(headers, default=None, trailing=True)


@message(RESPONSE)
@attrs.frozen(slots=True)
class Response:
    id: int = field(request_id)
    result: Any = field(anything)


@message(FAILURE)
@attrs.frozen(slots=True)
class Failure:
    """A call's typed error: a `forkcore.errors` class name or the grain's exception name."""

    id: int = field(request_id)
    kind: FailureKind | str = field(failure_kind, wire=as_str)
    type_name: str = field(text("type name"))
    message: str = field(text("message", 65536))
    # more about the failure: {"traceback": text} from a server with `debug = true`
    details: dict[str, Any] | None = field(optional(mapping("details")), default=None,
                                           trailing=True)


@message(ONE_WAY)
@attrs.frozen(slots=True)
class OneWay:
    interface: str = field(text("interface"))
    key: Key = field(grain_key)
    method: str = field(text("method"))
    args: list[Any] = field(arguments)
    kwargs: dict[str, Any] = field(keyword_arguments)
    headers: dict[str, Any] | None = field(headers, default=None, trailing=True)


@message(PING)
@attrs.frozen(slots=True)
class Ping:
    nonce: int = field(integer("nonce"))
    sent_at: float = field(number("timestamp"))


@message(PONG)
@attrs.frozen(slots=True)
class Pong:
    nonce: int = field(integer("nonce"))
    sent_at: float = field(number("timestamp"))


@message(GOODBYE)
@attrs.frozen(slots=True)
class Goodbye:
    """The sender is draining or closing; `reason` is for logs."""

    reason: str = field(text("reason", 65536))


@message(CANCEL)
@attrs.frozen(slots=True)
class Cancel:
    """The caller gave up on request `id` (or the consumer closed stream `id`)."""

    id: int = field(request_id)


@message(AUTH_CHALLENGE)
@attrs.frozen(slots=True)
class AuthChallenge:
    """Server → client, answer to a Hello offering a pre-shared key: the server's nonce,
    its proof that it knows the key, and whether the session after the handshake is
    encrypted with the key (covered by the proofs)."""

    nonce: bytes = field(octets("nonce"))
    proof: bytes = field(octets("proof"))
    encrypt: bool = field(boolean("encrypt"), default=True)


@message(AUTH_PROOF)
@attrs.frozen(slots=True)
class AuthProof:
    """Client → server: the client's proof that it knows the key."""

    proof: bytes = field(octets("proof"))


@message(STATS_REQUEST)
@attrs.frozen(slots=True)
class StatsRequest:
    """Client → server: ask for the server's counters (for `forkcore status`)."""

    nonce: int = field(integer("nonce"))


@message(STATS)
@attrs.frozen(slots=True)
class Stats:
    """Server → client: counters such as calls served, calls in flight, activations."""

    nonce: int = field(integer("nonce"))
    values: dict[str, Any] = field(mapping("metadata"))


@message(STREAM_ITEM)
@attrs.frozen(slots=True)
class StreamItem:
    """The producer → the consumer: the next item of stream `id` (takes one credit)."""

    id: int = field(request_id)
    item: Any = field(anything)


@message(STREAM_CREDIT)
@attrs.frozen(slots=True)
class StreamCredit:
    """The consumer → the producer: `credit` more items of stream `id` may be sent."""

    id: int = field(request_id)
    credit: int = field(integer("credit"))


@message(STREAM_END)
@attrs.frozen(slots=True)
class StreamEnd:
    """The producer → the consumer: stream `id` ended normally (a Failure ends it with
    an error, a Cancel from the consumer ends it early)."""

    id: int = field(request_id)


Message = (Hello | Welcome | Request | Response | Failure | OneWay | Ping | Pong | Goodbye
           | Cancel | AuthChallenge | AuthProof | StatsRequest | Stats | StreamItem
           | StreamCredit | StreamEnd)


def to_wire(msg: Message) -> list[Any]:
    """The CBOR array for `msg` (see docs/protocol.md): trailing defaults left off."""
    layout = _BY_CLASS.get(type(msg))
    if layout is None:
        raise TypeError(f"not a protocol message: {msg!r}")
    values = [getattr(msg, name) for name in layout.names]
    keep = len(values)
    optional_from = layout.required - 1
    defaults = layout.defaults
    while keep > optional_from and values[keep - 1] == defaults[keep - 1 - optional_from]:
        keep -= 1
    out: list[Any] = [layout.code]
    for value, wire in zip(values[:keep], layout.wires, strict=False):
        out.append(value if wire is None else wire(value))
    return out


def from_wire(item: Any) -> Message:
    """The message for a decoded CBOR item, or `ProtocolError` if it is not one."""
    if not isinstance(item, list) or not item:
        raise _bad("a message is a non-empty array")
    code = item[0]
    layout = LAYOUTS.get(code) if type(code) is int else None
    if layout is None:
        raise _bad(f"unknown message type {code!r}")
    n = len(item)
    if not layout.required <= n <= layout.longest:
        expected = str(layout.required) if layout.required == layout.longest else \
            f"{layout.required} to {layout.longest}"
        raise _bad(f"message type {code} has {n} fields, expected {expected}")
    values = [check(v) for check, v in zip(layout.checks, item[1:], strict=False)]
    result: Message = layout.cls(*values)
    return result


def fields_of(msg: Message) -> tuple[Any, ...]:
    """The values of `msg`'s fields, in wire order."""
    return tuple(getattr(msg, name) for name in _BY_CLASS[type(msg)].names)


def describe_layouts() -> Mapping[str, tuple[int, int, int]]:
    """name → (code, fewest elements, most elements): the table in docs/protocol.md."""
    return {layout.cls.__name__: (code, layout.required, layout.longest)
            for code, layout in sorted(LAYOUTS.items())}


# -- the hot path ------------------------------------------------------------------------


def request_fields(a: list[Any]) -> tuple[int, str, Key, str, list[Any], dict[str, Any],
                                          float | None, dict[str, Any] | None]:
    """The fields of a Request array, validated as `from_wire` does but faster: the
    receiving side runs this for every call. The common types are checked inline;
    anything else goes to the declared checks, which accept it or say what is wrong."""
    n = len(a)
    if n == 8:
        _, rid, interface, key, method, args, kwargs, time_left = a
        extra = None
    elif n == 9:
        _, rid, interface, key, method, args, kwargs, time_left, extra = a
        extra = headers(extra)
    else:
        raise _bad(f"message type {REQUEST} has {n} fields, expected 8 to 9")
    if type(rid) is not int or not 0 <= rid < _MAX_ID:
        rid = request_id(rid)
    if type(interface) is not str or len(interface) > 1024:
        interface = text("interface")(interface)
    tk = type(key)
    if tk is not str and tk is not int and tk is not bytes:
        key = grain_key(key)
    if type(method) is not str or len(method) > 1024:
        method = text("method")(method)
    if type(args) is not list:
        args = arguments(args)
    if type(kwargs) is not dict or kwargs:
        kwargs = keyword_arguments(kwargs)
    if time_left is not None and (type(time_left) is not float
                                  or not 0.0 <= time_left < math.inf):
        time_left = timeout(time_left)
    return rid, interface, key, method, args, kwargs, time_left, extra
