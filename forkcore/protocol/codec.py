"""CBOR encoding of values that cross the wire, with a registry of wire types.

Only the types listed in the contract encode; everything else fails before it is sent.
Decoding rejects unknown tags, duplicate map keys, indefinite-length items and nesting
past a limit, and never imports or constructs anything by a name read from the wire:
registered classes are looked up in this process's registry.

Map keys whose hash Python does not randomize (see `_KeyGuard`) cannot be used to make a
frame take quadratic time to decode: frames whose maps are keyed by strings only (almost
all of them) decode in one pass at no extra cost; any other frame is checked and decoded
again under a guard that refuses more than `MAX_KEYS_PER_HASH` distinct keys sharing one
hash.
"""

from __future__ import annotations

import datetime
import decimal
import fractions
import io
import ipaddress
import re
import threading
from collections.abc import Callable, Mapping
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
# distinct map keys (of one kind) with one hash value that a frame may hold: legitimate data
# has one, or a handful; hash flooding needs thousands
MAX_KEYS_PER_HASH = 64


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


class _Unsupported(WireTypeError):
    """Raised mid-encoding with the offending value, so the message can say where it is."""

    def __init__(self, value: Any) -> None:
        super().__init__(type(value).__qualname__)
        self.value = value


def _refuse(encoder: Any, value: Any) -> None:
    raise _Unsupported(value)


def _unsupported(value: Any, where: str | None) -> str:
    place = f" (at {where})" if where else ""
    return (
        f"a value of type {type(value).__qualname__}{place} cannot cross the wire: use None, "
        "bool, int, float, str, bytes, list, tuple, dict, uuid.UUID, datetime, or an attrs "
        "class registered with @forkcore.wire_type"
    )


def path_to(root: Any, target: Any, name: str, depth: int = 0) -> str | None:
    """Where `target` sits inside `root` (by identity), as `name[1]['pos']`, or None."""
    if root is target:
        return name
    if depth > DEFAULT_MAX_DEPTH:
        return None
    items: Any = ()
    if isinstance(root, list | tuple):
        items = enumerate(root)
    elif isinstance(root, dict):
        items = root.items()
    elif type(root) in _by_class:
        items = ((f, getattr(root, f)) for f in _by_class[type(root)].fields)
        return next((p for f, v in items
                     if (p := path_to(v, target, f"{name}.{f}", depth + 1))), None)
    for k, v in items:
        found = path_to(v, target, f"{name}[{k!r}]", depth + 1)
        if found:
            return found
    return None


def _default(encoder: Any, value: Any) -> None:
    entry = _by_class.get(type(value))
    if entry is None:
        raise _Unsupported(value)
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


def encode_if_plain(item: Any, *parts: Any, names: tuple[str, ...] = ()) -> bytes:
    """`encode(item)`, where everything in `item` outside `parts` is known to be plain
    (a message's own fields): only the parts are scanned. `names` name the parts in the
    error about a value that cannot cross (`args`, `result`, ...)."""
    for part in parts:
        t = type(part)
        if t in _PLAIN_TYPES or ((t is list or t is dict) and not part):
            continue  # the common cases, without a call
        if not _plain(part, 1):
            return _encode_general(item, parts, names)
    try:
        return _dumps(item)
    except (cbor2.CBOREncodeError, ValueError, TypeError):
        return _encode_general(item, parts, names)  # says what is wrong


def encode(value: Any) -> bytes:
    """Encode one value (a message body) to CBOR, or raise `WireTypeError`."""
    return encode_if_plain(value, value, names=("value",))


def _encode_general(value: Any, parts: tuple[Any, ...] = (),
                    names: tuple[str, ...] = ()) -> bytes:
    """Encode with our encoders for tuples, datetimes, wire types and refused types."""
    try:
        return cbor2.dumps(value, encoders=_ENCODERS, default=_default)
    except _Unsupported as exc:
        where = next((p for part, name in zip(parts, names, strict=False)
                      if (p := path_to(part, exc.value, name))), None)
        raise WireTypeError(_unsupported(exc.value, where)) from None
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
    # as a map key (immutable) the content arrives as a tuple holding a frozen mapping
    if not (isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], Mapping)):
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


# -- hash flooding ------------------------------------------------------------------------
#
# Python randomizes the hashes of str and bytes, not those of ints (hash(n) is n modulo
# 2**61 - 1), UUIDs (the hash of their int), tuples and attrs classes (combinations of
# their items' hashes) or aware datetimes. A map with thousands of distinct keys sharing
# one hash makes every insertion compare against all the others: a 400 KB frame of such
# UUID keys took 40 s to decode. Plain CBOR ints (at most 64 bits) and floats give only a
# few dozen values per hash, which is harmless; everything else is counted below.

