"""The connection state machines, sans I/O: two sessions wired back to back with plain
function calls, no sockets, no event loop, no clock (time is an argument)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from forkcore.errors import (
    ConnectError,
    MethodNotFound,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    Unauthorized,
)
from forkcore.grains import InterfaceInfo
from forkcore.protocol import codec
from forkcore.protocol.messages import (
    PROTOCOL_VERSION,
    FailureKind,
    OneWay,
    Welcome,
    from_wire,
)
from forkcore.protocol.session import (
    HANDSHAKE,
    OPEN,
    ClientSession,
    Phase,
    ServerRefused,
    ServerSession,
)
from forkcore.security import Identity, Role

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
WELCOME = Welcome(PROTOCOL_VERSION, "s1", "eu", {}, (InterfaceInfo("t.c", 1, frozenset({"add"})),))


class Waiter:
    def __init__(self) -> None:
        self.results: list[Any] = []
        self.errors: list[BaseException] = []

    def resolve(self, result: Any) -> None:
        self.results.append(result)

    def fail(self, error: Any) -> None:
        self.errors.append(error)


class Recorder:
    """A Handler that records what the session hands over."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, ...]] = []
        self.one_ways: list[OneWay] = []
        self.cancelled: list[Any] = []
        self.pongs: list[float] = []
        self.goodbyes: list[str] = []

    def on_request(self, rid: int, interface: str, key: Any, method: str, args: list[Any],
                   kwargs: dict[str, Any], timeout: float | None,
                   headers: dict[str, Any] | None) -> Any:
        self.requests.append((rid, interface, key, method, args, kwargs, timeout, headers))
        return f"token-{rid}"

    def on_one_way(self, msg: OneWay) -> None:
        self.one_ways.append(msg)

    def on_cancel(self, token: Any) -> None:
        self.cancelled.append(token)

    def on_pong(self, sent_at: float) -> None:
        self.pongs.append(sent_at)

    def on_goodbye(self, reason: str) -> None:
        self.goodbyes.append(reason)

    def on_stats_request(self) -> dict[str, Any]:
        return {"calls": 3}


def deliver(sender: Any, receiver: Any) -> None:
    """Move every frame `sender` queued to `receiver`."""
    while sender.outgoing:
        receiver.receive(sender.outgoing.pop(0))


def handshake(client_psk: bytes | None = None, server_psk: bytes | None = None, *,
              allow_anonymous: bool = True, client_secure: bool = False,
              server_secure: bool = False, identity: Identity | None = None
              ) -> tuple[ClientSession, ServerSession, Recorder]:
    recorder = Recorder()
    client = ClientSession("s1", client_id="c1", psk=client_psk, identity="tools",
                           channel_secure=client_secure)
    server = ServerSession("c1", recorder, welcome=WELCOME, psk=server_psk,
                           psk_role=Role.ADMIN, allow_anonymous=allow_anonymous,
                           channel_secure=server_secure)
    server.receive(client.hello())
    deliver(server, client)
    deliver(client, server)
    assert server.phase is Phase.AUTHENTICATING
    client.receive(server.accept(identity))
    assert client.phase is Phase.OPEN and server.phase is Phase.OPEN
    return client, server, recorder


# -- the handshake and authentication matrix -------------------------------------------


