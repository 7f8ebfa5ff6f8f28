"""Grain interfaces, grain implementations, `rpc()` options and grain ids.

An interface is a class of `async def` stubs; subclassing `GrainInterface` records a
frozen `InterfaceSpec` on it once, so neither the client nor the server inspects
classes on a call's path.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import uuid
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

import attrs

from .errors import ConfigError

Key = str | int | uuid.UUID | bytes
KEY_TYPES = (str, int, uuid.UUID, bytes)
DELIVERY_MODES = ("reliable", "reliable_unordered", "sequenced", "unreliable")

F = TypeVar("F", bound=Callable[..., Any])


def check_key(key: object) -> Key:
    """Return `key` if it is a valid grain key, else raise a `ConfigError` saying why."""
    if isinstance(key, bool) or not isinstance(key, KEY_TYPES):
        raise ConfigError(
            f"a grain key must be str, int, uuid.UUID or bytes, not {type(key).__name__}"
        )
    return key


def key_bytes(key: Key) -> bytes:
    """A stable, type-tagged byte form of a key: equal keys of different types differ."""
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"b" + key
    if isinstance(key, uuid.UUID):
        return b"u" + key.bytes
    return b"i" + str(key).encode("ascii")


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process and on every machine (BLAKE2b),
    unlike Python's `hash()`."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@attrs.frozen(slots=True)
class GrainId:
    """Identity of one grain: its interface's wire name and its key."""

    interface: str
    key: Key = attrs.field(validator=lambda _i, _a, v: check_key(v))
    _hash64: int | None = attrs.field(default=None, init=False, eq=False, repr=False)

    def __str__(self) -> str:
        return f"{self.interface}/{self.key!r}"

    @property
    def stable_hash(self) -> int:
        """64-bit hash of interface and key, identical in every process (computed once)."""
        h = self._hash64
        if h is None:
            h = stable_hash(self.interface.encode("utf-8", "surrogatepass") + b"\0"
                            + key_bytes(self.key))
            object.__setattr__(self, "_hash64", h)
        return h


class AffinityMode(StrEnum):
    """How strongly a grain reference is bound to one server."""

    NONE = "none"
    PREFERRED = "preferred"
    REQUIRED = "required"


@attrs.frozen(slots=True)
class Affinity:
    """A server a grain should (or must) be called on."""

    server: str
    mode: AffinityMode = attrs.field(converter=AffinityMode)


@attrs.frozen(slots=True)
class InterfaceInfo:
    """What a server declares for one interface in its manifest."""

    name: str
    version: int
    methods: frozenset[str]


@attrs.frozen(slots=True)
class MethodSpec:
    """The `rpc()` options of one interface method, resolved once at class creation."""

    name: str
    delivery: str = "reliable"
    one_way: bool = False
    idempotent: bool = False
    timeout: float | None = None
    # raises TypeError, as Python would, for arguments the interface's signature refuses
    check_arguments: ArgumentCheck | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def waits_for_result(self) -> bool:
        """False for one-way and non-reliable methods: the caller gets None at once."""
        return not self.one_way and self.delivery in ("reliable", "reliable_unordered")


@attrs.frozen(slots=True)
class InterfaceSpec:
    """A grain interface: wire name, version and method specs."""

    name: str
    version: int
    methods: Mapping[str, MethodSpec]
    cls: type[GrainInterface] = attrs.field(eq=False, repr=False)

    def info(self) -> InterfaceInfo:
        return InterfaceInfo(self.name, self.version, frozenset(self.methods))


def rpc(
    *,
    delivery: str = "reliable",
    one_way: bool = False,
    idempotent: bool = False,
    timeout: float | None = None,
) -> Callable[[F], F]:
    """Set the call options of an interface method.

    `delivery` is one of "reliable", "reliable_unordered", "sequenced", "unreliable";
    a non-reliable or `one_way` method returns None to the caller without waiting.
    `idempotent=True` lets the client resend the call after a failure; `timeout`
    (seconds) overrides the client's `request_timeout` for this method.
    """
    if delivery not in DELIVERY_MODES:
        raise ConfigError(f"rpc(delivery={delivery!r}): choose one of {', '.join(DELIVERY_MODES)}")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise ConfigError(f"rpc(timeout={timeout!r}): give a positive number of seconds")
    options = {
        "delivery": delivery,
        "one_way": bool(one_way),
        "idempotent": bool(idempotent),
        "timeout": None if timeout is None else float(timeout),
    }

    def mark(fn: F) -> F:
        fn.__forkcore_rpc__ = options  # type: ignore[attr-defined]
        return fn

    return mark


def reentrant(obj: F) -> F:
    """Let calls to this grain method (or every method of this grain class) interleave.

    By default calls to one activation run one at a time, in arrival order; a reentrant
    method's calls start at once, alongside whatever else the activation is running.
    """
    obj.__forkcore_reentrant__ = True  # type: ignore[attr-defined]
    return obj


