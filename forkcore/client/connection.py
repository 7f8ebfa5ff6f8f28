"""One client connection to one server: handshake, request/response matching, pings.

A call registers a `Pending` slot under a fresh request id and waits for it with its
deadline; the reader fills the slot. When the connection dies every pending call fails
at once with `ConnectError`, never at its timeout.

Deadlines on the client are `time.monotonic()` values: reading anyio's clock costs ten
times more, and a call reads the clock on its hot path.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from time import monotonic
from typing import Any

import anyio
import anyio.abc
from anyio.lowlevel import checkpoint

from ..config import SecurityOptions
from ..errors import (
    ConnectError,
    ForkcoreError,
    MethodNotFound,
    NoServerAvailable,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    Unauthorized,
)
from ..grains import Key
from ..protocol.connection import ProtocolConnection
from ..protocol.messages import (
    PROTOCOL_VERSION,
    RESPONSE,
    AuthChallenge,
    AuthProof,
    Cancel,
    Failure,
    Goodbye,
    Hello,
    OneWay,
    Ping,
    Pong,
    Response,
    Stats,
    StatsRequest,
    Welcome,
    from_wire,
)
from ..security import NONCE_SIZE, SessionCipher, new_nonce, proof, proofs_match
from ..transport import Channel
from .health import peak_ewma

log = logging.getLogger("forkcore.client")

# the reader lets the callers it answered run after this many answers
YIELD_EVERY = 16


class Pending:
    __slots__ = ("done", "error", "event", "result")

    def __init__(self, event: anyio.Event) -> None:
        self.event = event
        self.done = False
        self.result: Any = None
        self.error: ForkcoreError | None = None

    def resolve(self, result: Any) -> None:
        if not self.done:
            self.done = True
            self.result = result
            self.event.set()

    def fail(self, error: ForkcoreError) -> None:
        if not self.done:
            self.done = True
            self.error = error
            self.event.set()


class NotSent(ConnectError):
    """The call never left the client: it can go to another server without risk."""


class ServerRefused(NoServerAvailable):
    """The server refused the call without running it (draining, overloaded)."""


def failure_error(f: Failure) -> ForkcoreError:
    """The exception a caller sees for a Failure message."""
    if f.kind == "remote":
        return RemoteError(f.type_name, f.message)
    if f.kind == "method_not_found":
        return MethodNotFound(f.message)
    if f.kind == "timeout":
        return RequestTimeout(f.message)
    if f.kind == "unauthorized":
        return Unauthorized(f.message)
    if f.kind == "unavailable":
        return ServerRefused(f.message)
    return ProtocolError(f"{f.type_name}: {f.message}")


class ClientConnection:
    """An open, handshaken connection; `run()` reads until it closes."""

    def __init__(self, channel: Channel, endpoint: str, welcome: Welcome,
                 proto: ProtocolConnection) -> None:
        self.channel = channel
        self.endpoint = endpoint
        self.welcome = welcome
        self.proto = proto
        self.pending: dict[int, Pending] = {}
        self.closed = False
        self.draining = False
        self.rtt: float | None = None
        self.last_error: str | None = None
        self.on_change: Callable[[ClientConnection], None] | None = None
        self._stats: dict[int, Pending] = {}
        self._deadlines: list[tuple[float, int, str, str]] = []  # heap of pending deadlines
        self._watching_until = math.inf
        self._deadline_wake = anyio.Event()
        # the running backend's Event class, made directly: anyio.Event() looks the
        # backend up on every call
        self._new_event: Callable[[], anyio.Event] = type(self._deadline_wake)
        self.last_heard = monotonic()
        self.responsive = True
        self._rtt_at = self.last_heard
        self._next_id = 1

    @classmethod
    async def handshake(cls, channel: Channel, endpoint: str, client_id: str,
                        timeout: float, security: SecurityOptions | None = None,
                        psk: bytes | None = None) -> ClientConnection:
        """Hello → [AuthChallenge → AuthProof] → Welcome, within `timeout` seconds."""
        proto = ProtocolConnection("client")
        identity = security.identity if security is not None else "client"
        auth: dict[str, Any] = {}
        client_nonce = new_nonce()
        # encrypt the session with the key unless the transport encrypts and has verified
        # the server (TLS with unverified certificates may be a man in the middle)
        wanted = not getattr(channel, "secure", False)
        if psk is not None:
            auth.update(method="psk", nonce=client_nonce, identity=identity, encrypt=wanted)
        if security is not None and security.token is not None:
            auth["token"] = security.token
        try:
            with anyio.fail_after(timeout):
                channel.send(proto.encode(Hello(PROTOCOL_VERSION, client_id, (),
                                                auth or None)))
                msg = proto.decode(await channel.receive())
                challenged = isinstance(msg, AuthChallenge)
                if isinstance(msg, AuthChallenge):
                    msg = await cls._prove(channel, proto, endpoint, psk, client_nonce,
                                           identity, wanted, msg)
        except TimeoutError:
            raise ConnectError(f"{endpoint} did not complete the handshake within {timeout:g}s; "
                               "is it a forkcore server of the same transport?") from None
        except ProtocolError as exc:
            raise ConnectError(f"{endpoint} answered the handshake badly: {exc}") from None
        if isinstance(msg, Goodbye):
            if msg.reason.startswith("unauthorized"):
                raise Unauthorized(f"{endpoint} refused the connection: {msg.reason}")
            raise ConnectError(f"{endpoint} closed the connection: {msg.reason}")
        assert isinstance(msg, Welcome)
        if psk is not None and not challenged:
            raise Unauthorized(f"{endpoint} did not ask for the pre-shared key, so it cannot "
                               "prove it is one of ours: configure the same psk on the "
                               "server")
        return cls(channel, endpoint, msg, proto)

    @staticmethod
    async def _prove(channel: Channel, proto: ProtocolConnection, endpoint: str,
                     psk: bytes | None, client_nonce: bytes, identity: str, wanted: bool,
                     challenge: AuthChallenge) -> Any:
        """Check the server's proof (which covers whether we asked for encryption and
        whether it encrypts), send ours, and read the (encrypted) Welcome."""
        if psk is None:
            raise ConnectError(f"{endpoint} asked for a pre-shared key this client was not "
                               "given")
        server_nonce = challenge.nonce
        if len(server_nonce) != NONCE_SIZE:
            raise ConnectError(f"{endpoint} sent a {len(server_nonce)}-byte nonce; "
                               f"expected {NONCE_SIZE}")
        if wanted and not challenge.encrypt:
            channel.send(proto.encode(Goodbye("unauthorized: the session must be encrypted")))
            raise Unauthorized(f"{endpoint} would not encrypt the session although this "
                               "client asked it to (its channel is not verified): a downgrade "
                               "was attempted, by the server or by something between us; "
                               "refusing. Verify the server's certificate (ca_file or "
                               "fingerprint) if the network is trusted")
        expected = proof(psk, "server", client_nonce, server_nonce, identity, wanted=wanted,
                         encrypted=challenge.encrypt)
        if not proofs_match(expected, challenge.proof):
            channel.send(proto.encode(Goodbye("unauthorized: wrong pre-shared key")))
            raise Unauthorized(f"{endpoint} does not know this client's pre-shared key, or "
                               "something between us altered the key exchange (the server's "
                               "proof is wrong): check psk on both sides")
        channel.send(proto.encode(AuthProof(
            proof(psk, "client", client_nonce, server_nonce, identity, wanted=wanted,
                  encrypted=challenge.encrypt))))
        raw = await channel.receive()
        if not challenge.encrypt:  # the transport encrypts, and the server is verified
            return proto.decode(raw)
        cipher = SessionCipher(psk, client_nonce, server_nonce, "client")
        try:
            body = cipher.open(raw)
        except ProtocolError:
            # only a refusal may come unsealed: the server sends it before keying the
            # session. Anything else unsealed is someone trying to strip the encryption.
            refusal = proto.decode(raw)
            if isinstance(refusal, Goodbye):
                return refusal
            raise Unauthorized(f"{endpoint} answered the key exchange with an unencrypted "
                               f"{type(refusal).__name__}: refusing a downgraded session "
                               "(is something between the client and the server?)") from None
        msg = proto.decode(body)
        proto.cipher = cipher
        return msg

    def heard_at(self) -> float:
        """When the server last proved alive: its last message, or bytes of one still
        arriving (a large answer holds up the Pongs behind it, not its own bytes)."""
        # a transport plugin written before `Channel.received_at` existed counts messages
        received: float = getattr(self.channel, "received_at", 0.0)
        return received if received > self.last_heard else self.last_heard

    @property
    def server_id(self) -> str:
        return self.welcome.server_id

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    # -- calls ----------------------------------------------------------------------------

    def start(self, interface: str, key: Key, method: str, args: list[Any],
              kwargs: dict[str, Any], deadline: float) -> tuple[int, Pending]:
        """Send one call. The caller awaits `pending.event` (the reader or the deadline
        watcher sets it), then reads `pending.error` / `pending.result`, or calls
        `abandon(rid)` if it stops waiting first."""
        if self.closed:
            raise NotSent(f"connection to {self.server_id} ({self.endpoint}) is closed")
        rid = self._next_id
        self._next_id = rid + 1
        remaining = deadline - monotonic()
        body = self.proto.encode_request(rid, interface, key, method, args, kwargs,
                                         remaining if remaining > 0.0 else 0.0)
        try:
            self.channel.send(body)
        except ConnectError as exc:
            self.close(str(exc))  # the transport knows first: let routing see it now
            raise NotSent(str(exc)) from None
        pending = Pending(self._new_event())
        self.pending[rid] = pending
        deadlines = self._deadlines
        heapq.heappush(deadlines, (deadline, rid, interface, method))
        if deadlines[0][1] == rid and deadline < self._watching_until:
            self._deadline_wake.set()  # earlier than what the watcher sleeps towards
        return rid, pending

    def abandon(self, rid: int) -> None:
        """The caller stopped waiting for `rid` (it was cancelled)."""
        self.pending.pop(rid, None)
        self._cancel(rid)

    def _cancel(self, rid: int) -> None:
        """Tell the server we gave up on `rid`, so it can stop working on it."""
        if not self.closed:
            try:
                self.channel.send(self.proto.encode(Cancel(rid)))
            except ConnectError:
                pass

    async def watch_deadlines(self) -> None:
        """Fail calls at their deadline: one task per connection sleeping until the
        earliest deadline, instead of a cancel scope per call (which costs more than the
        rest of the call)."""
        deadlines = self._deadlines
        pending = self.pending
        while not self.closed:
            while deadlines and deadlines[0][1] not in pending:
                heapq.heappop(deadlines)  # answered already
            now = monotonic()
            while deadlines and deadlines[0][0] <= now:
                _, rid, interface, method = heapq.heappop(deadlines)
                overdue = pending.pop(rid, None)
                if overdue is not None:
                    overdue.fail(RequestTimeout(
                        f"{interface}.{method} on server {self.server_id} did not answer "
                        "within its deadline; raise request_timeout or rpc(timeout=...) if "
                        "it needs longer"))
                    self._cancel(rid)
                while deadlines and deadlines[0][1] not in pending:
                    heapq.heappop(deadlines)
            self._watching_until = deadlines[0][0] if deadlines else math.inf
            self._deadline_wake = anyio.Event()
            with anyio.move_on_after(self._watching_until - now):
                await self._deadline_wake.wait()

    def one_way(self, interface: str, key: Key, method: str, args: list[Any],
                kwargs: dict[str, Any], delivery: str) -> None:
        if self.closed:
            raise NotSent(f"connection to {self.server_id} ({self.endpoint}) is closed")
        try:
            self.channel.send(self.proto.encode(OneWay(interface, key, method, args, kwargs)),
                              delivery)
        except ConnectError as exc:
            self.close(str(exc))
            raise NotSent(str(exc)) from None

    async def stats(self, timeout: float) -> dict[str, Any] | None:
        """The server's counters, or None if it does not answer within `timeout`."""
        nonce = self._next_id
        self._next_id += 1
        pending = Pending(self._new_event())
        self._stats[nonce] = pending
        try:
            self.channel.send(self.proto.encode(StatsRequest(nonce)))
            with anyio.move_on_after(timeout):
                await pending.event.wait()
        except ConnectError:
            return None
        finally:
            self._stats.pop(nonce, None)
        return pending.result if pending.done and pending.error is None else None

    def ping(self) -> None:
        """Send a Ping carrying our clock; the Pong echoes it back, giving one RTT sample."""
        nonce = self._next_id
        self._next_id += 1
        self.channel.send(self.proto.encode(Ping(nonce, monotonic())))

    # -- reading --------------------------------------------------------------------------

    async def run(self) -> None:
        """Read responses until the connection ends; then fail whatever is in flight."""
        reason = "closed"
        pending = self.pending
        deadlines = self._deadlines
        receive = self.channel.receive
        decode_item = self.proto.decode_item
        resolved = 0
        try:
            while True:
                item = decode_item(await receive())
                self.last_heard = monotonic()
                if not self.responsive:
                    self.set_responsive(True)
                code = item[0]
                if code == RESPONSE and type(code) is int and len(item) == 3 \
                        and type(item[1]) is int:
                    # the hot path: a result, without building a Response
                    p = pending.pop(item[1], None)
                    if p is not None:
                        p.resolve(item[2])
                        resolved += 1
                        if resolved == YIELD_EVERY:
                            # let the callers answered so far run (and send their next
                            # calls) while the server works on the rest: pipelining
                            resolved = 0
                            await checkpoint()
                        # answered calls leave the deadline heap as they reach its top,
                        # so it holds about as many entries as there are calls in flight
                        while deadlines and deadlines[0][1] not in pending:
                            heapq.heappop(deadlines)
                    continue
                msg: Any = from_wire(item)
                t = type(msg)
                if t is Response:
                    p = pending.pop(msg.id, None)
                    if p is not None:
                        p.resolve(msg.result)
                elif t is Failure:
                    p = pending.pop(msg.id, None)
                    if p is not None:
                        p.fail(failure_error(msg))
                elif t is Pong:
                    now = self.last_heard
                    sample = now - msg.sent_at
                    if 0 <= sample < 3600:
                        self.rtt = peak_ewma(self.rtt, sample, now - self._rtt_at)
                        self._rtt_at = now
                        if self.on_change is not None:
                            self.on_change(self)
                elif t is Ping:
                    self.channel.send(self.proto.encode(Pong(msg.nonce, msg.sent_at)))
                elif t is Stats:
                    waiting = self._stats.pop(msg.nonce, None)
                    if waiting is not None:
                        waiting.resolve(msg.values)
                elif t is Goodbye:
                    self.draining = True
                    log.info("server %s (%s) says goodbye: %s", self.server_id, self.endpoint,
                             msg.reason)
                    if self.on_change is not None:
                        self.on_change(self)
                else:
                    raise ProtocolError(f"unexpected {t.__name__} from a server")
        except ConnectError as exc:
            reason = str(exc)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("closing connection to %s: %s", self.endpoint, exc)
        finally:
            self.close(reason)

    def set_responsive(self, responsive: bool) -> None:
        """Heartbeats say whether the server answers; routing skips it while it does not."""
        if responsive != self.responsive:
            self.responsive = responsive
            if not responsive:
                self.last_error = "stopped answering heartbeats"
            elif self.last_error == "stopped answering heartbeats":
                self.last_error = None  # recovered: nothing is wrong now
            if self.on_change is not None:
                self.on_change(self)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.last_error = reason
        pending, self.pending = self.pending, {}
        for p in pending.values():
            p.fail(ConnectError(
                f"connection to server {self.server_id} ({self.endpoint}) was lost while the "
                f"call was in flight ({reason}); it may or may not have run"))
        if self.on_change is not None:
            self.on_change(self)
