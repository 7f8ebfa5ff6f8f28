"""Typed grain proxies: a subclass of the interface per interface, built once and cached,
whose methods forward to the client with the method's options already resolved."""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import Any, Protocol

from ..grains import Affinity, GrainId, InterfaceSpec, MethodSpec


class Invoker(Protocol):
    """What a proxy calls: the client (named by what it does, so no import cycle)."""

    def invoke(self, grain_id: GrainId, affinity: Affinity | None, method: MethodSpec,
               args: list[Any], kwargs: dict[str, Any]) -> Awaitable[Any]: ...


class GrainRef:
    """What a proxy knows: the client, the grain id and the reference's affinity."""

    __slots__ = ("affinity", "client", "grain_id")

    def __init__(self, client: Invoker, grain_id: GrainId, affinity: Affinity | None) -> None:
        self.client = client
        self.grain_id = grain_id
        self.affinity = affinity


_proxies: dict[int, tuple[InterfaceSpec, type]] = {}


def _forwarder(method: MethodSpec) -> Any:
    # a plain function returning the client's coroutine: awaiting it is the same, and
    # a suspended call resumes through one frame fewer
    check = method.check_arguments
    fewest, most = (check.fewest, check.most) if check is not None else (0, math.inf)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if (kwargs or not fewest <= len(args) <= most) and check is not None:
            check(args, kwargs)  # a wrong call is the caller's TypeError, raised here
        ref: GrainRef = self._ref
        return ref.client.invoke(ref.grain_id, ref.affinity, method, list(args), kwargs)

    call.__name__ = call.__qualname__ = method.name
    return call


def proxy_class(spec: InterfaceSpec) -> type:
    """The proxy class for `spec` (a subclass of its interface)."""
    cached = _proxies.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    namespace: dict[str, Any] = {name: _forwarder(m) for name, m in spec.methods.items()}
    namespace["__slots__"] = ("_ref",)
    namespace["__init__"] = _init
    namespace["__repr__"] = _repr
    namespace["grain_id"] = property(lambda self: self._ref.grain_id)
    cls = type(f"{spec.cls.__name__}Proxy", (spec.cls,), namespace, _forkcore_proxy=True)
    _proxies[id(spec)] = (spec, cls)
    return cls


def _init(self: Any, ref: GrainRef) -> None:
    self._ref = ref


def _repr(self: Any) -> str:
    return f"<grain proxy {self._ref.grain_id}>"