_NON_STRING_KEY = "map key must be a text string or byte string"
_TUPLE_HEAD = b"\xd9\x9c\x41"  # tag 40001


class _KeyGuard:
    """The semantic decoders of one guarded decode: in key position (`immutable`), each
    records its value under its hash and refuses the frame once more than
    `MAX_KEYS_PER_HASH` distinct values of its kind share one hash."""

    __slots__ = ("_seen", "table")

    def __init__(self) -> None:
        # per kind: hash -> distinct values (compared in a cheap form)
        self._seen: tuple[dict[int, list[Any]], ...] = ({}, {}, {}, {}, {})
        table = dict(_SEMANTIC)
        # tag: (decoder, kind, the cheap form its values are compared in)
        for tag, (decode, kind, compared) in _GUARDED.items():
            table[tag] = self._counted(decode, kind, compared)
        self.table = table

    def _counted(self, decode: Callable[[Any, bool], Any], kind: int,
                 compared: Callable[[Any], Any]) -> Callable[[Any, bool], Any]:
        def counted(value: Any, immutable: bool) -> Any:
            result = decode(value, immutable)
            if immutable:
                self._note(kind, result, compared(result))
            return result

        return counted

    def _note(self, kind: int, value: Any, compared: Any) -> None:
        try:
            digest = hash(value)
        except Exception:
            raise ProtocolError(f"a map key is not hashable: a {type(value).__qualname__} "
                                "cannot be a map key") from None
        seen = self._seen[kind]
        values = seen.get(digest)
        if values is None:
            seen[digest] = [compared]
        elif compared not in values:
            if len(values) >= MAX_KEYS_PER_HASH:
                raise ProtocolError(
                    f"more than {MAX_KEYS_PER_HASH} distinct {type(value).__qualname__} map "
                    "keys with identical hashes in one message: hash flooding, refused")
            values.append(compared)


def _bignum(value: Any) -> int:
    if not isinstance(value, bytes):
        raise ProtocolError("malformed CBOR: a bignum (tag 2 or 3) must hold a byte string")
    return int.from_bytes(value, "big")


def _same(value: Any) -> Any:
    return value


# the tags whose values hash predictably, by kind: (decoder, kind, compared form)
_GUARDED: dict[int, tuple[Callable[[Any, bool], Any], int, Callable[[Any], Any]]] = {
    TAG_BIGNUM_POS: (lambda value, immutable: _bignum(value), 0, _same),
    TAG_BIGNUM_NEG: (lambda value, immutable: -1 - _bignum(value), 0, _same),
    TAG_UUID: (_decode_uuid, 1, lambda uuid: uuid.int),
    TAG_TUPLE: (_decode_tuple, 2, _same),
    TAG_WIRE_TYPE: (_decode_wire_type, 3, _same),
    TAG_DATETIME: (_decode_datetime, 4, _same),
    TAG_NAIVE_DATETIME: (_decode_naive_datetime, 4, _same),
}


def _truncated() -> ProtocolError:
    return ProtocolError("malformed CBOR: premature end of stream")


def _scalar_sizes() -> bytes:
    """For each initial byte: the size of the whole item when it is an int, a float, a
    simple value or a string of at most 23 bytes; 0 for anything else."""
    sizes = bytearray(256)
    for head in range(256):
        major, info = head >> 5, head & 0x1F
        if major in (0, 1, 7) and info < 28 and head != 0xFF:
            sizes[head] = 1 + {24: 1, 25: 2, 26: 4, 27: 8}.get(info, 0)
        elif major in (2, 3) and info < 24:
            sizes[head] = 1 + info
    return bytes(sizes)


_SCALAR_SIZES = _scalar_sizes()


