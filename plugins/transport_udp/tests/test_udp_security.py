"""Transport `udp` security: certificates, verification, ALPN, option errors."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import forkcore.plugins
from forkcore.errors import ConfigError, ConnectError
from forkcore.security import pretty_fingerprint

pytestmark = pytest.mark.anyio
WAIT = 5.0


def udp(**options: Any) -> Any:
    return forkcore.plugins.create("transport", "udp", options, "test")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(tmp: Path, label: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(label)).issuer_name(_name(label))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp / f"{label}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, str(path)


def make_leaf(tmp: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
              ip: str = "127.0.0.1") -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("server")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = tmp / "server.pem", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def echo(channel: Any) -> None:
    while True:
        try:
            channel.send(await channel.receive())
        except ConnectError:
            return


async def round_trip(server: Any, client: Any, *, verified: bool = True) -> None:
    """One echo over a QUIC channel; the client's channel is `secure` (encrypted, and the
    server's certificate verified) exactly when `verified`."""
    async with server.listen("127.0.0.1:0") as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        async with client.connect(listener.endpoint, timeout=WAIT) as channel:
            assert channel.secure is verified
            channel.send(b"ping")
            with anyio.fail_after(WAIT):
                assert await channel.receive() == b"ping"
        tg.cancel_scope.cancel()


async def connect_error(server: Any, client: Any) -> str:
    async with server.listen("127.0.0.1:0") as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        with anyio.fail_after(WAIT), pytest.raises(ConnectError) as info:
            async with client.connect(listener.endpoint, timeout=WAIT):
                pass
        tg.cancel_scope.cancel()
    return str(info.value)


@pytest.fixture
def ca_files(tmp_path: Path) -> dict[str, str]:
    ca, ca_key, ca_path = make_ca(tmp_path, "ca")
    _other, _other_key, other_path = make_ca(tmp_path, "other-ca")
    cert_file, key_file = make_leaf(tmp_path, ca, ca_key)
    return {"ca": ca_path, "other_ca": other_path, "cert": cert_file, "key": key_file}


async def test_generated_certificate_is_logged_and_exposed(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="forkcore.transport.udp")
    async with udp().listen("127.0.0.1:0") as listener:
        assert len(listener.fingerprint) == 64
    assert pretty_fingerprint(listener.fingerprint) in caplog.text
    assert listener.fingerprint in caplog.text


async def test_pinned_fingerprint_passes_with_or_without_colons(
        ca_files: dict[str, str]) -> None:
    server = udp(cert_file=ca_files["cert"], key_file=ca_files["key"])
    async with server.listen("127.0.0.1:0") as listener:
        digest = listener.fingerprint
    await round_trip(server, udp(fingerprint=digest))
    await round_trip(server, udp(fingerprint=pretty_fingerprint(digest)))


async def test_wrong_fingerprint_is_a_connect_error_naming_the_check(
        ca_files: dict[str, str]) -> None:
    server = udp(cert_file=ca_files["cert"], key_file=ca_files["key"])
    message = await connect_error(server, udp(fingerprint="ab" * 32))
    assert "fingerprint check" in message and "ab" * 32 in message


async def test_ca_file_verification(ca_files: dict[str, str]) -> None:
    server = udp(cert_file=ca_files["cert"], key_file=ca_files["key"])
    await round_trip(server, udp(ca_file=ca_files["ca"]))
    message = await connect_error(server, udp(ca_file=ca_files["other_ca"]))
    assert "ca_file check" in message
    message = await connect_error(server, udp(ca_file=ca_files["ca"], server_name="example.org"))
    assert "ca_file check" in message and "example.org" in message


async def test_without_verification_options_connecting_fails_and_says_what_to_pass(
        ca_files: dict[str, str]) -> None:
    server = udp(cert_file=ca_files["cert"], key_file=ca_files["key"])
    message = await connect_error(server, udp())
    assert "fingerprint" in message and "ca_file" in message and "insecure" in message


async def test_insecure_skips_verification(ca_files: dict[str, str]) -> None:
    server = udp(cert_file=ca_files["cert"], key_file=ca_files["key"])
    await round_trip(server, udp(insecure=True), verified=False)
    # insecure does not undo a check that was made: a pin or a CA still verifies
    async with server.listen("127.0.0.1:0") as listener:
        digest = listener.fingerprint
    await round_trip(server, udp(insecure=True, fingerprint=digest))
    await round_trip(server, udp(insecure=True, ca_file=ca_files["ca"]))


async def test_certificates_generated_in_this_process_are_trusted() -> None:
    """A listener's generated key never leaves this process: a client here that sees it
    is talking to that listener, as if it had pinned the fingerprint."""
    await round_trip(udp(), udp())
    await round_trip(udp(), udp(insecure=True))  # verified all the same


async def test_a_client_with_another_alpn_is_refused() -> None:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted

    async with udp().listen("127.0.0.1:0") as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        host, port = listener.endpoint.rsplit(":", 1)
        quic = QuicConnection(configuration=QuicConfiguration(
            is_client=True, alpn_protocols=["h3"], verify_mode=0))
        async with await anyio.create_connected_udp_socket(host, int(port)) as sock:
            quic.connect((host, int(port)), anyio.current_time())
            outcome = None
            with anyio.fail_after(WAIT):
                while outcome is None:
                    for data, _ in quic.datagrams_to_send(anyio.current_time()):
                        await sock.send(data)
                    with anyio.move_on_after(0.05):
                        quic.receive_datagram(await sock.receive(), (host, int(port)),
                                              anyio.current_time())
                    timer = quic.get_timer()
                    if timer is not None and timer <= anyio.current_time():
                        quic.handle_timer(anyio.current_time())
                    while (event := quic.next_event()) is not None:
                        if isinstance(event, HandshakeCompleted | ConnectionTerminated):
                            outcome = event
            assert isinstance(outcome, ConnectionTerminated)
            assert "ALPN" in outcome.reason_phrase
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(("options", "complaint"), [
    ({"fingerprint": "nope"}, "fingerprint"),
    ({"insecure": "yes"}, "insecure"),
    ({"idle_timeout": 0}, "idle_timeout"),
    ({"max_datagram_size": 100}, "max_datagram_size"),
    ({"no_such_option": 1}, "no_such_option"),
    ({"cert_file": "/nonexistent.pem"}, "cert_file"),
    ({"key_file": "/etc/hostname"}, "key_file"),
])
def test_bad_options_are_config_errors_naming_the_option(options: dict[str, Any],
                                                         complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        udp(**options)


def test_a_key_that_does_not_match_the_certificate_is_a_config_error(
        ca_files: dict[str, str], tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="does not belong"):
        udp(cert_file=ca_files["cert"], key_file=str(other))
