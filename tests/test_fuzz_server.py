"""Property tests of the server's connection handler, against real servers.

A `forkcore.Server` (transport `memory` or `tcp`, open to anonymous callers with a token
authenticator, or requiring the cluster's pre-shared key) runs in a background event
loop for a whole test, with a well-behaved `forkcore.Client` connected to it throughout.
For every hypothesis example a raw connection sends a generated sequence: valid
messages with random fields, CBOR shaped like messages, random bytes, truncated bodies,
oversized length prefixes and, on tcp, bytes that break the framing, optionally after a
correct handshake (sealed with the session cipher when the key is in use). It ends with a
Goodbye (and, on tcp, an end of stream). Then:

- the server has closed the raw connection (promptly: nothing it was sent can keep a
  connection that said Goodbye open) and every frame it sent on it decodes on the client
  side (a `Response` to `echo` carrying exactly the value sent);
- no record of level ERROR, and no traceback, was logged by forkcore;
- the well-behaved client still gets correct answers.

Two regressions found this way have tests of their own: tokens that are not strings, and
a man in the middle replacing the sealed Welcome of a PSK session with a plaintext one.
The sans-IO layer's own properties are in test_hostile_input.py; the atheris target
(fuzz/fuzz_protocol.py) is run on its seeds and a few hundred random inputs at the end,
so it stays in working order.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import logging
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import attrs
import cbor2
import pytest
from grains_sample import Counter, ICounter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forkcore
from forkcore.errors import ConnectError, ProtocolError
from forkcore.plugins import create, get_plugin_manager
from forkcore.protocol import codec
from forkcore.protocol.connection import ProtocolConnection
from forkcore.protocol.framing import PREAMBLE, FrameDecoder, frame
from forkcore.protocol.messages import (
    PROTOCOL_VERSION,
    AuthChallenge,
    AuthProof,
    Cancel,
    Failure,
    Goodbye,
    Hello,
    OneWay,
    Ping,
    Pong,
    Request,
    Response,
    Welcome,
    to_wire,
)
from forkcore.security import SessionCipher, new_nonce, proof

KEY = "a cluster key for fuzzing the server"
MAX_FRAME = 4096  # the servers' max_frame_size: oversized frames stay cheap to send
WAIT = 5.0  # bound for anything that should happen at once
CLOSE_WAIT = 2.0  # the server must close a connection that said Goodbye within this
EXAMPLES = 50
TOKENS = {"t-admin": "admin", "t-user": "user"}
CLIENT_ONLY = (Hello, Request, OneWay, Cancel, AuthProof)  # never sent by a server


# -- the server's grains and authenticator ---------------------------------------------------


class IFuzzTarget(forkcore.GrainInterface, name="fuzz.target"):
    async def echo(self, value: Any) -> Any: ...
    async def add(self, a: Any, b: Any) -> Any: ...
    async def fail(self, message: Any) -> None: ...
    async def whoami(self) -> list[Any]: ...
    @forkcore.requires_role("admin")
    async def admin(self) -> str: ...
    @forkcore.rpc(one_way=True)
    async def poke(self, value: Any) -> None: ...


class FuzzTarget(forkcore.Grain, IFuzzTarget):
    async def echo(self, value: Any) -> Any:
        return value

    async def add(self, a: Any, b: Any) -> Any:
        return a + b

    async def fail(self, message: Any) -> None:
        raise ValueError(message)

    async def whoami(self) -> list[Any]:
        caller = forkcore.current_caller()
        return [caller.name, caller.role.name.lower(), caller.method]

    async def admin(self) -> str:
        return "admin"

    async def poke(self, value: Any) -> None:
        pass


class NaiveTokenAuthenticator:
    """Tokens from a table, trusting that a token is a string (as the hook says)."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens

    async def authenticate(self, token: str, peer: str) -> forkcore.Identity | None:
        role = self.tokens.get(token)
        if role is None:
            return None
        return forkcore.Identity(f"token-{role}", forkcore.Role.parse(role), "token")


