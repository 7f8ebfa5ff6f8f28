"""One accepted client connection: the I/O around a `ServerSession`.

The session (forkcore/protocol/session.py) owns the protocol: the handshake and the
pre-shared key, request ids in flight, cancel, ping, goodbye. This class pumps it: it
feeds the session what arrives, sends what the session and the grains produce, checks
a token with the server's authenticator (the one step that may await user code), and
hands admitted calls to the catalog (`dispatch.admit` decides which).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Protocol

import anyio

from ..clock import now as clock
from ..config import ServerOptions
from ..errors import ConnectError, ProtocolError, Unauthorized
from ..grains import Key
from ..protocol import codec
from ..protocol.messages import HEADER_CONTEXT, FailureKind, OneWay
from ..protocol.session import Handler, Phase, ServerSession
from ..security import Identity
from ..transport import Channel
from .catalog import Call, Catalog
from .dispatch import Refusal, admit
from .hosting import Targets


class Host(Protocol):
    """What a connection needs of its server (forkcore.Server; no import: no cycle)."""

    id: str
    options: ServerOptions
    targets: Targets
    catalog: Catalog
    draining: bool
    max_in_flight: int
    one_way_dropped: int
    authenticator: Any

    def session_for(self, channel: Channel, handler: Handler) -> ServerSession: ...
    def refused(self, peer: str, reason: str) -> None: ...
    def stats(self) -> dict[str, Any]: ...

log = logging.getLogger("forkcore.server")

MAX_ERROR_MESSAGE = 8192  # characters of a grain exception's message sent to the caller


class ServerConnection:
    """One accepted client connection: handshake, then requests until it closes.

    Every eighth request it waits until the channel's unsent answers are below its
    high-water mark, so what a client that stops reading can make it hold is that mark
    plus eight answers plus those of the calls already admitted (at most
    `max_in_flight`)."""

    __slots__ = ("channel", "client_id", "dropped", "dropped_logged_at", "one_ways",
                 "scope", "server", "session")

    def __init__(self, server: Host, channel: Channel) -> None:
        self.server = server
        self.channel = channel
        self.session = server.session_for(channel, self)
        # one-way calls queued or running; with the calls served, counted against
        # max_in_flight
        self.one_ways = 0
        self.dropped = 0  # one-way calls dropped since the last warning about it
        self.dropped_logged_at = -math.inf
        self.client_id = "?"
        self.scope = anyio.CancelScope()

    @property
    def identity(self) -> Identity:
        return self.session.identity

    @property
    def calls(self) -> dict[int, Any]:
        """Requests of this connection being served: id → Call."""
        return self.session.serving

    def send(self, body: bytes) -> None:
        try:
            self.channel.send(body)
        except ConnectError:
            pass

    def goodbye(self, reason: str) -> None:
        self.send(self.session.goodbye(reason))

    def _flush(self) -> None:
        outgoing = self.session.outgoing
        while outgoing:
            self.send(outgoing.pop(0))

    def reply_for(self, request_id: int, interface: str, method: str) -> Any:
        session = self.session
        respond = session.respond
        channel = self.channel

        def reply(ok: bool, value: Any) -> None:
            if ok:
                try:
                    body = respond(request_id, value)
                except codec.WireTypeError as exc:
                    self.server.catalog.reports.unencodable(interface, method, exc)
                    self.send(session.fail(request_id, FailureKind.REMOTE, "WireTypeError",
                                           str(exc)))
                    return
                try:
                    channel.send(body)
                except ConnectError:
                    pass
            else:
                kind, type_name, message, *more = value
                if len(message) > MAX_ERROR_MESSAGE:
                    message = message[:MAX_ERROR_MESSAGE] + " [truncated]"
                trace = more[0] if more else None
                self.send(session.fail(request_id, kind, type_name[:256], message,
                                       {"traceback": trace[-65536:]} if trace else None))

        return reply

    async def run(self) -> None:
        server = self.server
        session = self.session
        peer = self.channel.peer
        with self.scope:
            try:
                with anyio.fail_after(server.options.handshake_timeout):
                    try:
                        await self._handshake()
                    except Unauthorized as exc:
                        server.refused(peer, str(exc))
                        self._flush()
                        with anyio.move_on_after(0.5):
                            await self.channel.drain()
                        return
                if server.draining:
                    self.goodbye("draining")
                receive = self.channel.receive
                drain = self.channel.drain
                reads = 0
                deliver = session.receive
                outgoing = session.outgoing
                while True:
                    # backpressure: while the client leaves our answers unread, read no
                    # more of its requests (drain returns at once unless backlogged), so
                    # TCP blocks the sender instead of our memory growing
                    reads += 1
                    if reads & 7 == 0:
                        # every eighth request: the backlog stays within the mark plus
                        # eight answers, at an eighth of the cost of a check per request
                        await drain()
                    deliver(await receive())
                    if outgoing:
                        self._flush()
            except TimeoutError:
                log.info("closing connection from %s: no handshake within %gs", peer,
                         server.options.handshake_timeout)
            except ProtocolError as exc:
                log.warning("closing connection from %s: %s", peer, exc)
                with anyio.move_on_after(0.5):
                    self.goodbye(f"protocol error: {exc}")
                    try:
                        await self.channel.drain()
                    except ConnectError:
                        pass
            except ConnectError:
                pass
            finally:
                # nobody is left to receive their results: stop the work (bounded work
                # per connection, even against a client that reconnects in a loop)
                for call in session.close("connection closed"):
                    call.cancel()

    async def _handshake(self) -> None:
        """Hello [→ AuthChallenge → AuthProof] → the token check → Welcome."""
        session = self.session
        receive = self.channel.receive
        while session.phase is not Phase.AUTHENTICATING:
            try:
                session.receive(await receive())
            finally:
                self._flush()
        hello = session.hello_msg
        assert hello is not None
        self.client_id = hello.client_id
        identity = await self._check_token(session.token)
        try:
            self.send(session.accept(identity))
        finally:
            self._flush()

    async def _check_token(self, token: Any) -> Identity | None:
        """The identity a token gives, None without a token (or an authenticator), or
        `Unauthorized` (with the refusal queued)."""
        server = self.server
        if token is None or server.authenticator is None:
            return None
        session = self.session
        if not isinstance(token, str) or len(token) > 8192:
            raise session.refuse("the token must be a string of at most 8192 characters")
        try:
            result = server.authenticator.authenticate(token, self.channel.peer)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            log.error("authenticator %r failed on a token from %s: %s: %s",
                      server.options.security.authenticator, self.channel.peer,
                      type(exc).__name__, exc)
            raise session.refuse("the token could not be checked") from None
        if not isinstance(result, Identity):
            raise session.refuse("the token was not accepted")
        return result

    # -- what the session hands over (its Handler) ----------------------------------------

    def on_request(self, rid: int, interface: str, key: Key, method: str, args: list[Any],
                   kwargs: dict[str, Any], timeout: float | None,
                   headers: dict[str, Any] | None) -> Call | None:
        server = self.server
        identity = self.session.identity
        session = self.session
        verdict = admit(server.targets, interface, method, identity, server.draining,
                        len(session.serving) + self.one_ways, server.max_in_flight)
        if type(verdict) is Refusal:
            self.send(session.fail(rid, verdict.kind, verdict.type_name, verdict.message))
            return None
        deadline = math.inf if timeout is None else clock() + timeout
        call = Call(method, args, kwargs, deadline, self.reply_for(rid, interface, method),
                    identity, None,
                    headers.get(HEADER_CONTEXT) if headers is not None else None)
        server.catalog.submit(interface, key, call, verdict is True)
        return call

    def on_one_way(self, msg: OneWay) -> None:
        server = self.server
        verdict = admit(server.targets, msg.interface, msg.method, self.session.identity,
                        draining=server.draining,
                        busy=len(self.session.serving) + self.one_ways,
                        max_in_flight=server.max_in_flight)
        if type(verdict) is Refusal:
            if verdict.kind is FailureKind.NOT_FOUND:
                log.warning("one-way call from %s dropped: %s", self.channel.peer,
                            verdict.message)
            elif verdict.type_name == "TooManyCalls":
                self.drop_one_way(msg)
            return
        self.one_ways += 1
        server.catalog.submit(msg.interface, msg.key,
                              Call(msg.method, msg.args, msg.kwargs, math.inf, None,
                                   self.session.identity, self.one_way_done,
                                   msg.headers.get(HEADER_CONTEXT)
                                   if msg.headers is not None else None),
                              verdict is True)

    def on_cancel(self, token: Any) -> None:
        token.cancel()

    def on_pong(self, sent_at: float) -> None:
        pass

    def on_goodbye(self, reason: str) -> None:
        self.scope.cancel()

    def on_stats_request(self) -> dict[str, Any]:
        return self.server.stats()

    def one_way_done(self) -> None:
        self.one_ways -= 1

    def drop_one_way(self, msg: OneWay) -> None:
        """A one-way call beyond max_in_flight has no reply to refuse it with: drop it,
        count it, and say so in the log at most once a minute per connection."""
        server = self.server
        server.one_way_dropped += 1
        self.dropped += 1
        now = clock()
        if now - self.dropped_logged_at >= 60.0:
            log.warning("server %s dropped %d one-way call(s) from %s (%s), the last one "
                        "%s.%s: the connection already has %d calls queued or running "
                        "(max_in_flight); the client sends one-way calls faster than the "
                        "grains run them", server.id, self.dropped, self.channel.peer,
                        self.client_id, msg.interface, msg.method,
                        len(self.session.serving) + self.one_ways)
            self.dropped_logged_at = now
            self.dropped = 0