@pytest.mark.parametrize(("client_psk", "server_psk", "allow_anonymous", "outcome"), [
    (None, None, True, "open"),
    (None, None, False, "server refuses: requires authentication"),
    (KEY, KEY, True, "open"),
    (KEY, KEY, False, "open"),
    (None, KEY, True, "server refuses: requires the cluster's pre-shared key"),
    (KEY, None, True, "client refuses: did not ask for the pre-shared key"),
    (KEY, OTHER_KEY, True, "client refuses: does not know this client's pre-shared key"),
])
def test_handshake_and_auth_matrix(client_psk: bytes | None, server_psk: bytes | None,
                                   allow_anonymous: bool, outcome: str) -> None:
    client = ClientSession("s1", client_id="c1", psk=client_psk)
    server = ServerSession("c1", Recorder(), welcome=WELCOME, psk=server_psk,
                           allow_anonymous=allow_anonymous)
    raised: BaseException | None = None
    side = ""
    try:
        side = "server"
        server.receive(client.hello())
        side = "client"
        deliver(server, client)
        side = "server"
        deliver(client, server)
        if server.phase is Phase.AUTHENTICATING:
            side = "server"
            body = server.accept()
            side = "client"
            client.receive(body)
    except (Unauthorized, ConnectError) as exc:
        raised = exc
    if outcome == "open":
        assert raised is None
        assert client.phase is Phase.OPEN and server.phase is Phase.OPEN
        assert client.welcome == WELCOME
        assert (server.identity.method == "psk") == (server_psk is not None)
        return
    who, _, reason = outcome.partition(" refuses: ")
    assert isinstance(raised, Unauthorized), raised
    assert side == who
    assert reason in str(raised)
    # the refusing side told the other why, in a Goodbye it queued
    refusing = server if who == "server" else client
    assert any(from_wire(codec.decode(b)).__class__.__name__ == "Goodbye"
               for b in refusing.outgoing)


def test_psk_session_is_encrypted_unless_the_channel_is_verified() -> None:
    client, server, _ = handshake(KEY, KEY)
    assert client.codec.cipher is not None and server.codec.cipher is not None
    client, server, _ = handshake(KEY, KEY, client_secure=True, server_secure=True)
    assert client.codec.cipher is None and server.codec.cipher is None
    # the server's channel does not encrypt: it encrypts although the client did not ask
    client, server, _ = handshake(KEY, KEY, client_secure=True, server_secure=False)
    assert client.codec.cipher is not None and server.codec.cipher is not None


def test_a_downgrade_to_an_unencrypted_session_is_refused() -> None:
    client = ClientSession("s1", client_id="c1", psk=KEY, channel_secure=False)
    # a server (or a man in the middle) that pretends the client's channel is verified
    server = ServerSession("c1", Recorder(), welcome=WELCOME, psk=KEY, channel_secure=True)
    hello = from_wire(codec.decode(client.hello()))
    assert hello.auth is not None
    forged = dict(hello.auth, encrypt=False)
    server.receive(codec.encode([1, PROTOCOL_VERSION, "c1", [], forged]))
    with pytest.raises(Unauthorized, match="downgrade"):
        deliver(server, client)


def test_an_unencrypted_welcome_after_the_key_exchange_is_refused() -> None:
    client = ClientSession("s1", client_id="c1", psk=KEY)
    server = ServerSession("c1", Recorder(), welcome=WELCOME, psk=KEY)
    server.receive(client.hello())
    deliver(server, client)
    assert client.phase is Phase.PROOF_SENT
    with pytest.raises(Unauthorized, match="unencrypted Welcome"):
        client.receive(codec.encode([2, PROTOCOL_VERSION, "s1", None, {}, [], []]))


def test_the_host_may_refuse_after_the_token_check() -> None:
    client = ClientSession("s1", client_id="c1", token="t")
    server = ServerSession("c1", Recorder(), welcome=WELCOME)
    server.receive(client.hello())
    assert server.token == "t"
    error = server.refuse("the token was not accepted")
    assert isinstance(error, Unauthorized) and server.phase is Phase.CLOSED
    with pytest.raises(Unauthorized, match="refused the connection: unauthorized: the token"):
        deliver(server, client)


def test_the_host_identity_replaces_the_anonymous_one() -> None:
    _, server, _ = handshake(identity=Identity("ann", Role.USER, "token"),
                             allow_anonymous=False)
    assert server.identity.name == "ann"