class TokenAuthenticator:
    """Tokens from a table, checking the token's type first (as docs/security.md's
    example does): the authenticator the property tests use, so that a failure there is
    the server's. What the server does with a token that is not a string is
    test_a_token_that_is_not_a_string_is_refused's."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens

    async def authenticate(self, token: object, peer: str) -> forkcore.Identity | None:
        role = self.tokens.get(token) if isinstance(token, str) else None
        if role is None:
            return None
        return forkcore.Identity(f"token-{role}", forkcore.Role.parse(role), "token")


@pytest.fixture
def tokens_plugin() -> Iterator[None]:
    class Plugin:
        @forkcore.hookimpl
        def forkcore_register_authenticators(self, register: Any) -> None:
            register("fuzz-tokens", TokenAuthenticator)
            register("fuzz-naive-tokens", NaiveTokenAuthenticator)

    plugin = Plugin()
    get_plugin_manager().register(plugin, name="test-fuzz-tokens")
    yield
    get_plugin_manager().unregister(plugin)


SECURITY: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (server security, the well-behaved client's security)
    "open": ({"authenticator": "fuzz-tokens", "authenticator_options": {"tokens": TOKENS}},
             {"token": "t-user"}),
    "psk": ({"psk": KEY, "psk_role": "user"}, {"psk": KEY}),
}


# -- what a hostile peer sends ---------------------------------------------------------------

_leaves = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=12) | st.binary(max_size=12) | st.uuids()
           | st.datetimes() | st.datetimes(timezones=st.just(datetime.UTC)))
values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
texts = st.text(max_size=12)
ids = st.integers(0, 3) | st.integers(0, 2**63 - 1) | st.integers()
interfaces = st.sampled_from(["fuzz.target", "nothing.here"]) | texts
ANY_REPLY = b"<any reply>"  # marks a request id also used by a call that is not an echo

methods = st.sampled_from(["echo", "add", "fail", "whoami", "admin", "poke", "nope"]) | texts
keys = texts | st.integers() | st.binary(max_size=8) | st.uuids()
args = st.lists(values, max_size=3)
kwargs = st.dictionaries(texts, values, max_size=2)
timeouts = st.none() | st.floats(0, WAIT)
auths = (st.none()
         | st.fixed_dictionaries({"token": st.sampled_from([*TOKENS, "forged"]) | values})
         | st.fixed_dictionaries({"method": st.just("psk") | values,
                                  "nonce": st.binary(min_size=32, max_size=32) | values,
                                  "identity": texts | values})
         | st.dictionaries(texts, values, max_size=3))

# what a client may send once the connection is open, with fields that are sometimes
# valid and sometimes not
calls = st.one_of(
    st.builds(Request, ids, interfaces, keys, methods, args, kwargs, timeouts),
    st.builds(Request, ids, st.just("fuzz.target"), keys, st.just("echo"),
              st.tuples(values).map(list), st.just({}), timeouts),
    st.builds(Request, ids, st.just("fuzz.target"), keys,
              st.sampled_from(["add", "fail", "whoami", "admin"]), args, st.just({}),
              timeouts),
    st.builds(OneWay, interfaces, keys, methods, args, kwargs),
    st.builds(Ping, st.integers(), st.floats(allow_nan=False, allow_infinity=False)),
    st.builds(Pong, st.integers(), st.floats(allow_nan=False, allow_infinity=False)),
    st.builds(Cancel, ids),
)
# anything else, which a server must never accept from a client (or only first)
others = st.one_of(
    st.builds(Hello, st.just(PROTOCOL_VERSION) | st.integers(), texts,
              st.lists(texts, max_size=2).map(tuple), auths),
    st.builds(Welcome, st.integers(), texts, st.none() | texts,
              st.dictionaries(texts, values, max_size=2), st.just(())),
    st.builds(Response, ids, values),
    st.builds(Failure, ids, texts, texts, texts),
    st.builds(Goodbye, texts),
    st.builds(AuthChallenge, st.binary(max_size=70), st.binary(max_size=70), st.booleans()),
    st.builds(AuthProof, st.binary(max_size=70)),
)
messages = calls | others


def body_of(msg: Any) -> bytes:
    """The frame body for `msg`, bypassing the state machine."""
    return codec.encode(to_wire(msg))


@attrs.frozen
class Item:
    """One thing the hostile peer sends: `kind` is "body" (a frame body, sealed when a
    session cipher is in use), "plain" (a body never sealed), "oversized" (a length
    prefix above the limit), "raw" (bytes straight onto the stream: tcp only; on memory
    they are one frame body) or "cut" (a length prefix and fewer bytes: tcp only)."""

    kind: str
    data: bytes = b""
    size: int = 0


def deep_request(depth: int) -> bytes:
    """An echo request whose argument is nested `depth` arrays deep (the servers'
    max_depth is the default, 64)."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return cbor2.dumps([3, 1, "fuzz.target", "deep", "echo", [value], {}, None])


