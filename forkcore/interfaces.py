"""The plugin object interfaces, as `typing.Protocol`s: what each kind must provide.

A plugin author annotates a factory's return type (or assigns an instance to a
variable of one of these types) and mypy checks the object against the contract; the
typed `Register*` aliases do the same for whole hook implementations:

    @forkcore.hookimpl
    def forkcore_register_strategies(register: forkcore.interfaces.RegisterStrategy):
        register("mine", MyStrategy)   # mypy: is MyStrategy() a Strategy?

Every built-in and shipped plugin registers through these aliases, so `mypy` (strict,
in CI) checks them all. The meaning of each method is in docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

from .client.views import ServerView
from .grains import Affinity, GrainId, InterfaceInfo
from .interceptors import CallInfo


@runtime_checkable
class Strategy(Protocol):
    """Picks one server for a call. `servers` is never empty, and keeps its identity (the
    same list object) until the candidates change, so a strategy may cache on it."""

    def select(self, grain_id: GrainId, servers: Sequence[ServerView]) -> str: ...


@runtime_checkable
class ConflictResolver(Protocol):
    """Which of the servers offering an interface may serve it."""

    def resolve(self, interface: str, offers: Mapping[str, InterfaceInfo]) -> Collection[str]: ...


@runtime_checkable
class AffinityPolicy(Protocol):
    """Where a grain wants to go (`routed`, called after each routing, is optional)."""

    def affinity(self, grain_id: GrainId, servers: Sequence[ServerView]
                 ) -> Affinity | None: ...


@runtime_checkable
class Channel(Protocol):
    """One connection, carrying whole frame bodies in both directions.

    `secure` says whether nobody between the two ends can read or alter the frames
    without the transport noticing:

    - on a client's channel, True only when the transport encrypts and authenticates the
      bytes (TLS, QUIC) *and* has verified the server's certificate (a CA, a pinned
      fingerprint, a certificate this process generated). TLS without verification
      (`insecure`) is False: it may be a man in the middle's TLS;
    - on a server's channel, True when the transport encrypts and authenticates the
      bytes (the server cannot know whether the client verified it).

    With a pre-shared key, a client asks for the session to be encrypted by the core
    unless its channel is secure, and the server encrypts when asked or when its own
    channel is not secure; the decision is covered by both sides' proofs
    (docs/security.md, section 4.7). False is always safe: it costs a second encryption
    at most."""

    peer: str
    secure: bool
    # `time.monotonic()` when bytes last arrived from the peer, at least those that did
    # not complete a frame: a large message still arriving proves the peer alive (the
    # client's heartbeat reads it; whole messages it counts itself)
    received_at: float

    def send(self, body: bytes, delivery: str = "reliable") -> None:
        """Queue one frame; it leaves with the other frames of this loop turn.

        Never blocks; raises `ConnectError` once the channel is closed. Callers that may
        produce faster than the peer reads await `drain()`.
        """

    async def drain(self) -> None:
        """Wait until the send buffer is below its high-water mark (returns at once,
        without suspending, when it is); `ConnectError` once the channel is closed."""

    async def receive(self) -> bytes:
        """The next frame body; `ConnectError` when the peer is gone, `ProtocolError`
        when it broke the framing."""

    async def aclose(self) -> None:
        """Close now; the reader sees `ConnectError`."""


Handler = Callable[[Channel], Awaitable[None]]


@runtime_checkable
class Listener(Protocol):
    endpoint: str

    async def serve(self, handler: Handler) -> None:
        """Accept connections until cancelled, running `handler(channel)` for each."""

    def stop_accepting(self) -> None:
        """Refuse new connections; `serve` returns once the accepted ones have ended."""


@runtime_checkable
class Transport(Protocol):
    """Moves frame bodies between clients and servers."""

    name: str

    def connect(self, endpoint: str, *, timeout: float
                ) -> AbstractAsyncContextManager[Channel]: ...

    def listen(self, endpoint: str) -> AbstractAsyncContextManager[Listener]: ...


@runtime_checkable
class Observer(Protocol):
    """Watches calls (every method optional; see forkcore.observers)."""


@runtime_checkable
class Authenticator(Protocol):
    """Turns a client's token into an identity (or None: refused)."""

    def authenticate(self, token: str, peer: str) -> Any: ...


@runtime_checkable
class Interceptor(Protocol):
    """Code around every call, on the client or the server."""

    async def intercept(self, call: CallInfo, proceed: Callable[[], Awaitable[Any]]) -> Any: ...


@runtime_checkable
class Lease(Protocol):
    """A server's registration in a membership store, kept alive while held."""

    async def update(self, member: Any) -> None: ...


@runtime_checkable
class Membership(Protocol):
    """Who is in the cluster: watched by clients, joined by servers."""

    def watch(self) -> AsyncIterator[Sequence[Any]]: ...
    def join(self, member: Any) -> AbstractAsyncContextManager[Lease]: ...


@runtime_checkable
class Storage(Protocol):
    """Where grain state lives: compare-and-set on an etag."""

    async def read(self, key: str) -> tuple[bytes | None, str | None]: ...
    async def write(self, key: str, data: bytes, etag: str | None) -> str: ...
    async def delete(self, key: str, etag: str | None) -> None: ...
    def scan(self, prefix: str) -> AsyncIterator[tuple[str, bytes, str]]: ...


# typed `register` callables for hook implementations, one per kind
RegisterTransport = Callable[[str, Callable[..., Transport]], None]
RegisterStrategy = Callable[[str, Callable[..., Strategy]], None]
RegisterConflictResolver = Callable[[str, Callable[..., ConflictResolver]], None]
RegisterAffinityPolicy = Callable[[str, Callable[..., AffinityPolicy]], None]
RegisterObserver = Callable[[str, Callable[..., Any]], None]
RegisterAuthenticator = Callable[[str, Callable[..., Authenticator]], None]
RegisterMembership = Callable[[str, Callable[..., Membership]], None]
RegisterStorage = Callable[[str, Callable[..., Storage]], None]
RegisterInterceptor = Callable[[str, Callable[..., Interceptor]], None]

__all__ = [
    "AffinityPolicy",
    "Authenticator",
    "Channel",
    "ConflictResolver",
    "Handler",
    "Interceptor",
    "Lease",
    "Listener",
    "Membership",
    "Observer",
    "RegisterAffinityPolicy",
    "RegisterAuthenticator",
    "RegisterConflictResolver",
    "RegisterInterceptor",
    "RegisterMembership",
    "RegisterObserver",
    "RegisterStorage",
    "RegisterStrategy",
    "RegisterTransport",
    "Storage",
    "Strategy",
    "Transport",
]
