"""The behaviour of one connection, sans I/O: handshake, requests, deadlines, pings.

A `Session` is one side of one connection. It never reads a clock, never touches a
socket and never awaits: the I/O layer (client/connection.py, server/connection.py)
feeds it frame bodies with `receive()`, asks it for frame bodies to send (`hello()`,
`request()`, `respond()`, ...), sends whatever it queued in `outgoing`, and tells it
the time where time matters (`request(..., now)`, `expire(now)`). So everything here
is testable with plain function calls (tests/test_session.py).

The protocol is symmetric once open: either side may send Requests (the server's are
callbacks), answered by Response or Failure, and a Request may open a stream (docs/
protocol.md, section 6.5). A side matches Responses against the ids *it* issued and
Cancels against the ids *it* is serving, so the two id spaces never meet.

Who handles what arrives is a `Handler` (the I/O layer); the session calls it for the
messages it cannot answer itself. A caller waiting for an answer is a `Waiter`, an
opaque object the session resolves or fails.

The handshake's transitions are the table `HANDSHAKE`; what an open session accepts
from its peer is the table `OPEN`. The rules they implement are in docs/protocol.md,
section 5 (and docs/security.md, section 4, for the pre-shared key).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from enum import Enum
from typing import Any, Literal, Protocol

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
from ..security import (
    ANONYMOUS,
    NONCE_SIZE,
    Identity,
    Role,
    SessionCipher,
    new_nonce,
    proof,
    proofs_match,
)
from . import codec
from .connection import ProtocolConnection
from .messages import (
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    AuthChallenge,
    AuthProof,
    Cancel,
    Failure,
    FailureKind,
    Goodbye,
    Hello,
    Message,
    OneWay,
    Ping,
    Pong,
    Request,
    Response,
    Stats,
    StatsRequest,
    StreamCredit,
    StreamEnd,
    StreamItem,
    Welcome,
    from_wire,
    request_fields,
)

Side = Literal["client", "server"]


class Phase(Enum):
    START = "start"  # nothing exchanged yet
    HELLO_SENT = "hello sent"  # client: waiting for AuthChallenge or Welcome
    PROOF_SENT = "proof sent"  # client: waiting for the (sealed) Welcome
    CHALLENGED = "challenged"  # server: waiting for AuthProof
    AUTHENTICATING = "authenticating"  # server: the host checks the token, then accept()
    OPEN = "open"
    CLOSED = "closed"


class Waiter(Protocol):
    """A caller waiting for the answer to one Request (or for Stats)."""

    def resolve(self, result: Any) -> None: ...
    def fail(self, error: ForkcoreError) -> None: ...


class Handler(Protocol):
    """What the I/O layer does with the messages the session does not answer itself."""

    def on_request(self, rid: int, interface: str, key: Key, method: str, args: list[Any],
                   kwargs: dict[str, Any], timeout: float | None,
                   headers: dict[str, Any] | None) -> Any:
        """A Request from the peer: start it and return a token (handed back to
        `on_cancel`), or answer it at once with `Session.fail` and return None."""

    def on_one_way(self, msg: OneWay) -> None: ...
    def on_cancel(self, token: Any) -> None: ...
    def on_pong(self, sent_at: float) -> None: ...
    def on_goodbye(self, reason: str) -> None: ...
    def on_stats_request(self) -> dict[str, Any]: ...


class ServerRefused(NoServerAvailable):
    """The server refused the call without running it (draining, overloaded): it may go
    to another server without risk."""


def failure_error(f: Failure) -> ForkcoreError:
    """The exception a caller sees for a Failure message."""
    kind = f.kind
    if kind is FailureKind.REMOTE:
        trace = (f.details or {}).get("traceback")
        return RemoteError(f.type_name, f.message,
                           trace[:65536] if isinstance(trace, str) else None)
    if kind is FailureKind.NOT_FOUND:
        return MethodNotFound(f.message)
    if kind is FailureKind.TIMEOUT:
        return RequestTimeout(f.message)
    if kind is FailureKind.UNAUTHORIZED:
        return Unauthorized(f.message)
    if kind is FailureKind.UNAVAILABLE:
        return ServerRefused(f.message)
    if kind is FailureKind.ERROR:
        return remote_error(f.type_name, f.message)
    return ProtocolError(f"{f.type_name}: {f.message}")


def remote_error(type_name: str, message: str) -> ForkcoreError:
    """The `forkcore.errors` exception `type_name` raised on the other side (by an
    interceptor), marked `remote` so the client never takes it for its own connection
    failing; RemoteError when the name is not one of ours."""
    from .. import errors

    cls = getattr(errors, type_name, None)
    if not isinstance(cls, type) or not issubclass(cls, ForkcoreError) \
            or issubclass(cls, RemoteError):
        return RemoteError(type_name, message)
    try:
        error = cls(message)
    except TypeError:
        return RemoteError(type_name, message)
    error.remote = True  # type: ignore[attr-defined]
    return error


class Session:
    """One side of one connection (see the module docstring)."""

    side: Side

    def __init__(self, peer: str, handler: Handler | None = None, *,
                 max_depth: int = codec.DEFAULT_MAX_DEPTH) -> None:
        self.peer = peer  # for messages: "server s1 (127.0.0.1:11111)", an address, ...
        self.handler = handler
        self.codec = ProtocolConnection(self.side, max_depth=max_depth)
        self._encode_request = self.codec.encode_request  # bound once: the hot paths
        self._encode_response = self.codec.encode_response
        self.phase = Phase.START
        self.outgoing: list[bytes] = []  # frame bodies queued by the session itself
        self.peer_draining = False  # the peer said Goodbye
        # requests this side sent: id → waiter; and their deadlines, a heap
        self.pending: dict[int, Waiter] = {}
        self.deadlines: list[tuple[float, int, str, str]] = []
        # requests the peer sent that this side is serving: id → the handler's token
        self.serving: dict[int, Any] = {}
        self._stats: dict[int, Waiter] = {}
        self._next_id = 1

    # -- the transition tables -----------------------------------------------------------

    def receive(self, body: bytes) -> bool:
        """Take one frame body from the peer; True if it answered one of our requests
        (the I/O layer lets the answered callers run every so often). `ProtocolError`
        closes the session; during the handshake, a refusal raises `Unauthorized` or
        `ConnectError` after queueing what the peer should be told."""
        if self.phase is not Phase.OPEN:
            self._handshake(body)
            return False
        item = self.codec.decode_item(body)
        code = item[0]
        if code == RESPONSE and type(code) is int and len(item) == 3 \
                and type(item[1]) is int:
            # the hot path: a result, without building a Response
            pending = self.pending
            waiter = pending.pop(item[1], None)
            if waiter is None:
                return self._unmatched(item[1])
            waiter.resolve(item[2])
            deadlines = self.deadlines  # (_trim_deadlines, inline: once per answer)
            while deadlines and deadlines[0][1] not in pending:
                heapq.heappop(deadlines)
            return True
        if code == REQUEST and type(code) is int:
            # the hot path, without a Request (and `_on_request`, inline)
            fields = request_fields(item)
            rid = fields[0]
            serving = self.serving
            if rid in serving:
                raise ProtocolError(f"request id {rid} is already in flight")
            handler = self.handler
            if handler is None:
                self._on_request(*fields)
                return False
            token = handler.on_request(*fields)
            if token is not None:
                serving[rid] = token
            return False
        msg = from_wire(item)
        action = OPEN[self.side].get(type(msg))
        if action is None:
            self.codec.close()
            self.phase = Phase.CLOSED
            raise ProtocolError(f"unexpected {type(msg).__name__} from a {self.other}")
        return action(self, msg)

    def _handshake(self, body: bytes) -> None:
        if self.phase is Phase.CLOSED:
            raise ProtocolError("connection is closed")
        try:
            msg = self._decode_handshake(body)
        except BaseException:
            self.phase = Phase.CLOSED
            self.codec.close()
            raise
        step = HANDSHAKE.get((self.side, self.phase, type(msg)))
        if step is None:
            self.phase = Phase.CLOSED
            self.codec.close()
            if type(msg) is Goodbye:
                self._refused(msg)
            raise ProtocolError(f"{type(msg).__name__} arrived in phase {self.phase.value}")
        action, allowed = step
        try:
            action(self, msg)
        except BaseException:
            self.phase = Phase.CLOSED
            self.codec.close()
            raise
        assert self.phase in allowed, (self.phase, allowed)

    @property
    def other(self) -> str:
        return "server" if self.side == "client" else "client"

    def _decode_handshake(self, body: bytes) -> Message:
        return self.codec.decode(body)

    def _refused(self, msg: Goodbye) -> None:
        raise ConnectError(f"{self.peer} closed the connection: {msg.reason}")

    # -- open: requests this side sends -------------------------------------------------

    def request(self, interface: str, key: Key, method: str, args: list[Any],
                kwargs: dict[str, Any], deadline: float, now: float, waiter: Waiter,
                headers: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """Register a call and return its id and frame body; the I/O layer sends it (and
        calls `forget(rid)` if it could not)."""
        if self.phase is not Phase.OPEN:
            raise ConnectError(f"connection to {self.peer} is not open")
        rid = self._next_id
        self._next_id = rid + 1
        remaining = deadline - now
        body = self._encode_request(rid, interface, key, method, args, kwargs,
                                    remaining if remaining > 0.0 else 0.0, headers)
        self.pending[rid] = waiter
        heapq.heappush(self.deadlines, (deadline, rid, interface, method))
        return rid, body

    def one_way(self, interface: str, key: Key, method: str, args: list[Any],
                kwargs: dict[str, Any], headers: dict[str, Any] | None = None) -> bytes:
        return self.codec.encode(OneWay(interface, key, method, args, kwargs, headers))

    def forget(self, rid: int) -> None:
        """The request never left: nothing to cancel."""
        self.pending.pop(rid, None)

    def abandon(self, rid: int) -> None:
        """The caller stopped waiting for `rid`: tell the peer, which may stop the work."""
        if self.pending.pop(rid, None) is not None and self.phase is Phase.OPEN:
            self.outgoing.append(self.codec.encode(Cancel(rid)))

    def expire(self, now: float) -> float:
        """Fail the calls whose deadline is past (queueing a Cancel for each); return the
        next deadline (`math.inf` if none)."""
        deadlines = self.deadlines
        pending = self.pending
        self._trim_deadlines()
        while deadlines and deadlines[0][0] <= now:
            _, rid, interface, method = heapq.heappop(deadlines)
            waiter = pending.pop(rid, None)
            if waiter is not None:
                waiter.fail(RequestTimeout(
                    f"{interface}.{method} on {self.peer} did not answer within its "
                    "deadline; raise request_timeout or rpc(timeout=...) if it needs "
                    "longer"))
                if self.phase is Phase.OPEN:
                    self.outgoing.append(self.codec.encode(Cancel(rid)))
            self._trim_deadlines()
        return deadlines[0][0] if deadlines else math.inf

    def _trim_deadlines(self) -> None:
        """Answered calls leave the deadline heap as they reach its top, so it holds
        about as many entries as there are calls in flight."""
        deadlines = self.deadlines
        pending = self.pending
        while deadlines and deadlines[0][1] not in pending:
            heapq.heappop(deadlines)

    def ping(self, now: float) -> bytes:
        """A Ping carrying `now`; the Pong echoes it back, giving one RTT sample."""
        nonce = self._next_id
        self._next_id += 1
        return self.codec.encode(Ping(nonce, now))

    def stats_request(self, waiter: Waiter) -> tuple[int, bytes]:
        nonce = self._next_id
        self._next_id += 1
        self._stats[nonce] = waiter
        return nonce, self.codec.encode(StatsRequest(nonce))

    def forget_stats(self, nonce: int) -> None:
        self._stats.pop(nonce, None)

    # -- open: requests the peer sends --------------------------------------------------

    def _on_request(self, rid: int, interface: str, key: Key, method: str, args: list[Any],
                    kwargs: dict[str, Any], timeout: float | None,
                    headers: dict[str, Any] | None) -> None:
        serving = self.serving
        if rid in serving:
            raise ProtocolError(f"request id {rid} is already in flight")
        handler = self.handler
        if handler is None:
            self.outgoing.append(self.codec.encode(Failure(
                rid, FailureKind.NOT_FOUND, "MethodNotFound",
                f"this {self.side} serves no requests")))
            return
        token = handler.on_request(rid, interface, key, method, args, kwargs, timeout,
                                   headers)
        if token is not None:
            serving[rid] = token

    def respond(self, rid: int, result: Any) -> bytes:
        """The Response to request `rid` of the peer (`WireTypeError` if `result`
        cannot cross: answer with `fail` then)."""
        body = self._encode_response(rid, result)
        self.serving.pop(rid, None)
        return body

    def fail(self, rid: int, kind: FailureKind, type_name: str, message: str,
             details: dict[str, Any] | None = None) -> bytes:
        """The Failure answering request `rid` of the peer."""
        self.serving.pop(rid, None)
        try:
            return self.codec.encode(Failure(rid, kind, type_name, message, details))
        except codec.WireTypeError:
            # an error message that cannot be encoded (lone surrogates): the caller
            # still gets its failure
            return self.codec.encode(Failure(rid, kind, type_name,
                                             "(the error message could not be encoded)"))

    # -- open: the rest ------------------------------------------------------------------

    def _unmatched(self, rid: int) -> bool:
        """An answer to no call in flight: late (the call timed out or was cancelled, so
        ignore it), or to a request this side never sent (the peer is broken)."""
        if rid >= self._next_id:
            self.phase = Phase.CLOSED
            self.codec.close()
            raise ProtocolError(f"an answer to request {rid}, which this {self.side} never "
                                "sent")
        return False

    def _open_response(self, msg: Response) -> bool:
        waiter = self.pending.pop(msg.id, None)
        if waiter is None:
            return self._unmatched(msg.id)
        waiter.resolve(msg.result)
        return True

    def _open_failure(self, msg: Failure) -> bool:
        waiter = self.pending.pop(msg.id, None)
        if waiter is None:
            return self._unmatched(msg.id)
        waiter.fail(failure_error(msg))
        return True

    def _open_request(self, msg: Request) -> bool:
        self._on_request(msg.id, msg.interface, msg.key, msg.method, msg.args, msg.kwargs,
                         msg.timeout, msg.headers)
        return False

    def _open_one_way(self, msg: OneWay) -> bool:
        if self.handler is not None:
            self.handler.on_one_way(msg)
        return False

    def _open_cancel(self, msg: Cancel) -> bool:
        token = self.serving.pop(msg.id, None)
        if token is not None and self.handler is not None:
            self.handler.on_cancel(token)
        return False

    def _open_ping(self, msg: Ping) -> bool:
        self.outgoing.append(self.codec.encode(Pong(msg.nonce, msg.sent_at)))
        return False

    def _open_pong(self, msg: Pong) -> bool:
        if self.handler is not None:
            self.handler.on_pong(msg.sent_at)
        return False

    def _open_goodbye(self, msg: Goodbye) -> bool:
        self.peer_draining = True
        if self.handler is not None:
            self.handler.on_goodbye(msg.reason)
        return False

    def _open_stats_request(self, msg: StatsRequest) -> bool:
        values = self.handler.on_stats_request() if self.handler is not None else {}
        self.outgoing.append(self.codec.encode(Stats(msg.nonce, values)))
        return False

    def _open_stats(self, msg: Stats) -> bool:
        waiter = self._stats.pop(msg.nonce, None)
        if waiter is not None:
            waiter.resolve(msg.values)
        return False

    def _open_stream_frame(self, msg: StreamItem | StreamCredit | StreamEnd) -> bool:
        # streams are declared (docs/protocol.md 6.5) but no request opens one yet: a
        # frame for a stream that is not open is the peer's mistake
        raise ProtocolError(f"{type(msg).__name__} for stream {msg.id}, which is not open")

    # -- both ------------------------------------------------------------------------------

    def goodbye(self, reason: str) -> bytes:
        """A Goodbye; allowed in any phase, so the peer learns why it is dropped."""
        return self.codec.encode(Goodbye(reason))

    def close(self, reason: str) -> list[Any]:
        """The connection is gone: fail every call waiting on it with `ConnectError` and
        return the tokens of the requests being served (the caller stops them)."""
        self.phase = Phase.CLOSED
        self.codec.close()
        waiting = list(self.pending.values())
        self.pending.clear()  # in place: the I/O layer's pool reads this very table
        self.deadlines.clear()
        for waiter in waiting:
            waiter.fail(ConnectError(
                f"connection to {self.peer} was lost while the call was in flight "
                f"({reason}); it may or may not have run"))
        stats, self._stats = self._stats, {}
        for waiter in stats.values():
            waiter.fail(ConnectError(f"connection to {self.peer} closed ({reason})"))
        serving, self.serving = self.serving, {}
        return list(serving.values())


class ClientSession(Session):
    """The client's side: sends Hello, proves the pre-shared key, takes Welcome."""

    side: Side = "client"

    def __init__(self, peer: str, handler: Handler | None = None, *, client_id: str,
                 psk: bytes | None = None, identity: str = "client",
                 token: str | None = None, channel_secure: bool = False,
                 max_depth: int = codec.DEFAULT_MAX_DEPTH,
                 features: tuple[str, ...] = ()) -> None:
        super().__init__(peer, handler, max_depth=max_depth)
        self.client_id = client_id
        self.psk = psk
        self.identity = identity
        self.token = token
        # encrypt the session with the key unless the transport encrypts and has verified
        # the server (TLS with unverified certificates may be a man in the middle)
        self.wants_encryption = not channel_secure
        self.features = features
        self.nonce = new_nonce()
        self.challenge: AuthChallenge | None = None
        self.welcome: Welcome | None = None
        self._cipher: SessionCipher | None = None

    def hello(self) -> bytes:
        """The first frame of the connection."""
        if self.phase is not Phase.START:
            raise ProtocolError("Hello was sent already")
        auth: dict[str, Any] = {}
        if self.psk is not None:
            auth.update(method="psk", nonce=self.nonce, identity=self.identity,
                        encrypt=self.wants_encryption)
        if self.token is not None:
            auth["token"] = self.token
        body = self.codec.encode(Hello(PROTOCOL_VERSION, self.client_id, self.features,
                                       auth or None))
        self.phase = Phase.HELLO_SENT
        return body

    def _decode_handshake(self, body: bytes) -> Message:
        cipher = self._cipher
        if cipher is None:
            return self.codec.decode(body)
        # after our proof the Welcome is sealed: only a refusal may come unsealed (the
        # server sends it before keying the session); anything else unsealed is someone
        # trying to strip the encryption
        try:
            opened = cipher.open(body)
        except ProtocolError:
            refusal = self.codec.decode(body)
            if isinstance(refusal, Goodbye):
                return refusal
            raise Unauthorized(f"{self.peer} answered the key exchange with an unencrypted "
                               f"{type(refusal).__name__}: refusing a downgraded session "
                               "(is something between the client and the server?)") from None
        msg = self.codec.decode(opened)
        self.codec.cipher = cipher
        return msg

    def _refused(self, msg: Goodbye) -> None:
        if msg.reason.startswith("unauthorized"):
            raise Unauthorized(f"{self.peer} refused the connection: {msg.reason}")
        super()._refused(msg)

    def _on_challenge(self, challenge: AuthChallenge) -> None:
        """Check the server's proof (which covers whether we asked for encryption and
        whether it encrypts) and queue ours."""
        psk = self.psk
        if psk is None:
            raise ConnectError(f"{self.peer} asked for a pre-shared key this client was not "
                               "given")
        if len(challenge.nonce) != NONCE_SIZE:
            raise ConnectError(f"{self.peer} sent a {len(challenge.nonce)}-byte nonce; "
                               f"expected {NONCE_SIZE}")
        wanted = self.wants_encryption
        if wanted and not challenge.encrypt:
            self.outgoing.append(self.goodbye("unauthorized: the session must be encrypted"))
            raise Unauthorized(f"{self.peer} would not encrypt the session although this "
                               "client asked it to (its channel is not verified): a downgrade "
                               "was attempted, by the server or by something between us; "
                               "refusing. Verify the server's certificate (ca_file or "
                               "fingerprint) if the network is trusted")
        expected = proof(psk, "server", self.nonce, challenge.nonce, self.identity,
                         wanted=wanted, encrypted=challenge.encrypt)
        if not proofs_match(expected, challenge.proof):
            self.outgoing.append(self.goodbye("unauthorized: wrong pre-shared key"))
            raise Unauthorized(f"{self.peer} does not know this client's pre-shared key, or "
                               "something between us altered the key exchange (the server's "
                               "proof is wrong): check psk on both sides")
        self.outgoing.append(self.codec.encode(AuthProof(proof(
            psk, "client", self.nonce, challenge.nonce, self.identity, wanted=wanted,
            encrypted=challenge.encrypt))))
        self.challenge = challenge
        if challenge.encrypt:
            self._cipher = SessionCipher(psk, self.nonce, challenge.nonce, "client")
        self.phase = Phase.PROOF_SENT

    def _on_welcome(self, welcome: Welcome) -> None:
        if self.psk is not None and self.challenge is None:
            self.outgoing.append(self.goodbye("unauthorized: this client requires the "
                                              "cluster's pre-shared key"))
            raise Unauthorized(f"{self.peer} did not ask for the pre-shared key, so it "
                               "cannot prove it is one of ours: configure the same psk on "
                               "the server")
        self.welcome = welcome
        self.phase = Phase.OPEN


