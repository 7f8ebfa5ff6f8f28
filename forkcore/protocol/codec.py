"""CBOR encoding of values that cross the wire, with a registry of wire types.

Only the types listed in the contract encode; everything else fails before it is sent.
Decoding rejects unknown tags, duplicate map keys, indefinite-length items and nesting
past a limit, and never imports or constructs anything by a name read from the wire:
registered classes are looked up in this process's registry.
"""

from __future__ import annotations

import datetime
import decimal
import fractions
import io
import ipaddress
import re
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import cbor2

from ..errors import ConfigError, ForkcoreError, ProtocolError

T = TypeVar("T", bound=type)
_dumps = cbor2.dumps

TAG_DATETIME = 0  # RFC 8949 standard date/time string (timezone-aware datetimes)
TAG_BIGNUM_POS = 2
TAG_BIGNUM_NEG = 3
TAG_UUID = 37
TAG_WIRE_TYPE = 40000  # [name, {field: value}]
TAG_TUPLE = 40001  # [items]
TAG_NAIVE_DATETIME = 40002  # ISO 8601 string without offset

DEFAULT_MAX_DEPTH = 64


class WireTypeError(ForkcoreError, TypeError):
    """A value cannot cross the wire: register its class with `forkcore.wire_type`."""


@attrs.frozen
class _WireClass:
    name: str
    cls: type
    fields: tuple[str, ...]


_by_name: dict[str, _WireClass] = {}
_by_class: dict[type, _WireClass] = {}


def wire_type(cls: T | None = None, *, name: str | None = None) -> Any:
    """Register an attrs class so its instances can cross the wire.

    Use as `@forkcore.wire_type` or `@forkcore.wire_type(name="game.Position")`. Both
    sides must register the class under the same name (default: module + qualified name).
    """

    def register(klass: T) -> T:
        if not attrs.has(klass):
            raise ConfigError(f"wire_type: {klass.__qualname__} is not an attrs class")
        wire_name = name or f"{klass.__module__}.{klass.__qualname__}"
        existing = _by_name.get(wire_name)
        if existing is not None and existing.cls is not klass:
            raise ConfigError(
                f"wire_type: name {wire_name!r} is already registered for "
                f"{existing.cls.__module__}.{existing.cls.__qualname__}; "
                "pass name= to choose another"
            )
        fields = tuple(f.name for f in attrs.fields(klass) if f.init)
        entry = _WireClass(wire_name, klass, fields)
        _by_name[wire_name] = entry
        _by_class[klass] = entry
        return klass  # type: ignore[return-value]

    return register if cls is None else register(cls)


# -- encoding ---------------------------------------------------------------------------


def _encode_tuple(encoder: Any, value: tuple[Any, ...]) -> None:
    encoder.encode_semantic(TAG_TUPLE, list(value))


def _encode_datetime(encoder: Any, value: datetime.datetime) -> None:
    if value.tzinfo is None:
        encoder.encode_semantic(TAG_NAIVE_DATETIME, value.isoformat())
    else:
        encoder.encode_semantic(TAG_DATETIME, value.isoformat())


def _refuse(encoder: Any, value: Any) -> None:
    raise WireTypeError(_unsupported(value))


def _unsupported(value: Any) -> str:
    return (
        f"a {type(value).__qualname__} cannot cross the wire: use None, bool, int, float, str, "
        "bytes, list, tuple, dict, uuid.UUID, datetime, or an attrs class registered with "
        "@forkcore.wire_type"
    )


def _default(encoder: Any, value: Any) -> None:
    entry = _by_class.get(type(value))
    if entry is None:
        raise WireTypeError(_unsupported(value))
    encoder.encode_semantic(
        TAG_WIRE_TYPE, [entry.name, {f: getattr(value, f) for f in entry.fields}]
    )


_REFUSED: tuple[type, ...] = (
    set, frozenset, datetime.date, decimal.Decimal, fractions.Fraction, re.Pattern, complex,
    ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network,
    ipaddress.IPv6Network, ipaddress.IPv4Interface, ipaddress.IPv6Interface,
    cbor2.CBORTag, cbor2.CBORSimpleValue,
)
_ENCODERS: dict[type, Callable[[Any, Any], None]] = {t: _refuse for t in _REFUSED}
_ENCODERS[tuple] = _encode_tuple
_ENCODERS[datetime.datetime] = _encode_datetime


_PLAIN_TYPES = frozenset({int, str, float, bytes, bool, type(None)})
_PLAIN_SCAN_ITEMS = 32  # a bigger container takes the general path (its cost dwarfs ours)


def _plain(value: Any, depth: int) -> bool:
    """True when `value` holds only types cbor2 encodes exactly as we do without our
    encoders (which cost more than a small call's whole encoding)."""
    t = type(value)
    if t in _PLAIN_TYPES:
        return True
    if depth > 4:
        return False
    if t is list:
        if len(value) > _PLAIN_SCAN_ITEMS:
            return False
        for item in value:
            if type(item) not in _PLAIN_TYPES and not _plain(item, depth + 1):
                return False
        return True
    if t is dict:
        if len(value) > _PLAIN_SCAN_ITEMS:
            return False
        for key, item in value.items():
            if type(key) is not str or (
                    type(item) not in _PLAIN_TYPES and not _plain(item, depth + 1)):
                return False
        return True
    return False