def _truncated(body: bytes, cut: int) -> Item:
    return Item("body", body[:cut % max(len(body), 1)])


junk = st.one_of(
    others.map(lambda m: Item("body", body_of(m))),
    st.tuples(st.integers(-1, 13), st.lists(values, max_size=8)).map(
        lambda t: Item("body", codec.encode([t[0], *t[1]]))),
    st.binary(max_size=64).map(lambda b: Item("body", b)),
    st.builds(_truncated, messages.map(body_of), st.integers(0, 1000)),
    calls.map(lambda m: Item("plain", body_of(m))),
    st.builds(Item, st.just("oversized"), st.binary(max_size=16),
              st.integers(MAX_FRAME + 1, 2**32 - 1)),
    st.builds(Item, st.just("raw"), st.binary(min_size=1, max_size=24)),
    st.builds(Item, st.just("cut"), st.binary(max_size=16), st.integers(17, MAX_FRAME)),
    st.integers(1, 200).map(lambda depth: Item("body", deep_request(depth))),
)
# mostly calls, so that sequences get past their first frame
items = st.integers(0, 9).flatmap(
    lambda n: calls.map(lambda m: Item("body", body_of(m))) if n < 7 else junk)
hellos = st.builds(Hello, st.just(PROTOCOL_VERSION), texts, st.just(()), auths)
phases = st.sampled_from(["none", "random-hello", "hello", "handshake", "handshake"])
tokens = st.sampled_from([None, *TOKENS, "forged"])
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# -- raw connections ---------------------------------------------------------------------------


class Raw:
    """One raw connection: frame bodies out (or bytes, on tcp), frame bodies in."""

    closed = False

    async def send_body(self, body: bytes) -> None:
        raise NotImplementedError

    async def send_raw(self, data: bytes) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        """Nothing more will be sent."""

    async def receive(self) -> bytes | None:
        """The next frame body, or None once the server has closed the connection."""
        raise NotImplementedError


class MemoryRaw(Raw):
    def __init__(self, channel: Any) -> None:
        self.channel = channel

    async def send_body(self, body: bytes) -> None:
        try:
            self.channel.send(body)
        except ConnectError:
            self.closed = True
        await anyio.lowlevel.checkpoint()

    async def send_raw(self, data: bytes) -> None:
        await self.send_body(data)

    async def receive(self) -> bytes | None:
        try:
            body: bytes = await self.channel.receive()
        except ConnectError:
            return None
        return body


class TcpRaw(Raw):
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(2**31, preamble=True)
        self.frames: list[bytes] = []

    async def send_raw(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.closed = True

    async def send_body(self, body: bytes) -> None:
        await self.send_raw(frame(body))

    async def finish(self) -> None:
        try:
            await self.stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def receive(self) -> bytes | None:
        while not self.frames:
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                assert self.decoder.buffered == 0, "the server's last frame was cut off"
                return None
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)