class ServerSession(Session):
    """The server's side: takes Hello, challenges for the pre-shared key, sends Welcome
    once the host has checked the rest (`accept`)."""

    side: Side = "server"

    def __init__(self, peer: str, handler: Handler | None = None, *, welcome: Welcome,
                 psk: bytes | None = None, psk_role: Role = Role.USER,
                 allow_anonymous: bool = True, channel_secure: bool = False,
                 max_depth: int = codec.DEFAULT_MAX_DEPTH) -> None:
        super().__init__(peer, handler, max_depth=max_depth)
        self.welcome = welcome
        self.psk = psk
        self.psk_role = psk_role
        self.allow_anonymous = allow_anonymous
        self.channel_secure = channel_secure
        self.hello_msg: Hello | None = None
        self.identity = ANONYMOUS  # established by the key; the host may replace it
        self._client_nonce = b""
        self._psk_name = ""
        self._encrypt = False
        self._wanted = False
        self._server_nonce = b""

    @property
    def token(self) -> Any:
        """The token the client offered (the host checks it), or None."""
        auth = (self.hello_msg.auth if self.hello_msg is not None else None) or {}
        return auth.get("token")

    def _on_hello(self, hello: Hello) -> None:
        # (the codec refused a Hello of another protocol version already)
        self.hello_msg = hello
        key = self.psk
        if key is None:
            self.phase = Phase.AUTHENTICATING
            return
        auth = hello.auth or {}
        client_nonce = auth.get("nonce")
        name = auth.get("identity", "client")
        if auth.get("method") != "psk" or not isinstance(client_nonce, bytes) \
                or len(client_nonce) != NONCE_SIZE or not isinstance(name, str):
            raise self._refuse("this server requires the cluster's pre-shared key: set psk "
                               "or psk_file in [client.security]")
        wanted = auth.get("encrypt")
        if not isinstance(wanted, bool):
            raise self._refuse("the client did not say whether it wants the session "
                               "encrypted (Hello auth 'encrypt'): upgrade the client")
        # the client wants encryption unless its channel is encrypted and the server
        # verified; encrypt also when this side's channel does not encrypt at all
        encrypt = wanted or not self.channel_secure
        self._client_nonce, self._psk_name = client_nonce, name
        self._wanted, self._encrypt = wanted, encrypt
        self._server_nonce = new_nonce()
        self.outgoing.append(self.codec.encode(AuthChallenge(
            self._server_nonce, proof(key, "server", client_nonce, self._server_nonce, name,
                                      wanted=wanted, encrypted=encrypt), encrypt)))
        self.phase = Phase.CHALLENGED

    def _on_proof(self, answer: AuthProof) -> None:
        key = self.psk
        assert key is not None
        if not proofs_match(proof(key, "client", self._client_nonce, self._server_nonce,
                                  self._psk_name, wanted=self._wanted,
                                  encrypted=self._encrypt), answer.proof):
            raise self._refuse("wrong pre-shared key")
        if self._encrypt:
            self.codec.cipher = SessionCipher(key, self._client_nonce, self._server_nonce,
                                              "server")
        self.identity = Identity(self._psk_name[:128], self.psk_role, "psk")
        self.phase = Phase.AUTHENTICATING

    def accept(self, identity: Identity | None = None) -> bytes:
        """The host checked the token (`identity`, or None to keep the key's identity):
        the Welcome to send, or `Unauthorized` (with a Goodbye queued) if the connection
        may not open."""
        if self.phase is not Phase.AUTHENTICATING:
            raise ProtocolError(f"accept() in phase {self.phase.value}")
        if identity is not None:
            self.identity = identity
        if not self.identity.authenticated and not self.allow_anonymous:
            self.phase = Phase.CLOSED
            raise self._refuse("this server requires authentication (a pre-shared key or a "
                               "token in [client.security])")
        body = self.codec.encode(self.welcome)
        self.phase = Phase.OPEN
        return body

    def refuse(self, reason: str) -> Unauthorized:
        """The host refuses the connection: queue the Goodbye saying why, close the
        session, and return the error to raise."""
        self.phase = Phase.CLOSED
        return self._refuse(reason)

    def _refuse(self, reason: str) -> Unauthorized:
        """Queue the refusal the client reads (unsealed: the session is not keyed)."""
        self.outgoing.append(self.codec.encode(Goodbye(f"unauthorized: {reason}")))
        return Unauthorized(reason)

    def _refused(self, msg: Goodbye) -> None:
        if self.phase is Phase.CHALLENGED:
            # anything but a proof that verifies is a wrong key (the client checked ours
            # first, found it wrong, and left)
            raise Unauthorized(f"wrong pre-shared key (the client left: {msg.reason})")
        raise ConnectError(f"{self.peer} left during the handshake: {msg.reason}")