class GrainInterface:
    """Base class of grain interfaces: `class IGame(GrainInterface, name="game", version=2)`."""

    __forkcore_interface__: ClassVar[InterfaceSpec]

    def __init_subclass__(cls, *, name: str | None = None, version: int = 1,
                          _forkcore_proxy: bool = False, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if _forkcore_proxy:
            return
        if issubclass(cls, Grain):
            if name is not None or version != 1:
                raise ConfigError(
                    f"{cls.__qualname__}: name= and version= belong on the GrainInterface, "
                    "not on the Grain implementing it"
                )
            return
        wire_name = cls.__qualname__ if name is None else name
        if not isinstance(wire_name, str) or not wire_name:
            raise ConfigError(f"{cls.__qualname__}: name= must be a non-empty string")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"{cls.__qualname__}: version= must be an int >= 1, not {version!r}")
        spec = InterfaceSpec(wire_name, version, _collect_methods(cls), cls)
        cls.__forkcore_interface__ = spec
        _known[wire_name] = spec


_known: dict[str, InterfaceSpec] = {}


def known_interface(name: str) -> InterfaceSpec | None:
    """The most recently defined interface of this wire name in this process, if any."""
    return _known.get(name)


def _collect_methods(cls: type) -> dict[str, MethodSpec]:
    methods: dict[str, MethodSpec] = {}
    for klass in reversed(cls.__mro__):
        if not issubclass(klass, GrainInterface) or klass is GrainInterface:
            continue
        for attr, value in vars(klass).items():
            if attr.startswith("_"):
                continue
            if not inspect.iscoroutinefunction(value):
                if callable(value):
                    raise ConfigError(
                        f"{cls.__qualname__}.{attr}: interface methods must be 'async def'"
                    )
                continue
            options = getattr(value, "__forkcore_rpc__", {})
            methods[attr] = MethodSpec(attr, **options,
                                       check_arguments=argument_checker(cls, attr, value))
    return methods


class ArgumentCheck:
    """A check of call arguments against an interface method's signature. The common
    call (positional arguments only, a count the signature takes) passes on one
    comparison the caller makes itself (`fewest <= len(args) <= most`, no keywords);
    anything else binds the signature, so the caller gets Python's own TypeError,
    locally, instead of `grain raised TypeError` after a round trip."""

    __slots__ = ("fewest", "most", "qualname", "signature")

    def __init__(self, signature: inspect.Signature, fewest: float, most: float,
                 qualname: str) -> None:
        self.signature = signature
        self.fewest = fewest
        self.most = most
        self.qualname = qualname

    def __call__(self, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> None:
        if not kwargs and self.fewest <= len(args) <= self.most:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.qualname}: {exc}") from None


def argument_checker(cls: type, name: str, stub: Callable[..., Any]) -> ArgumentCheck:
    """The `ArgumentCheck` of interface method `name` (the stub `stub`)."""
    signature = inspect.signature(stub)
    params = list(signature.parameters.values())[1:]  # without self
    signature = signature.replace(parameters=params)
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    fewest: float = sum(1 for p in positional if p.default is inspect.Parameter.empty)
    if any(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
           for p in params):
        fewest = math.inf  # a required keyword-only argument: always bind
    most = math.inf if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) \
        else len(positional)
    return ArgumentCheck(signature, fewest, most, f"{cls.__qualname__}.{name}()")


def interface_spec(interface: type[GrainInterface] | Any) -> InterfaceSpec:
    """The spec of a GrainInterface subclass, or a `ConfigError` if it is not one."""
    spec = getattr(interface, "__forkcore_interface__", None)
    if not isinstance(spec, InterfaceSpec) or spec.cls is not interface:
        raise ConfigError(f"{interface!r} is not a GrainInterface subclass")
    return spec


class Grain:
    """Base class of grain implementations: `class Game(forkcore.Grain, IGame)`.

    The runtime sets `grain_id` and `key` before `__init__` runs, awaits `on_activate`
    before the activation's first call and `on_deactivate` when it is collected.
    """

    grain_id: GrainId
    key: Key
    __forkcore_interfaces__: ClassVar[tuple[InterfaceSpec, ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.__forkcore_interfaces__ = _hosted_interfaces(cls)

    async def on_activate(self) -> None:
        """Called once before the activation's first call."""

    async def on_deactivate(self) -> None:
        """Called once when the activation is collected or the server stops."""


def _hosted_interfaces(cls: type) -> tuple[InterfaceSpec, ...]:
    """The most derived interfaces among `cls`'s bases: an interface inherited by another
    interface of the same grain is served through that one."""
    interfaces = [
        k for k in cls.__mro__
        if issubclass(k, GrainInterface) and not issubclass(k, Grain) and k is not GrainInterface
    ]
    leaves = [k for k in interfaces if not any(o is not k and issubclass(o, k) for o in interfaces)]
    return tuple(k.__forkcore_interface__ for k in leaves)


def is_reentrant(grain_cls: type, method: str) -> bool:
    if getattr(grain_cls, "__forkcore_reentrant__", False):
        return True
    return bool(getattr(getattr(grain_cls, method, None), "__forkcore_reentrant__", False))
