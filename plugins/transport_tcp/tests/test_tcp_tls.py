"""TLS over transport `tcp`, through the public API (forkcore.Server / forkcore.Client).

A test CA and certificates are made with `cryptography` and written to a temporary
directory: a CA, a server certificate it signs (SAN 127.0.0.1 and localhost), and an
unrelated CA that must not be trusted. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSAttribute, TLSStream
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import forkcore
import forkcore.plugins
from forkcore.errors import ConfigError, ConnectError, ProtocolError, Unauthorized
from forkcore.protocol import codec, framing
from forkcore.protocol.framing import FrameDecoder
from forkcore.protocol.messages import AuthChallenge, AuthProof, Request, Welcome, from_wire
from forkcore.security import SessionCipher
from forkcore.transport import split_endpoint

WAIT = 10.0  # bound for anything that should simply work
PROMPT = 3.0  # bound for a refusal that should come at once

# -- certificates -------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
               ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("forkcore test server"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


class Pki:
    def __init__(self, root: Path) -> None:
        ca, ca_key = _make_ca("forkcore test CA")
        leaf, leaf_key = _make_leaf(ca, ca_key)
        other_ca, _ = _make_ca("some other CA")
        self.ca_file = root / "ca.pem"
        self.cert_file = root / "server.pem"
        self.key_file = root / "server.key"
        self.other_ca_file = root / "other-ca.pem"
        self.encrypted_key_file = root / "encrypted.key"
        self.ca_file.write_bytes(_pem(ca))
        self.cert_file.write_bytes(_pem(leaf))
        self.key_file.write_bytes(_key_pem(leaf_key))
        self.other_ca_file.write_bytes(_pem(other_ca))
        self.encrypted_key_file.write_bytes(_key_pem(leaf_key, b"secret"))
        self.fingerprint = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)
                                          ).hexdigest()

    @property
    def server_options(self) -> dict[str, Any]:
        return {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


# -- a grain and a server -----------------------------------------------------------------


class IEcho(forkcore.GrainInterface, name="tcp_tls_test.echo"):
    async def echo(self, value: Any) -> Any: ...


class Echo(forkcore.Grain, IEcho):
    async def echo(self, value: Any) -> Any:
        return value


@asynccontextmanager
async def tls_server(options: dict[str, Any]) -> AsyncIterator[str]:
    """A server with `options`; its endpoint."""
    async with forkcore.Server(id="tls", transport="tcp", grains=[Echo],
                               transport_options=options) as server:
        assert server.endpoint
        yield server.endpoint


def client(endpoint: str, options: dict[str, Any] | None = None,
           connect_timeout: float = 5.0) -> forkcore.Client:
    return forkcore.Client(servers=[endpoint], transport="tcp", request_timeout=5.0,
                           connect_timeout=connect_timeout, transport_options=options or {})


async def call_works(endpoint: str, options: dict[str, Any]) -> None:
    with anyio.fail_after(WAIT):
        async with client(endpoint, options) as c:
            assert await c.get_grain(IEcho, "k").echo({"x": [1, b"\x00"]}) == {"x": [1, b"\x00"]}


async def refused(endpoint: str, options: dict[str, Any] | None,
                  connect_timeout: float = 5.0) -> str:
    """Connect, expect a ConnectError within PROMPT seconds; its message."""
    with anyio.fail_after(PROMPT):
        with pytest.raises(ConnectError) as info:
            async with client(endpoint, options, connect_timeout):
                pass
    return str(info.value)


async def read_until_closed(stream: Any, within: float) -> bytes:
    """Everything the peer sends until it closes; fails if it is still open after `within`."""
    received = b""
    with anyio.fail_after(within):
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


# -- it works -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_calls_work_with_a_ca_file(pki: Pki) -> None:
    async with tls_server(pki.server_options) as endpoint:
        await call_works(endpoint, {"ca_file": str(pki.ca_file)})


@pytest.mark.anyio
async def test_calls_work_with_a_pinned_fingerprint_in_any_spelling(pki: Pki) -> None:
    colons = ":".join(pki.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
    async with tls_server(pki.server_options) as endpoint:
        await call_works(endpoint, {"fingerprint": pki.fingerprint})
        await call_works(endpoint, {"fingerprint": colons})


@pytest.mark.anyio
async def test_ca_file_and_fingerprint_together(pki: Pki) -> None:
    async with tls_server(pki.server_options) as endpoint:
        await call_works(endpoint, {"ca_file": str(pki.ca_file),
                                    "fingerprint": pki.fingerprint})


@pytest.mark.anyio
async def test_insecure_works_and_warns_once(pki: Pki, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    async with tls_server(pki.server_options) as endpoint:
        with caplog.at_level(logging.WARNING, logger="forkcore.transport.tcp"):
            with anyio.fail_after(WAIT):
                async with client(endpoint, {"insecure": True}) as c:
                    assert await c.get_grain(IEcho, 1).echo("hi") == "hi"
                    # the same transport connects again: no second warning
                    async with c.transport.connect(endpoint, timeout=5.0) as channel:
                        # TLS, but the server is not verified: not secure for the core,
                        # which then encrypts a pre-shared-key session itself
                        assert channel.secure is False
    warnings = [r for r in caplog.records if "insecure" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


@pytest.mark.anyio
async def test_channels_say_whether_tls_protects_them(pki: Pki) -> None:
    tls = forkcore.plugins.create("transport", "tcp", pki.server_options, "test")
    plain = forkcore.plugins.create("transport", "tcp", {}, "test")
    pinned = forkcore.plugins.create("transport", "tcp", {"fingerprint": pki.fingerprint}, "test")
    seen: list[Any] = []

    async def handler(channel: Any) -> None:
        seen.append(channel.secure)
        await channel.receive()

    with anyio.fail_after(WAIT):
        for server_side, client_side, secure in ((tls, pinned, True), (plain, plain, False)):
            async with server_side.listen("127.0.0.1:0") as listener, \
                    anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, handler)
                async with client_side.connect(listener.endpoint, timeout=5.0) as channel:
                    assert channel.secure is secure
                    while len(seen) < 1:
                        await anyio.sleep(0.01)
                    assert seen.pop() is secure
                tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_the_server_speaks_tls_1_3_with_alpn_forkcore(pki: Pki) -> None:
    async with tls_server(pki.server_options) as endpoint:
        host, port = split_endpoint(endpoint)
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        context.set_alpn_protocols(["forkcore/1"])
        with anyio.fail_after(WAIT):
            stream = await anyio.connect_tcp(host, port, ssl_context=context,
                                             tls_hostname=host)
            async with stream:
                assert stream.extra(TLSAttribute.tls_version) == "TLSv1.3"
                assert stream.extra(TLSAttribute.alpn_protocol) == "forkcore/1"

        old = ssl.create_default_context(cafile=str(pki.ca_file))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with anyio.fail_after(WAIT), pytest.raises((ssl.SSLError, anyio.BrokenResourceError,
                                                    anyio.EndOfStream)):
            await anyio.connect_tcp(host, port, ssl_context=old, tls_hostname=host)


# -- a pre-shared key over TLS the client does not verify ---------------------------------

PSK = "a cluster key for the tls tests"
MARKER = "mitm-can-read-this-7"


class TlsMitm:
    """A man in the middle for an `insecure` client: terminates the client's TLS with a
    certificate of its own CA, opens TLS to the real server, and relays the frames in
    between, recording them and changing the handshake as told (`tamper`)."""

    def __init__(self, pki: Pki, root: Path, target: str, tamper: str) -> None:
        ca, ca_key = _make_ca("mitm CA")
        leaf, leaf_key = _make_leaf(ca, ca_key)
        (root / "mitm.pem").write_bytes(_pem(leaf))
        (root / "mitm.key").write_bytes(_key_pem(leaf_key))
        self.down = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.down.load_cert_chain(root / "mitm.pem", root / "mitm.key")
        self.down.set_alpn_protocols(["forkcore/1"])
        self.up = ssl.create_default_context(cafile=str(pki.ca_file))
        self.up.set_alpn_protocols(["forkcore/1"])
        self.target = split_endpoint(target)
        self.tamper = tamper
        self.seen: dict[str, list[bytes]] = {"c2s": [], "s2c": []}  # frame bodies, as relayed

    async def serve(self, *, task_status: anyio.abc.TaskStatus[str]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_address)[1]
        task_status.started(f"127.0.0.1:{port}")
        async with listener:
            await listener.serve(self._relay)

    async def _relay(self, raw: Any) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError,
                                 OSError):
            async with raw:
                client = await TLSStream.wrap(raw, server_side=True, ssl_context=self.down,
                                              standard_compatible=False)
                server = await anyio.connect_tcp(*self.target, ssl_context=self.up,
                                                 tls_hostname="127.0.0.1",
                                                 tls_standard_compatible=False)
                async with server, anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, client, server, "c2s")
                    await self._pump(server, client, "s2c")
                    tg.cancel_scope.cancel()

    async def _pump(self, source: Any, sink: Any, direction: str) -> None:
        decoder = FrameDecoder(preamble=True)
        preamble = framing.PREAMBLE  # relayed with the first frame
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError,
                                 OSError):
            while True:
                for body in decoder.feed(await source.receive()):
                    body = self._change(direction, len(self.seen[direction]), body)
                    self.seen[direction].append(body)
                    await sink.send(preamble + framing.frame(body))
                    preamble = b""

    def _change(self, direction: str, index: int, body: bytes) -> bytes:
        if index != 0:
            return body
        message = codec.decode(body)
        if direction == "c2s" and self.tamper in ("wish", "both"):
            message[4]["encrypt"] = False  # Hello: "I need no encryption, I verified you"
        elif direction == "s2c" and self.tamper in ("decision", "both"):
            message[3] = not message[3]  # AuthChallenge: flip the server's decision
        return codec.encode(message)


def psk_client(endpoint: str, options: dict[str, Any]) -> forkcore.Client:
    return forkcore.Client(servers=[endpoint], transport="tcp", request_timeout=5.0,
                           connect_timeout=5.0, transport_options=options,
                           security={"psk": PSK})


@pytest.mark.anyio
@pytest.mark.parametrize("tamper", ["none", "decision", "wish", "both"])
async def test_psk_over_unverified_tls_is_encrypted_and_bound_to_the_handshake(
        pki: Pki, tmp_path: Path, tamper: str) -> None:
    """An `insecure` client cannot tell the real server's TLS from a man in the middle's,
    so with a pre-shared key it asks for the core's encryption: the man in the middle,
    who sees everything TLS carries, reads only ciphertext after the handshake. Changing
    the request or the server's decision on the way fails the handshake (Unauthorized),
    before the client sends its proof or any call."""
    async with forkcore.Server(id="tls", transport="tcp", grains=[Echo],
                               transport_options=pki.server_options,
                               security={"psk": PSK}) as server, \
            anyio.create_task_group() as tg:
        assert server.endpoint
        mitm = TlsMitm(pki, tmp_path, server.endpoint, tamper)
        endpoint = await tg.start(mitm.serve)
        options = {"insecure": True}
        with anyio.fail_after(WAIT):
            if tamper == "none":
                async with psk_client(endpoint, options) as c:
                    assert await c.get_grain(IEcho, "k").echo(MARKER) == MARKER
            else:
                with pytest.raises(Unauthorized) as refused:
                    async with psk_client(endpoint, options):
                        pass
        tg.cancel_scope.cancel()
    c2s, s2c = mitm.seen["c2s"], mitm.seen["s2c"]
    hello, challenge = codec.decode(c2s[0]), from_wire(codec.decode(s2c[0]))
    assert isinstance(challenge, AuthChallenge)
    everything = b"".join(c2s + s2c)
    assert MARKER.encode() not in everything and b"tcp_tls_test.echo" not in everything
    if tamper != "none":
        message = str(refused.value)
        if tamper == "both":  # the flags agree again, but not with the server's proof
            assert "altered the key exchange" in message, message
        else:
            assert "downgrade was attempted" in message, message
        assert not any(isinstance(from_wire(codec.decode(b)), AuthProof) for b in c2s[1:])
        return
    assert hello[4]["encrypt"] is True and challenge.encrypt is True
    # what the man in the middle relayed after the handshake is the core's ciphertext:
    # with the key (which he has not got) it opens; without, nothing is readable
    nonce = hello[4]["nonce"]
    from_server = SessionCipher(PSK.encode(), nonce, challenge.nonce, "client")
    from_client = SessionCipher(PSK.encode(), nonce, challenge.nonce, "server")
    assert isinstance(from_wire(codec.decode(from_server.open(s2c[1]))), Welcome)
    assert isinstance(from_wire(codec.decode(c2s[1])), AuthProof)
    requests = [from_wire(codec.decode(from_client.open(b))) for b in c2s[2:]]
    assert any(isinstance(r, Request) and r.args == [MARKER] for r in requests)


# -- channels over TLS ----------------------------------------------------------------------


@asynccontextmanager
async def tls_channels(pki: Pki, handler: Any, max_frame_size: int = 16 * 1024 * 1024
                       ) -> AsyncIterator[Any]:
    """A TLS listener serving `handler` and a pinned client channel to it."""
    server_side = forkcore.plugins.create(
        "transport", "tcp", {**pki.server_options, "max_frame_size": max_frame_size}, "test")
    client_side = forkcore.plugins.create(
        "transport", "tcp", {"fingerprint": pki.fingerprint, "max_frame_size": max_frame_size},
        "test")
    async with server_side.listen("127.0.0.1:0") as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        async with client_side.connect(listener.endpoint, timeout=WAIT) as channel:
            yield channel
        tg.cancel_scope.cancel()


async def echo(channel: Any) -> None:
    while True:
        try:
            body = await channel.receive()
        except ConnectError:
            return
        channel.send(body)


@pytest.mark.anyio
async def test_large_empty_and_many_frames_round_trip_over_tls(pki: Pki) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB
    frames = [b"", big, b"x", big[::-1], b""] + [b"%d" % i * (i % 50) for i in range(3000)]
    async with tls_channels(pki, echo) as channel:
        with anyio.fail_after(WAIT):
            for body in frames:
                channel.send(body)
            got = [await channel.receive() for _ in frames]
    assert got == frames


@pytest.mark.anyio
async def test_either_side_closing_is_noticed_promptly(pki: Pki) -> None:
    server_saw: list[str] = []
    server_channel: list[Any] = []

    async def record(channel: Any) -> None:
        server_channel.append(channel)
        started = anyio.current_time()
        try:
            while True:
                await channel.receive()
        except ConnectError:
            server_saw.append(f"closed after {anyio.current_time() - started:.3f}s")

    # the client closes: the server's receive ends, and the close does not linger
    async with tls_channels(pki, record) as channel:
        channel.send(b"hello")
        with anyio.fail_after(WAIT):
            while not server_channel:
                await anyio.sleep(0.01)
        started = anyio.current_time()
        await channel.aclose()
        assert anyio.current_time() - started < 0.4
        with anyio.fail_after(PROMPT):
            while not server_saw:
                await anyio.sleep(0.01)

    # the server closes: the client's receive ends promptly
    async def close_at_once(channel: Any) -> None:
        await channel.receive()
        await channel.aclose()

    async with tls_channels(pki, close_at_once) as channel:
        channel.send(b"bye")
        with anyio.fail_after(PROMPT), pytest.raises(ConnectError):
            await channel.receive()


@pytest.mark.anyio
async def test_an_oversized_frame_over_tls_is_a_protocol_error(pki: Pki) -> None:
    errors: list[BaseException] = []

    async def guard(channel: Any) -> None:
        try:
            assert await channel.receive() == b"ok"
            await channel.receive()
        except Exception as exc:
            errors.append(exc)

    async with tls_channels(pki, guard, max_frame_size=1024) as channel:
        channel.send(b"ok")
        channel.send(b"\x01" * 1025)
        with anyio.fail_after(PROMPT):
            while not errors:
                await anyio.sleep(0.01)
    assert isinstance(errors[0], ProtocolError)


# -- it refuses ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_fingerprint_is_refused_naming_the_check(pki: Pki) -> None:
    wrong = "ab" * 32
    async with tls_server(pki.server_options) as endpoint:
        message = await refused(endpoint, {"fingerprint": wrong})
    assert "pinned fingerprint" in message
    assert wrong in message and pki.fingerprint in message


@pytest.mark.anyio
async def test_a_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    async with tls_server(pki.server_options) as endpoint:
        message = await refused(endpoint, {"ca_file": str(pki.other_ca_file)})
    assert "certificate verify failed" in message
    assert "other-ca.pem" in message


@pytest.mark.anyio
async def test_a_certificate_for_another_name_is_refused(pki: Pki) -> None:
    async with tls_server(pki.server_options) as endpoint:
        message = await refused(endpoint, {"ca_file": str(pki.ca_file),
                                           "server_name": "elsewhere.example"})
        assert "certificate verify failed" in message
        assert "elsewhere.example" in message
        # the name it does carry is accepted
        await call_works(endpoint, {"ca_file": str(pki.ca_file),
                                    "server_name": "localhost"})


@pytest.mark.anyio
async def test_the_system_ca_store_does_not_trust_a_private_ca(pki: Pki) -> None:
    async with tls_server(pki.server_options) as endpoint:
        message = await refused(endpoint, {"tls": True})
    assert "certificate verify failed" in message
    assert "system CA store" in message


@pytest.mark.anyio
async def test_a_client_without_tls_options_fails_cleanly(pki: Pki) -> None:
    async with tls_server(pki.server_options) as endpoint:
        await refused(endpoint, None)
        await refused(endpoint, {"tls": False})
        # and the server still serves TLS clients afterwards
        await call_works(endpoint, {"ca_file": str(pki.ca_file)})


@pytest.mark.anyio
async def test_a_tls_client_to_a_plain_server_fails_cleanly(pki: Pki) -> None:
    async with tls_server({}) as endpoint:
        message = await refused(endpoint, {"ca_file": str(pki.ca_file)})
        assert "TLS" in message
        await call_works(endpoint, {})


@pytest.mark.anyio
async def test_plaintext_to_the_tls_port_gets_nothing_back(pki: Pki) -> None:
    frame = b"\x00\x00\x00\x10" + b"\x93\x00\xa5hello\xa4tcp!\x90\x90\x90\x90"
    async with tls_server(pki.server_options) as endpoint:
        host, port = split_endpoint(endpoint)
        for payload in (frame, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 4096):
            with anyio.fail_after(WAIT):
                stream = await anyio.connect_tcp(host, port)
            async with stream:
                await stream.send(payload)
                assert await read_until_closed(stream, PROMPT) == b""


@pytest.mark.anyio
async def test_stalled_connections_do_not_block_a_good_client_and_are_closed(pki: Pki) -> None:
    handshake_timeout = 2.0
    options = {**pki.server_options, "handshake_timeout": handshake_timeout}
    async with tls_server(options) as endpoint:
        host, port = split_endpoint(endpoint)
        stalled = []
        with anyio.fail_after(WAIT):
            for i in range(20):
                stream = await anyio.connect_tcp(host, port)
                if i % 2:
                    await stream.send(b"\x16\x03\x01")  # the start of a TLS record, no more
                stalled.append(stream)
        try:
            started = anyio.current_time()
            await call_works(endpoint, {"ca_file": str(pki.ca_file)})
            # served before the stalled handshakes time out: not queued behind them
            assert anyio.current_time() - started < handshake_timeout
            # and each stalled connection is closed once its handshake_timeout is up
            with anyio.fail_after(handshake_timeout + PROMPT):
                for stream in stalled:
                    assert await read_until_closed(stream, handshake_timeout + PROMPT) == b""
        finally:
            for stream in stalled:
                await stream.aclose()


@pytest.mark.anyio
async def test_the_client_handshake_is_bounded_by_the_connect_timeout(pki: Pki) -> None:
    """A server that accepts TCP but never answers the TLS handshake."""
    async def silent(stream: Any) -> None:
        async with stream:
            await anyio.sleep(WAIT)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, silent)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        started = anyio.current_time()
        message = await refused(f"127.0.0.1:{port}", {"ca_file": str(pki.ca_file)},
                                connect_timeout=0.5)
        assert anyio.current_time() - started < 2.0
        assert "TLS handshake" in message
        tg.cancel_scope.cancel()


# -- bad options --------------------------------------------------------------------------


def test_bad_server_options_are_config_errors_naming_the_option(pki: Pki,
                                                                tmp_path: Path) -> None:
    other_key = tmp_path / "other.key"
    other_key.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cert_file": str(pki.cert_file)}, "key_file"),
        ({"key_file": str(pki.key_file)}, "cert_file"),
        ({"cert_file": str(tmp_path / "missing.pem"), "key_file": str(pki.key_file)},
         "cert_file"),
        ({"cert_file": str(pki.cert_file), "key_file": str(tmp_path / "missing.key")},
         "key_file"),
        ({"cert_file": str(pki.key_file), "key_file": str(pki.key_file)}, "cert_file"),
        ({"cert_file": str(pki.cert_file), "key_file": str(other_key)}, "key_file"),
        ({"cert_file": str(pki.cert_file), "key_file": str(pki.encrypted_key_file)},
         "key_file"),
        ({"cert_file": 7, "key_file": str(pki.key_file)}, "cert_file"),
        ({**pki.server_options, "handshake_timeout": 0}, "handshake_timeout"),
        ({**pki.server_options, "handshake_timeout": "5"}, "handshake_timeout"),
        ({**pki.server_options, "handshake_timeout": True}, "handshake_timeout"),
        ({"send_timeout": 0}, "send_timeout"),
        ({"send_timeout": float("inf")}, "send_timeout"),
    ]
    for options, named in cases:
        with pytest.raises(ConfigError, match=named):
            forkcore.Server(id="bad", transport="tcp", grains=[Echo], transport_options=options)


def test_bad_client_options_are_config_errors_naming_the_option(pki: Pki,
                                                                tmp_path: Path) -> None:
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("hello\n")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"fingerprint": "ab" * 31}, "fingerprint"),
        ({"fingerprint": "zz" * 32}, "fingerprint"),
        ({"fingerprint": 12}, "fingerprint"),
        ({"ca_file": str(tmp_path / "missing.pem")}, "ca_file"),
        ({"ca_file": str(not_pem)}, "ca_file"),
        ({"ca_file": 1.5}, "ca_file"),
        ({"insecure": "yes"}, "insecure"),
        ({"tls": 1}, "tls"),
        ({"tls": False, "ca_file": str(pki.ca_file)}, "tls"),
        ({"tls": True, "server_name": ""}, "server_name"),
        ({"server_name": "localhost"}, "server_name"),
    ]
    for options, named in cases:
        with pytest.raises(ConfigError, match=named):
            client("127.0.0.1:1", options)


def test_good_options_need_no_peer(pki: Pki) -> None:
    forkcore.Server(id="ok", transport="tcp", grains=[Echo],
                    transport_options={**pki.server_options, "handshake_timeout": 2})
    forkcore.Server(id="ok", transport="tcp", grains=[Echo],
                    transport_options={"cert_file": pki.cert_file, "key_file": pki.key_file})
    for options in ({"ca_file": str(pki.ca_file)}, {"fingerprint": pki.fingerprint.upper()},
                    {"fingerprint": "sha256/" + pki.fingerprint}, {"insecure": True},
                    {"tls": True}, {"tls": False}, {"insecure": False}):
        client("127.0.0.1:1", options)