def _goodbye_in_handshake(session: Session, msg: Goodbye) -> None:
    try:
        session._refused(msg)
    finally:
        session.phase = Phase.CLOSED


_HANDSHAKE_PHASES: tuple[tuple[Side, Phase], ...] = (
    ("server", Phase.START), ("server", Phase.CHALLENGED), ("client", Phase.HELLO_SENT),
    ("client", Phase.PROOF_SENT))
_Step = tuple[Callable[[Any, Any], None], frozenset[Phase]]

# (side, phase, message received) → (what it does, the phases it may lead to)
HANDSHAKE: dict[tuple[Side, Phase, type], _Step] = {
    ("server", Phase.START, Hello):
        (ServerSession._on_hello, frozenset({Phase.CHALLENGED, Phase.AUTHENTICATING})),
    ("server", Phase.CHALLENGED, AuthProof):
        (ServerSession._on_proof, frozenset({Phase.AUTHENTICATING})),
    ("client", Phase.HELLO_SENT, AuthChallenge):
        (ClientSession._on_challenge, frozenset({Phase.PROOF_SENT})),
    ("client", Phase.HELLO_SENT, Welcome):
        (ClientSession._on_welcome, frozenset({Phase.OPEN})),
    ("client", Phase.PROOF_SENT, Welcome):
        (ClientSession._on_welcome, frozenset({Phase.OPEN})),
    **{(side, phase, Goodbye): (_goodbye_in_handshake, frozenset({Phase.CLOSED}))
       for side, phase in _HANDSHAKE_PHASES},
}

_Action = Callable[[Session, Any], bool]
_BOTH: dict[type, _Action] = {
    Request: Session._open_request, Response: Session._open_response,
    Failure: Session._open_failure, OneWay: Session._open_one_way,
    Cancel: Session._open_cancel, Ping: Session._open_ping, Pong: Session._open_pong,
    Goodbye: Session._open_goodbye, StreamItem: Session._open_stream_frame,
    StreamCredit: Session._open_stream_frame, StreamEnd: Session._open_stream_frame,
}
# side → message received on an open connection → what it does (anything else closes
# the connection with a ProtocolError)
OPEN: dict[Side, dict[type, _Action]] = {
    "client": {**_BOTH, Stats: Session._open_stats},
    "server": {**_BOTH, StatsRequest: Session._open_stats_request},
}