class Harness:
    """A server and a well-behaved client on a background event loop."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, server: forkcore.Server,
                 client: forkcore.Client, transport: str, security: str) -> None:
        self.portal = portal
        self.server = server
        self.client = client
        self.transport = transport
        self.security = security
        self.good_total = 0

    @property
    def endpoint(self) -> str:
        assert self.server.endpoint is not None
        return self.server.endpoint

    # -- one example -------------------------------------------------------------------------

    async def attack(self, phase: str, token: str | None, sequence: list[Item],
                     hello: Hello) -> str | None:
        """Run one example's connection; a description of a hang, if the server hung."""
        if phase == "random-hello":
            phase = "none"
            sequence = [Item("body", body_of(hello)), *sequence]
        if self.transport == "memory":
            transport = create("transport", "memory", {}, "test")
            async with transport.connect(self.endpoint, timeout=WAIT) as channel:
                return await self._attack(MemoryRaw(channel), phase, token, sequence)
        else:
            host, port = self.endpoint.rsplit(":", 1)
            async with await anyio.connect_tcp(host, int(port)) as stream:
                await stream.send(PREAMBLE)  # a raw peer that speaks forkcore's framing
                return await self._attack(TcpRaw(stream), phase, token, sequence)

    async def _attack(self, raw: Raw, phase: str, token: str | None,
                      sequence: list[Item]) -> str | None:
        proto = ProtocolConnection("client")  # reads what the server sends
        cipher: SessionCipher | None = None
        seen: list[Any] = []
        if phase != "none":
            cipher = await self._hello(raw, proto, phase, token, seen)
        echoes: dict[int, list[bytes]] = {}
        for item in sequence:
            if raw.closed:
                break
            if item.kind in ("body", "plain"):
                body = item.data
                if cipher is not None and item.kind == "body":
                    body = cipher.seal(body)
                await raw.send_body(body)
                self._note_echo(item.data, echoes)
            elif item.kind == "oversized":
                if isinstance(raw, TcpRaw):
                    await raw.send_raw(struct.pack(">I", item.size) + item.data)
                else:
                    await raw.send_body(bytes(MAX_FRAME + 1 + item.size % 64))
            elif item.kind == "raw":
                await raw.send_raw(item.data)
            else:  # cut
                if isinstance(raw, TcpRaw):
                    await raw.send_raw(struct.pack(">I", item.size) + item.data)
                else:
                    await raw.send_body(item.data)
        goodbye = body_of(Goodbye("that is all"))
        await raw.send_body(goodbye if cipher is None else cipher.seal(goodbye))
        await raw.finish()
        with anyio.move_on_after(CLOSE_WAIT) as waiting:
            while (body := await raw.receive()) is not None:
                try:
                    msg = proto.decode(body)
                except ProtocolError as exc:
                    raise AssertionError(f"the server sent a frame the client cannot decode "
                                         f"({exc}) after {seen!r}") from None
                assert not isinstance(msg, CLIENT_ONLY), msg
                seen.append(msg)
                if isinstance(msg, Response) and msg.id in echoes \
                        and ANY_REPLY not in echoes[msg.id]:
                    assert codec.encode(msg.result) in echoes[msg.id], (msg, echoes[msg.id])
        if waiting.cancelled_caught:
            return (f"the server kept the connection open for {CLOSE_WAIT}s after Goodbye "
                    f"(and, on tcp, the end of the stream); it sent {seen!r}")
        return None

    async def _hello(self, raw: Raw, proto: ProtocolConnection, phase: str,
                     token: str | None, seen: list[Any]) -> SessionCipher | None:
        """A correct Hello (with the key, on a psk server); with phase "handshake", the
        rest of the handshake too. The session cipher, if one was established."""
        nonce = new_nonce()
        auth: dict[str, Any] = {}
        if self.security == "psk":
            auth = {"method": "psk", "nonce": nonce, "identity": "fuzzer", "encrypt": True}
        elif token is not None:
            auth = {"token": token}
        await raw.send_body(proto.encode(Hello(PROTOCOL_VERSION, "fuzzer", (), auth or None)))
        if phase == "hello":
            return None
        with anyio.fail_after(WAIT):
            body = await raw.receive()
            assert body is not None, "the server closed a connection with a correct Hello"
            msg = proto.decode(body)
            seen.append(msg)
            if self.security != "psk":
                assert isinstance(msg, Welcome if token != "forged" else Goodbye), msg
                return None
            assert isinstance(msg, AuthChallenge), msg
            assert msg.encrypt is True
            key = KEY.encode()
            assert msg.proof == proof(key, "server", nonce, msg.nonce, "fuzzer", wanted=True,
                                      encrypted=True)
            await raw.send_body(proto.encode(AuthProof(
                proof(key, "client", nonce, msg.nonce, "fuzzer", wanted=True,
                      encrypted=True))))
            cipher = SessionCipher(key, nonce, msg.nonce, "client")
            body = await raw.receive()
            assert body is not None, "the server closed a connection that proved the key"
            welcome = proto.decode(cipher.open(body))
            seen.append(welcome)
            assert isinstance(welcome, Welcome), welcome
            proto.cipher = cipher
            return cipher

    @staticmethod
    def _note_echo(body: bytes, echoes: dict[int, list[bytes]]) -> None:
        """Remember what an echo request asked for, to check its Response."""
        try:
            wire = codec.decode(body)
        except ProtocolError:
            return
        if not (isinstance(wire, list) and len(wire) == 8 and wire[0] == 3
                and type(wire[1]) is int):
            return
        if wire[2] == "fuzz.target" and wire[4] == "echo" \
                and isinstance(wire[5], list) and len(wire[5]) == 1 and wire[6] == {}:
            echoes.setdefault(wire[1], []).append(codec.encode(wire[5][0]))
        else:
            # an id may be reused once its call is answered: a Response with this id may
            # now answer another method, so it can no longer be checked as an echo
            echoes.setdefault(wire[1], []).append(ANY_REPLY)

    # -- after each example ------------------------------------------------------------------

    async def still_good(self) -> str | None:
        """The attack's connection is gone, and the well-behaved client is served; a
        description of a hang otherwise."""
        with anyio.move_on_after(WAIT) as waiting:
            while self.server.connection_count > 1:  # the good client's own connection
                await anyio.sleep(0.002)
        if waiting.cancelled_caught:
            return (f"the server still counts {self.server.connection_count - 1} hostile "
                    f"connections {WAIT}s after they closed")
        for _ in range(5):  # let a failing handler's log record come out
            await anyio.lowlevel.checkpoint()
        with anyio.move_on_after(WAIT) as waiting:
            counter = self.client.get_grain(ICounter, "good")
            self.good_total += 1
            assert await counter.add(1) == self.good_total
            value = {"nested": [1, 2.5, "three", b"four", None, math.pi]}
            assert await counter.echo(value) == value
            expected = ["client", "user", "psk"] if self.security == "psk" else \
                ["token-user", "user", "token"]
            assert await self.client.get_grain(IFuzzTarget, "good").whoami() == expected
        if waiting.cancelled_caught:
            return f"the well-behaved client got no answer within {WAIT}s"
        return None