def _key_arrays(data: bytes, max_depth: int) -> list[int]:
    """Walk the first CBOR item of `data` without building it: the offsets of the arrays
    that are map keys, which the caller tags as tuples so that `_KeyGuard` sees them
    (cbor2 turns an array key into a tuple without calling anything). A map used as a map
    key is refused: forkcore never sends one (a dict is not hashable). About 0.3 us per
    item, paid only by frames with keys other than strings."""
    sizes = _SCALAR_SIZES
    pos = 0
    stack: list[tuple[int, bool]] = []  # the enclosing containers' (remaining, in_map)
    remaining = 1  # items still to come in the current container (the top level: one)
    in_map = False  # a map's items alternate key, value: a key when `remaining` is even
    found: list[int] = []
    try:
        while True:
            head = data[pos]
            size = sizes[head]
            if size:  # the common case: a number, a short string, true, false, null
                pos += size
            else:
                key = in_map and not remaining % 2
                start = pos
                while True:
                    major, info = head >> 5, head & 0x1F
                    pos += 1
                    if info < 24:
                        arg = info
                    elif info < 28:
                        width = 1 << (info - 24)
                        arg = int.from_bytes(data[pos:pos + width], "big")
                        pos += width
                    else:
                        raise ProtocolError("malformed CBOR: indefinite length, break or "
                                            "reserved additional information")
                    if major != 6:
                        break
                    key = False  # a tag's content is checked by the tag's decoder
                    head = data[pos]
                if major == 4 or major == 5:
                    if key:
                        if major == 5:
                            raise ProtocolError("a map is used as a map key: maps cannot be "
                                                "keys on the wire")
                        found.append(start)
                    count = arg if major == 4 else 2 * arg
                    if count:
                        if len(stack) > max_depth:
                            raise ProtocolError(f"malformed CBOR: maximum container nesting "
                                                f"depth ({max_depth}) exceeded")
                        stack.append((remaining, in_map))
                        remaining, in_map = count, major == 5
                        continue
                elif major == 2 or major == 3:
                    pos += arg
            remaining -= 1
            while not remaining:  # the item is complete, and so may be its containers
                if not stack:
                    if pos > len(data):
                        raise _truncated()
                    return found
                remaining, in_map = stack.pop()
                remaining -= 1
    except IndexError:
        raise _truncated() from None


def _tag_key_arrays(data: bytes, offsets: list[int]) -> bytes:
    parts: list[bytes] = []
    previous = 0
    for offset in offsets:
        parts.append(data[previous:offset])
        parts.append(_TUPLE_HEAD)
        previous = offset
    parts.append(data[previous:])
    return b"".join(parts)


class _NonStringKey(Exception):
    """A map in the frame has a key that is neither a text nor a byte string."""


def _new_decoder(fp: Any, max_depth: int, semantic: dict[int, Any], strict: bool) -> Any:
    return cbor2.CBORDecoder(fp, semantic_decoders=semantic, tag_hook=_unknown_tag,
                             max_depth=max_depth, allow_indefinite=False,
                             allow_duplicate_keys=False, strict_hashable_types=strict)


class _Decoders(threading.local):
    """One reusable strict decoder per thread and depth limit: building a CBORDecoder
    with its options costs more than decoding a small frame. Reuse is safe because every
    tag that keeps state between items (shared values 28/29, string references 25/256)
    is refused, and a decoder that raised is dropped, not reused."""

    def __init__(self) -> None:
        self.by_depth: dict[int, Any] = {}


_decoders = _Decoders()


def _decode(data: bytes, max_depth: int, semantic: dict[int, Any], strict: bool) -> Any:
    fp = io.BytesIO(data)
    cached = _decoders.by_depth if semantic is _SEMANTIC and strict else None
    try:
        if cached is None:
            value = _new_decoder(fp, max_depth, semantic, strict).decode()
        else:
            decoder = cached.pop(max_depth, None)  # held by this call until it succeeds
            if decoder is None:
                decoder = _new_decoder(fp, max_depth, semantic, strict)
            else:
                decoder.fp = fp
            value = decoder.decode()
            cached[max_depth] = decoder
    except ProtocolError:
        raise
    except cbor2.CBORDecodeError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ProtocolError):
            raise ProtocolError(str(cause)) from None
        if strict and _NON_STRING_KEY in str(exc):
            raise _NonStringKey from None
        raise ProtocolError(f"malformed CBOR: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise ProtocolError(f"malformed CBOR: {exc}") from None
    extra = len(data) - fp.tell()
    if extra:
        raise ProtocolError(f"{extra} trailing bytes after the CBOR item")
    return value


def decode(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Decode exactly one CBOR item (nothing may follow it), or raise `ProtocolError`
    saying what is wrong with it."""
    try:
        # every map keyed by strings only: nothing to guard (their hashes are randomized)
        return _decode(data, max_depth, _SEMANTIC, strict=True)
    except _NonStringKey:
        pass
    offsets = _key_arrays(data, max_depth)
    if offsets:
        data = _tag_key_arrays(data, offsets)
    return _decode(data, max_depth, _KeyGuard().table, strict=False)