def encode_if_plain(item: Any, *parts: Any) -> bytes:
    """`encode(item)`, where everything in `item` outside `parts` is known to be plain
    (a message's own fields): only the parts are scanned."""
    for part in parts:
        if part and type(part) not in _PLAIN_TYPES and not _plain(part, 1):
            return encode(item)
    try:
        return _dumps(item)
    except (cbor2.CBOREncodeError, ValueError, TypeError):
        return encode(item)  # says what is wrong


def encode(value: Any) -> bytes:
    """Encode one value (a message body) to CBOR, or raise `WireTypeError`."""
    if _plain(value, 0):
        try:
            return _dumps(value)
        except (cbor2.CBOREncodeError, ValueError, TypeError):
            pass  # the general path below reports it
    try:
        return cbor2.dumps(value, encoders=_ENCODERS, default=_default)
    except WireTypeError:
        raise
    except (cbor2.CBOREncodeError, ValueError, TypeError, RecursionError) as exc:
        raise WireTypeError(f"cannot encode value: {exc}") from None


# -- decoding ---------------------------------------------------------------------------


def _reject_tag(tag: int) -> Callable[[Any, bool], Any]:
    def reject(value: Any, immutable: bool) -> Any:
        raise ProtocolError(f"CBOR tag {tag} is not allowed on the wire")

    return reject


def _decode_wire_type(value: Any, immutable: bool) -> Any:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], dict)):
        raise ProtocolError("malformed wire type value")
    entry = _by_name.get(value[0])
    if entry is None:
        raise ProtocolError(
            f"wire type {value[0]!r} is not registered here: register it with @forkcore.wire_type "
            "on both sides"
        )
    fields = value[1]
    if set(fields) - set(entry.fields):
        raise ProtocolError(f"wire type {value[0]!r} got unknown fields")
    try:
        return entry.cls(**fields)
    except Exception as exc:
        raise ProtocolError(f"wire type {value[0]!r} rejected its fields: {exc}") from None


def _decode_tuple(value: Any, immutable: bool) -> Any:
    if not isinstance(value, list | tuple):
        raise ProtocolError("malformed tuple value")
    return tuple(value)


def _parse_datetime(value: Any, aware: bool) -> datetime.datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise ProtocolError("malformed datetime value")
    try:
        result = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ProtocolError("malformed datetime value") from None
    if (result.tzinfo is not None) != aware:
        raise ProtocolError("datetime value with a missing or unexpected UTC offset")
    return result


def _decode_datetime(value: Any, immutable: bool) -> Any:
    return _parse_datetime(value, aware=True)


def _decode_naive_datetime(value: Any, immutable: bool) -> Any:
    return _parse_datetime(value, aware=False)


def _decode_uuid(value: Any, immutable: bool) -> Any:
    import uuid

    if not isinstance(value, bytes) or len(value) != 16:
        raise ProtocolError("malformed UUID value")
    return uuid.UUID(bytes=value)


# Tags cbor2 would decode on its own; every one not allowed here is rejected.
_BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 33, 34, 35, 36, 37,
                 52, 54, 100, 256, 258, 260, 261, 1004, 55799)
_SEMANTIC: dict[int, Any] = {t: _reject_tag(t) for t in _BUILTIN_TAGS}
del _SEMANTIC[TAG_BIGNUM_POS], _SEMANTIC[TAG_BIGNUM_NEG]
_SEMANTIC[TAG_DATETIME] = _decode_datetime
_SEMANTIC[TAG_NAIVE_DATETIME] = _decode_naive_datetime
_SEMANTIC[TAG_UUID] = _decode_uuid
_SEMANTIC[TAG_TUPLE] = _decode_tuple
_SEMANTIC[TAG_WIRE_TYPE] = _decode_wire_type


def _unknown_tag(tag: Any, immutable: bool) -> Any:
    raise ProtocolError(f"CBOR tag {tag.tag} is not allowed on the wire")


def decode(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Decode exactly one CBOR item (nothing may follow it), or raise `ProtocolError`
    saying what is wrong with it."""
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(
            fp,
            semantic_decoders=_SEMANTIC,
            tag_hook=_unknown_tag,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        ).decode()
    except ProtocolError:
        raise
    except cbor2.CBORDecodeError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ProtocolError):
            raise ProtocolError(str(cause)) from None
        raise ProtocolError(f"malformed CBOR: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise ProtocolError(f"malformed CBOR: {exc}") from None
    extra = len(data) - fp.tell()
    if extra:
        raise ProtocolError(f"{extra} trailing bytes after the CBOR item")
    return value
