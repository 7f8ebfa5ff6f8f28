"""Transport `udp`: forkcore over QUIC (TLS 1.3, ALPN `forkcore/1`), see docs/transports.md.

`listen()` binds one UDP socket and serves every client on it; `connect()` opens one QUIC
connection from a socket of its own. Both run their engine (engine.py) in a task group
for the duration of the block.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from typing import Any

import anyio
import anyio.abc
from aioquic.quic.configuration import QuicConfiguration

from forkcore.errors import ConnectError
from forkcore.security import pretty_fingerprint
from forkcore.transport import join_endpoint, split_endpoint

from . import certs
from .channel import QuicChannel
from .engine import Engine
from .envelope import MAX_HEADER
from .listener import UdpListener, wait_for_port
from .options import UdpOptions
from .quic import BoundedQuicConnection

log = logging.getLogger("forkcore.transport.udp")
if logging.getLogger("quic").level == logging.NOTSET:
    # aioquic logs every connection's negotiation at INFO; keep `forkcore serve` readable
    logging.getLogger("quic").setLevel(logging.WARNING)

ALPN = "forkcore/1"
DATAGRAM_FRAME_LIMIT = 65536  # largest DATAGRAM frame we accept (packets are smaller)
# Packet sizes: 1200 bytes pass any IPv4/IPv6 path; loopback has no path MTU to respect,
# and bigger packets cost far less CPU per byte (aioquic is pure Python). 16384 is the
# most aioquic's frame encoding supports.
SAFE_DATAGRAM_SIZE = 1200
LOOPBACK_DATAGRAM_SIZE = 16384
PORT_WAIT = 5.0  # seconds a listener waits for a stopping one of this process to free its port


class UdpTransport:
    """Transport `udp`. Options: see options.py (and the table in docs/transports.md)."""

    name = "udp"

    def __init__(self, **options: Any) -> None:
        self.options = o = UdpOptions.from_kwargs(options)
        # read certificates now, so a bad file is a ConfigError before anything listens
        self._server_cert = certs.load(o.cert_file, o.key_file) if o.cert_file else None
        if o.ca_file:
            certs.check_ca_file(o.ca_file)

    # -- shared --------------------------------------------------------------------------

    def _configuration(self, is_client: bool, loopback: bool = False) -> QuicConfiguration:
        o = self.options
        size = o.max_datagram_size or (LOOPBACK_DATAGRAM_SIZE if loopback else SAFE_DATAGRAM_SIZE)
        return QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN],
                                 idle_timeout=float(o.idle_timeout),
                                 max_datagram_frame_size=DATAGRAM_FRAME_LIMIT,
                                 max_datagram_size=size)

    def _connection(self, configuration: QuicConfiguration,
                    **kwargs: Any) -> BoundedQuicConnection:
        o = self.options
        stream_window = o.max_frame_size + 4 + 64 * 1024
        return BoundedQuicConnection(
            configuration=configuration, stream_window=stream_window,
            message_window=o.max_frame_size + MAX_HEADER,
            connection_window=2 * stream_window, max_uni_streams=o.max_streams, **kwargs)

    def _channel(self, quic: BoundedQuicConnection, *, peer: str, addr: Any,
                 touch: Any) -> QuicChannel:
        o = self.options
        return QuicChannel(quic, peer=peer, addr=addr, is_client=quic.configuration.is_client,
                           max_frame_size=o.max_frame_size, ping_interval=o.ping_interval,
                           max_pending_datagrams=o.max_pending_datagrams,
                           idle_timeout=o.idle_timeout, touch=touch)

    # -- server --------------------------------------------------------------------------

    @asynccontextmanager
    async def listen(self, endpoint: str) -> AsyncIterator[UdpListener]:
        host, port = split_endpoint(endpoint)
        configuration = self._configuration(is_client=False)
        fingerprint = self._load_certificate(configuration, host)
        family, sockaddr = await _resolve(host, port, f"cannot listen on {endpoint}")
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or not await wait_for_port(
                        (str(sockaddr[0]), int(sockaddr[1])), PORT_WAIT):
                    raise ConnectError(f"cannot listen on {endpoint}: "
                                       f"{exc.strerror or exc}") from None
                try:
                    sock.bind(sockaddr)
                except OSError as again:
                    raise ConnectError(f"cannot listen on {endpoint}: "
                                       f"{again.strerror or again}") from None
            bound = sock.getsockname()
            loopback_configuration = replace(configuration,
                                             max_datagram_size=self._configuration(
                                                 False, loopback=True).max_datagram_size)

            def new_connection(cid: bytes, loopback: bool) -> BoundedQuicConnection:
                return self._connection(loopback_configuration if loopback else configuration,
                                        original_destination_connection_id=cid)

            listener = UdpListener(
                sock, join_endpoint(str(bound[0]), int(bound[1])), configuration,
                new_connection,
                self._channel, self.options, fingerprint, (str(bound[0]), int(bound[1])))
            with _single_errors():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(listener.engine.run)
                    try:
                        yield listener
                    finally:
                        with anyio.CancelScope(shield=True):
                            await listener.shutdown()
                            await listener.release()
        finally:
            sock.close()

    def _load_certificate(self, configuration: QuicConfiguration, host: str) -> str:
        """Put the server certificate into `configuration`; return its fingerprint."""
        o = self.options
        if self._server_cert is not None:
            chain, key = self._server_cert
            configuration.certificate, configuration.certificate_chain = chain[0], chain[1:]
            configuration.private_key = key
            fingerprint = certs.fingerprint(chain[0])
            log.info("udp: certificate from %s, SHA-256 fingerprint %s", o.cert_file,
                     fingerprint)
            return fingerprint
        cert, key = certs.generate(host)
        configuration.certificate, configuration.private_key = cert, key
        fingerprint = certs.fingerprint(cert)
        log.info("udp: generated a self-signed certificate; SHA-256 fingerprint %s (clients "
                 "pin it with transport_options fingerprint = \"%s\")",
                 pretty_fingerprint(fingerprint), fingerprint)
        return fingerprint

    # -- client --------------------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, endpoint: str, *, timeout: float) -> AsyncIterator[QuicChannel]:
        o = self.options
        host, port = split_endpoint(endpoint)
        with anyio.fail_after(timeout):
            family, sockaddr = await _resolve(host, port, f"cannot connect to {endpoint}")
        configuration = self._configuration(is_client=True, loopback=_is_loopback(sockaddr))
        configuration.server_name = o.server_name or host
        if o.ca_file:
            configuration.verify_mode = ssl.CERT_REQUIRED
            configuration.load_verify_locations(cafile=o.ca_file)
        else:
            configuration.verify_mode = ssl.CERT_NONE
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            try:
                sock.connect(sockaddr)
            except OSError as exc:
                raise ConnectError(f"cannot connect to {endpoint}: {exc.strerror or exc}") \
                    from None
            quic = self._connection(configuration)
            addr = sockaddr

            def datagram(data: bytes, _from: Any, now: float) -> None:
                channel.datagram_received(data, addr, now)
                engine.touch(channel)

            def socket_error(exc: OSError) -> None:
                channel.abort(f"nothing answers at {endpoint} ({exc.strerror or exc}); is a "
                              "forkcore udp server listening there? (a tcp server does not "
                              "answer udp: set the same `transport` in [client])")

            engine = Engine(sock, datagram, socket_error, connected=True)
            channel = self._channel(quic, peer=endpoint, addr=addr, touch=engine.touch)
            with _single_errors():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(engine.run)
                    try:
                        quic.connect(addr, now=anyio.current_time())
                        engine.touch(channel)
                        with anyio.move_on_after(timeout) as waited:
                            await channel.handshake_done.wait()
                        if waited.cancelled_caught:
                            raise ConnectError(
                                f"connecting to {endpoint} timed out after {timeout:g}s: is "
                                "a forkcore udp server up and reachable there?")
                        channel.secure = self._verify(channel, endpoint)
                        channel.start()
                        yield channel
                    finally:
                        with anyio.CancelScope(shield=True):
                            await channel.close()
                            await engine.aclose()
        finally:
            sock.close()

    def _verify(self, channel: QuicChannel, endpoint: str) -> bool:
        """Raise `ConnectError` unless the handshake succeeded and the server's certificate
        passed the configured checks; whether it was verified at all (False only with
        `insecure` and a certificate this process did not generate)."""
        o = self.options
        if channel.state == "closed":
            failure = channel.failure or ConnectError(f"connection to {endpoint} failed")
            if o.ca_file and channel.close_code is not None \
                    and 0x100 <= channel.close_code < 0x200:
                raise ConnectError(f"the certificate of {endpoint} failed the ca_file check "
                                   f"({o.ca_file}): {channel.close_reason}")
            raise failure
        cert = channel.quic.peer_certificate()
        actual = certs.fingerprint(cert) if cert is not None else ""
        if o.fingerprint is not None:
            if actual != o.fingerprint:
                channel.close_now("certificate fingerprint mismatch", 0x100 + 42,
                                  application=False)
                raise ConnectError(
                    f"the certificate of {endpoint} failed the fingerprint check: expected "
                    f"SHA-256 {o.fingerprint}, got {actual}")
        elif not o.ca_file and not certs.generated_here(actual):
            if o.insecure:
                return False
            channel.close_now("certificate not verified", 0x100 + 42, application=False)
            raise ConnectError(
                f"cannot verify the certificate of {endpoint}: give transport_options "
                "fingerprint (the server logs it at start), or ca_file, or insecure = true "
                "(development only)")
        return True


@contextmanager
def _single_errors() -> Iterator[None]:
    """Let an error raised in a `connect` / `listen` block (or by the handshake) out as
    itself, not wrapped in the exception group of the engine's task group."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _is_loopback(sockaddr: Any) -> bool:
    try:
        return ipaddress.ip_address(str(sockaddr[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


async def _resolve(host: str, port: int, what: str) -> tuple[int, Any]:
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConnectError(f"{what}: cannot resolve {host!r}: {exc}") from None
    if not infos:
        raise ConnectError(f"{what}: {host!r} has no address")
    family, _type, _proto, _name, sockaddr = infos[0]
    return int(family), sockaddr
