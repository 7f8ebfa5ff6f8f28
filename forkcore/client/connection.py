"""One client connection to one server: the I/O around a `ClientSession`.

The session (forkcore/protocol/session.py) owns the protocol: the handshake, request
ids, pending calls and their deadlines, cancel, ping, goodbye. This class pumps it:
it sends what the session produces, feeds it what arrives, sleeps until the next
deadline, and turns what happens into the pool's view of the server (RTT, draining,
closed). A call registers a `Pending` slot and waits for it; the reader or the deadline
watcher fills it. When the connection dies every pending call fails at once with
`ConnectError`, never at its timeout.

Deadlines on the client are `time.monotonic()` values (forkcore.clock): reading anyio's
clock costs ten times more, and a call reads the clock on its hot path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from anyio.lowlevel import checkpoint

from ..clock import now as clock
from ..config import SecurityOptions
from ..errors import ConnectError, ForkcoreError, ProtocolError
from ..grains import Key
from ..protocol.messages import OneWay, Welcome
from ..protocol.session import ClientSession, ServerRefused, failure_error
from ..transport import Channel
from .health import peak_ewma

log = logging.getLogger("forkcore.client")

# the reader lets the callers it answered run after this many answers
YIELD_EVERY = 16

__all__ = ["ClientConnection", "NotSent", "Pending", "ServerRefused", "failure_error"]


class Pending:
    """One caller waiting for its answer (a `Waiter` of the session)."""

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


class ClientConnection:
    """An open, handshaken connection; `run()` reads until it closes."""

    def __init__(self, channel: Channel, endpoint: str, session: ClientSession) -> None:
        assert session.welcome is not None
        self.channel = channel
        self.endpoint = endpoint
        self.welcome: Welcome = session.welcome
        self.session = session
        session.peer = f"server {self.welcome.server_id} ({endpoint})"
        session.handler = self
        self.pending = session.pending  # the session's table, read by the pool
        self.closed = False
        self.draining = False
        self.goodbye: str | None = None  # the reason the server gave, once it said goodbye
        self.rtt: float | None = None
        self.last_error: str | None = None
        self.on_change: Callable[[ClientConnection], None] | None = None
        self._watching_until = math.inf
        self._deadline_wake = anyio.Event()
        # the running backend's Event class, made directly: anyio.Event() looks the
        # backend up on every call
        self._new_event: Callable[[], anyio.Event] = type(self._deadline_wake)
        self.last_heard = clock()
        self.responsive = True
        self._rtt_at = self.last_heard

    @classmethod
    async def handshake(cls, channel: Channel, endpoint: str, client_id: str,
                        timeout: float, security: SecurityOptions | None = None,
                        psk: bytes | None = None) -> ClientConnection:
        """Hello → [AuthChallenge → AuthProof] → Welcome, within `timeout` seconds."""
        session = ClientSession(
            endpoint, client_id=client_id, psk=psk,
            identity=security.identity if security is not None else "client",
            token=security.token if security is not None else None,
            channel_secure=getattr(channel, "secure", False))
        try:
            with anyio.fail_after(timeout):
                channel.send(session.hello())
                while session.welcome is None:
                    try:
                        session.receive(await channel.receive())
                    finally:
                        _flush(channel, session)
        except TimeoutError:
            raise ConnectError(f"{endpoint} did not complete the handshake within {timeout:g}s; "
                               "is it a forkcore server of the same transport?") from None
        except ProtocolError as exc:
            raise ConnectError(f"{endpoint} answered the handshake badly: {exc}") from None
        return cls(channel, endpoint, session)

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
              kwargs: dict[str, Any], deadline: float, delivery: str = "reliable",
              headers: dict[str, Any] | None = None) -> tuple[int, Pending]:
        """Send one call. The caller awaits `pending.event` (the reader or the deadline
        watcher sets it), then reads `pending.error` / `pending.result`, or calls
        `abandon(rid)` if it stops waiting first."""
        if self.closed:
            raise NotSent(f"connection to {self.server_id} ({self.endpoint}) is closed")
        pending = Pending(self._new_event())
        rid, body = self.session.request(interface, key, method, args, kwargs, deadline,
                                         clock(), pending, headers)
        try:
            self.channel.send(body, delivery)
        except ConnectError as exc:
            self.session.forget(rid)
            self.close(str(exc))  # the transport knows first: let routing see it now
            raise NotSent(str(exc)) from None
        if deadline < self._watching_until:
            self._deadline_wake.set()  # earlier than what the watcher sleeps towards
        return rid, pending

    def abandon(self, rid: int) -> None:
        """The caller stopped waiting for `rid` (it was cancelled)."""
        self.session.abandon(rid)
        self._flush()

    async def watch_deadlines(self) -> None:
        """Fail calls at their deadline: one task per connection sleeping until the
        earliest deadline, instead of a cancel scope per call (which costs more than the
        rest of the call)."""
        session = self.session
        while not self.closed:
            now = clock()
            self._watching_until = session.expire(now)
            self._flush()
            self._deadline_wake = self._new_event()
            with anyio.move_on_after(self._watching_until - now):
                await self._deadline_wake.wait()

    def one_way(self, interface: str, key: Key, method: str, args: list[Any],
                kwargs: dict[str, Any], delivery: str,
                headers: dict[str, Any] | None = None) -> None:
        if self.closed:
            raise NotSent(f"connection to {self.server_id} ({self.endpoint}) is closed")
        try:
            self.channel.send(self.session.one_way(interface, key, method, args, kwargs,
                                                   headers), delivery)
        except ConnectError as exc:
            self.close(str(exc))
            raise NotSent(str(exc)) from None

    async def stats(self, timeout: float) -> dict[str, Any] | None:
        """The server's counters, or None if it does not answer within `timeout`."""
        pending = Pending(self._new_event())
        nonce, body = self.session.stats_request(pending)
        try:
            self.channel.send(body)
            with anyio.move_on_after(timeout):
                await pending.event.wait()
        except ConnectError:
            return None
        finally:
            self.session.forget_stats(nonce)
        return pending.result if pending.done and pending.error is None else None

    def ping(self) -> None:
        """Send a Ping carrying our clock; the Pong echoes it back, giving one RTT sample."""
        self.channel.send(self.session.ping(clock()))

    # -- what the session hands over (its Handler) ----------------------------------------

    def on_request(self, rid: int, interface: str, key: Key, method: str, args: list[Any],
                   kwargs: dict[str, Any], timeout: float | None,
                   headers: dict[str, Any] | None) -> Any:
        """A callback from the server: this client serves none yet."""
        from ..protocol.messages import FailureKind

        self.session.outgoing.append(self.session.fail(
            rid, FailureKind.NOT_FOUND, "MethodNotFound",
            f"client {self.session.client_id} serves no {interface}.{method}"))
        return None

    def on_one_way(self, msg: OneWay) -> None:
        log.debug("one-way %s.%s from server %s dropped: this client serves none",
                  msg.interface, msg.method, self.server_id)

    def on_cancel(self, token: Any) -> None:
        pass

    def on_pong(self, sent_at: float) -> None:
        now = self.last_heard
        sample = now - sent_at
        if 0 <= sample < 3600:
            self.rtt = peak_ewma(self.rtt, sample, now - self._rtt_at)
            self._rtt_at = now
            if self.on_change is not None:
                self.on_change(self)

    def on_goodbye(self, reason: str) -> None:
        self.draining = True
        self.goodbye = reason
        log.info("server %s (%s) says goodbye: %s", self.server_id, self.endpoint, reason)
        if self.on_change is not None:
            self.on_change(self)

    def on_stats_request(self) -> dict[str, Any]:
        return {}

    # -- reading --------------------------------------------------------------------------

    async def run(self) -> None:
        """Read until the connection ends; then fail whatever is in flight."""
        reason = "closed"
        receive = self.channel.receive
        deliver = self.session.receive
        outgoing = self.session.outgoing
        resolved = 0
        try:
            while True:
                body = await receive()
                self.last_heard = clock()
                if not self.responsive:
                    self.set_responsive(True)
                if deliver(body):
                    resolved += 1
                    if resolved == YIELD_EVERY:
                        # let the callers answered so far run (and send their next calls)
                        # while the server works on the rest: pipelining
                        resolved = 0
                        await checkpoint()
                elif outgoing:
                    self._flush()
        except ConnectError as exc:
            reason = str(exc)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("closing connection to %s: %s", self.endpoint, exc)
        finally:
            self.close(reason)

    def _flush(self) -> None:
        if self.session.outgoing and not self.closed:
            try:
                _flush(self.channel, self.session)
            except ConnectError:
                pass

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
        self.session.close(reason)
        if self.on_change is not None:
            self.on_change(self)


def _flush(channel: Channel, session: ClientSession) -> None:
    """Send the frames the session queued itself (Pongs, Cancels, proofs, refusals)."""
    outgoing = session.outgoing
    while outgoing:
        channel.send(outgoing.pop(0))