class ServerHung(BaseException):
    """A hang, reported at once: hypothesis does not catch a BaseException, so it does
    not spend minutes shrinking an example each try of which takes seconds."""


def forkcore_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name} {r.levelname}: {r.getMessage()}" + (f" ({r.exc_info[1]!r})"
                                                          if r.exc_info else "")
            for r in caplog.records
            if r.name.startswith("forkcore") and (r.levelno >= logging.ERROR or r.exc_info)]


@contextmanager
def harness(backend: str, transport: str, security: str) -> Iterator[Harness]:
    server_security, client_security = SECURITY[security]
    with anyio.from_thread.start_blocking_portal(backend) as portal:
        server = forkcore.Server(
            id="fuzz", transport=transport, grains=[FuzzTarget, Counter],
            transport_options={"max_frame_size": MAX_FRAME}, security=server_security,
            max_in_flight=8, drain_timeout=2.0)
        with portal.wrap_async_context_manager(server):
            assert server.endpoint is not None
            client = forkcore.Client(servers=[server.endpoint], transport=transport,
                                     security=client_security, request_timeout=WAIT,
                                     connect_timeout=WAIT,
                                     transport_options={"max_frame_size": MAX_FRAME})
            with portal.wrap_async_context_manager(client):
                yield Harness(portal, server, client, transport, security)


@pytest.mark.usefixtures("tokens_plugin")
@pytest.mark.parametrize("security", ["open", "psk"])
@pytest.mark.parametrize("transport", ["memory", "tcp"])
def test_server_survives_generated_hostile_connections(
        anyio_backend: str, transport: str, security: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="forkcore")
    with harness(anyio_backend, transport, security) as h:
        assert h.portal.call(h.still_good) is None

        @PROPERTY
        @given(phases, tokens, st.lists(items, max_size=12), hellos)
        def example(phase: str, token: str | None, sequence: list[Item], hello: Hello) -> None:
            caplog.clear()
            hung = h.portal.call(h.attack, phase, token, sequence, hello) \
                or h.portal.call(h.still_good)
            if hung:
                raise ServerHung(f"{hung}\nexample: phase={phase!r} token={token!r} "
                                 f"hello={hello!r}\nsequence={sequence!r}")
            assert forkcore_errors(caplog) == []

        example()
        assert h.server.connection_count == 1
    assert forkcore_errors(caplog) == []


@pytest.mark.usefixtures("tokens_plugin")
@pytest.mark.parametrize("token", [[1, 2], {"a": 1}, 7, b"t-admin", None, "t" * 10_000],
                         ids=["list", "map", "int", "bytes", "null", "huge"])