def test_messages_out_of_order_in_the_handshake_close_the_session() -> None:
    server = ServerSession("c1", Recorder(), welcome=WELCOME)
    with pytest.raises(ProtocolError):
        server.receive(codec.encode([7, 1, 0.0]))  # a Ping before Hello
    client = ClientSession("s1", client_id="c1")
    client.hello()
    with pytest.raises(ProtocolError):
        client.receive(codec.encode([4, 1, "x"]))  # a Response before Welcome
    assert client.phase is Phase.CLOSED


def test_a_goodbye_in_the_handshake_is_a_refusal() -> None:
    client = ClientSession("s1", client_id="c1")
    client.hello()
    with pytest.raises(ConnectError, match="closed the connection: draining"):
        client.receive(codec.encode([9, "draining"]))


def test_the_transition_tables_name_every_handshake_step_and_open_message() -> None:
    assert ("server", Phase.START) in {(s, p) for s, p, _ in HANDSHAKE}
    for side in ("client", "server"):
        assert {t.__name__ for t in OPEN[side]} >= {
            "Request", "Response", "Failure", "OneWay", "Cancel", "Ping", "Pong", "Goodbye",
            "StreamItem", "StreamCredit", "StreamEnd"}


# -- requests, in both directions ------------------------------------------------------


def test_request_and_response_match_by_id() -> None:
    client, server, recorder = handshake()
    first, second = Waiter(), Waiter()
    rid1, body1 = client.request("t.c", "k", "add", [1], {}, 10.0, 0.0, first)
    rid2, body2 = client.request("t.c", "k", "add", [2], {}, 10.0, 0.0, second)
    server.receive(body1)
    server.receive(body2)
    assert [r[0] for r in recorder.requests] == [rid1, rid2]
    assert recorder.requests[0][6] == 10.0  # the remaining time travels
    assert client.receive(server.respond(rid2, "two")) is True
    assert client.receive(server.respond(rid1, "one")) is True
    assert first.results == ["one"] and second.results == ["two"]
    assert not client.pending and not server.serving


def test_headers_cost_nothing_when_empty_and_arrive_when_given() -> None:
    client, server, recorder = handshake()
    _, plain = client.request("t.c", "k", "add", [], {}, 1.0, 0.0, Waiter())
    _, rich = client.request("t.c", "k", "add", [], {}, 1.0, 0.0, Waiter(),
                             {"ctx": {"tenant": "eu"}})
    assert len(codec.decode(plain)) == 8 and len(codec.decode(rich)) == 9
    server.receive(plain)
    server.receive(rich)
    assert recorder.requests[0][7] is None
    assert recorder.requests[1][7] == {"ctx": {"tenant": "eu"}}


def test_failures_become_the_callers_typed_errors() -> None:
    client, server, _ = handshake()
    cases = [(FailureKind.REMOTE, "ValueError", RemoteError),
             (FailureKind.NOT_FOUND, "MethodNotFound", MethodNotFound),
             (FailureKind.TIMEOUT, "RequestTimeout", RequestTimeout),
             (FailureKind.UNAUTHORIZED, "Unauthorized", Unauthorized),
             (FailureKind.UNAVAILABLE, "ServerDraining", ServerRefused),
             (FailureKind.ERROR, "Unauthorized", Unauthorized),
             (FailureKind.ERROR, "NotOurs", RemoteError)]
    for kind, type_name, expected in cases:
        waiter = Waiter()
        rid, body = client.request("t.c", "k", "add", [], {}, 1.0, 0.0, waiter)
        server.receive(body)
        client.receive(server.fail(rid, kind, type_name, "why"))
        assert len(waiter.errors) == 1 and isinstance(waiter.errors[0], expected), kind