def test_a_token_that_is_not_a_string_is_refused(
        anyio_backend: str, token: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The hook's contract is `authenticate(token: str, peer)`: a Hello whose token is
    anything else is refused like a wrong token, with a Goodbye, without a traceback
    (an authenticator that trusts the type, like this one, failed the connection handler
    with an unhashable token before the server checked it)."""
    caplog.set_level(logging.WARNING, logger="forkcore")

    async def main() -> Any:
        async with forkcore.Server(
                id="naive", transport="memory", grains=[FuzzTarget],
                security={"authenticator": "fuzz-naive-tokens", "allow_anonymous": False,
                          "authenticator_options": {"tokens": TOKENS}}) as server:
            assert server.endpoint is not None
            transport = create("transport", "memory", {}, "test")
            async with transport.connect(server.endpoint, timeout=WAIT) as channel:
                channel.send(body_of(Hello(PROTOCOL_VERSION, "c", (), {"token": token})))
                with anyio.fail_after(WAIT):
                    return ProtocolConnection("client").decode(await channel.receive())

    answer = anyio.run(main, backend=anyio_backend)
    assert isinstance(answer, Goodbye) and answer.reason.startswith("unauthorized"), answer
    assert forkcore_errors(caplog) == []


@pytest.mark.anyio
async def test_an_active_mitm_cannot_downgrade_a_psk_session() -> None:
    """A man in the middle without the key relays Hello, AuthChallenge and AuthProof
    between a client and the real server, drops the server's sealed Welcome and sends a
    plaintext one. The client must refuse it: only a refusal (Goodbye) may come
    unsealed after the AuthProof."""
    key = "a cluster key for fuzzing the server"
    plaintext_seen: list[Any] = []

    async def read(stream: anyio.abc.SocketStream, decoder: FrameDecoder,
                   queue: list[bytes]) -> bytes:
        while not queue:
            queue += decoder.feed(await stream.receive())
        return queue.pop(0)

    async with forkcore.Server(id="real", transport="tcp", grains=[Counter],
                               security={"psk": key}) as server:
        assert server.endpoint is not None
        host, port = server.endpoint.rsplit(":", 1)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        mitm_port = listener.extra(anyio.abc.SocketAttribute.local_address)[1]

        async def relay(client: anyio.abc.SocketStream) -> None:
            async with client, await anyio.connect_tcp(host, int(port)) as real:
                cd, sd = FrameDecoder(preamble=True), FrameDecoder(preamble=True)
                cq: list[bytes] = []
                sq: list[bytes] = []
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    await real.send(PREAMBLE + frame(await read(client, cd, cq)))  # Hello
                    await client.send(PREAMBLE + frame(await read(real, sd, sq)))  # Challenge
                    await real.send(frame(await read(client, cd, cq)))  # AuthProof
                    await read(real, sd, sq)  # the sealed Welcome, dropped
                    await client.send(frame(body_of(server.welcome)))  # a plaintext one
                    while True:
                        request = codec.decode(await read(client, cd, cq))
                        plaintext_seen.append(request)
                        if request[0] == 3:  # Request: answer it
                            await client.send(frame(body_of(Response(request[1], "forged"))))

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, relay)
            try:
                with pytest.raises((forkcore.errors.Unauthorized, ConnectError)):
                    async with forkcore.Client(servers=[f"127.0.0.1:{mitm_port}"],
                                               transport="tcp", security={"psk": key},
                                               connect_timeout=WAIT) as client:
                        answer = await client.get_grain(ICounter, "k").echo("secret")
                        raise AssertionError(f"the client accepted a plaintext session: it "
                                             f"got {answer!r}; the MITM read "
                                             f"{plaintext_seen!r}")
            finally:
                tg.cancel_scope.cancel()
    assert plaintext_seen == []


# -- the atheris target stays in working order -------------------------------------------------


def _fuzz_target() -> Any:
    path = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_protocol.py"
    spec = importlib.util.spec_from_file_location("fuzz_protocol", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_atheris_target_runs_its_seeds_and_random_inputs() -> None:
    target = _fuzz_target()
    seeds = list(target.seeds())
    assert len(seeds) > 500
    for _name, data in seeds:
        target.run_one(data)

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.binary(max_size=600))
    def random_input(data: bytes) -> None:
        target.run_one(data)

    random_input()