def test_deadlines_expire_with_the_time_given_and_cancel_on_the_wire() -> None:
    client, server, recorder = handshake()
    late, early = Waiter(), Waiter()
    client.request("t.c", "k", "add", [], {}, 5.0, 0.0, late)
    rid, body = client.request("t.c", "k", "add", [], {}, 2.0, 0.0, early)
    server.receive(body)
    assert client.expire(1.0) == 2.0  # nothing due yet; the next deadline
    assert client.expire(2.5) == 5.0
    assert isinstance(early.errors[0], RequestTimeout) and not late.errors
    deliver(client, server)  # the Cancel
    assert recorder.cancelled == [f"token-{rid}"]
    assert client.expire(6.0) == math.inf
    # an answer that comes late is ignored, not an error
    assert client.receive(server.respond(rid, "late")) is False


def test_abandon_sends_a_cancel_and_forget_does_not() -> None:
    client, server, recorder = handshake()
    rid, body = client.request("t.c", "k", "add", [], {}, 5.0, 0.0, Waiter())
    server.receive(body)
    client.abandon(rid)
    deliver(client, server)
    assert recorder.cancelled == [f"token-{rid}"]
    rid2, _ = client.request("t.c", "k", "add", [], {}, 5.0, 0.0, Waiter())
    client.forget(rid2)
    assert not client.outgoing and rid2 not in client.pending


def test_an_answer_to_a_request_never_sent_is_a_protocol_error() -> None:
    client, server, _ = handshake()
    with pytest.raises(ProtocolError, match="never sent"):
        client.receive(server.respond(999, "forged"))


def test_a_request_id_in_flight_twice_is_a_protocol_error() -> None:
    client, server, _ = handshake()
    _, body = client.request("t.c", "k", "add", [], {}, 5.0, 0.0, Waiter())
    server.receive(body)
    with pytest.raises(ProtocolError, match="already in flight"):
        server.receive(body)


def test_the_server_may_send_requests_too() -> None:
    client, server, recorder = handshake()
    client.handler = Recorder()
    waiter = Waiter()
    rid, body = server.request("cb.i", "k", "on_line", ["hi"], {}, 5.0, 0.0, waiter)
    client.receive(body)
    assert client.handler.requests[0][3] == "on_line"
    server.receive(client.respond(rid, "ok"))
    assert waiter.results == ["ok"]
    assert not recorder.requests  # the two id spaces never meet


def test_a_side_without_a_handler_answers_requests_with_method_not_found() -> None:
    client, server, _ = handshake()
    waiter = Waiter()
    _, body = server.request("cb.i", "k", "m", [], {}, 5.0, 0.0, waiter)
    client.receive(body)
    deliver(client, server)
    assert isinstance(waiter.errors[0], MethodNotFound)


def test_ping_pong_goodbye_and_stats() -> None:
    client, server, _recorder = handshake()
    client.handler = Recorder()
    server.receive(client.ping(12.5))
    deliver(server, client)
    assert client.handler.pongs == [12.5]
    waiter = Waiter()
    _, body = client.stats_request(waiter)
    server.receive(body)
    deliver(server, client)
    assert waiter.results == [{"calls": 3}]
    client.receive(server.goodbye("draining"))
    assert client.peer_draining and client.handler.goodbyes == ["draining"]


def test_stream_frames_for_no_open_stream_are_protocol_errors() -> None:
    client, _server, _ = handshake()
    with pytest.raises(ProtocolError, match="not open"):
        client.receive(codec.encode([15, 1, "item"]))


def test_close_fails_every_waiter_and_returns_what_was_being_served() -> None:
    client, server, _ = handshake()
    waiter = Waiter()
    _, body = client.request("t.c", "k", "add", [], {}, 5.0, 0.0, waiter)
    server.receive(body)
    client.close("reset")
    assert isinstance(waiter.errors[0], ConnectError) and "reset" in str(waiter.errors[0])
    assert server.close("gone") == ["token-1"]
    with pytest.raises(ConnectError):
        client.request("t.c", "k", "add", [], {}, 5.0, 0.0, Waiter())
