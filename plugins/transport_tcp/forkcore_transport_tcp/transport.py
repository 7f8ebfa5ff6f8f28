"""TCP transport: TCP_NODELAY sockets driven through anyio (see `sockets`), frames via
forkcore's StreamChannel (length prefix, size limit checked before the body is read, the
first frame of a loop turn written at once and the rest of the turn coalesced into one
send), optionally inside TLS 1.3 (see `tls`).

Every channel carries `secure`: on the server side, True when TLS protects it; on the
client side, True only when TLS protects it *and* the server's certificate was verified
(`ca_file`, `fingerprint`, or the system CA store), False with `insecure` or plain TCP.
The core encrypts a pre-shared-key session itself on a channel that is not secure."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute, TLSStream

from forkcore.errors import ConfigError, ConnectError
from forkcore.protocol.framing import DEFAULT_MAX_FRAME_SIZE
from forkcore.security import pretty_fingerprint
from forkcore.transport import (
    Channel,
    Handler,
    StreamChannel,
    join_endpoint,
    serve_guarded,
    split_endpoint,
)

from . import sockets
from .tls import ClientTls, client_tls, positive_seconds, server_context

log = logging.getLogger("forkcore.transport.tcp")


def _nodelay(stream: anyio.abc.ByteStream) -> None:
    sock = stream.extra(SocketAttribute.raw_socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer(stream: anyio.abc.ByteStream) -> str:
    try:
        address: Any = stream.extra(SocketAttribute.remote_address)
        return join_endpoint(str(address[0]), int(address[1]))
    except Exception:
        return "unknown"


class _TLSStream(TLSStream):
    """A TLS stream whose close sends close_notify and waits (briefly) for the peer's.

    Wrapped with `standard_compatible=False`, so a peer that just drops the connection is a
    plain end of stream (frames are length-prefixed: truncation cannot go unnoticed). The
    close is still the standard one, bounded so a frozen peer cannot hold it up."""

    CLOSE_NOTIFY_WAIT = 0.5  # seconds

    async def aclose(self) -> None:
        try:
            with anyio.move_on_after(self.CLOSE_NOTIFY_WAIT):
                await self.unwrap()
        except Exception:
            pass
        await anyio.aclose_forcefully(self.transport_stream)


def _mark(channel: Channel | StreamChannel, secure: bool) -> None:
    """Tell the core whether the transport already encrypts the bytes and (for a client)
    has verified the server, so that nobody in between can read or alter them."""
    target: Any = channel
    target.secure = secure


class TcpListener:
    def __init__(self, listener: anyio.abc.Listener[Any], endpoint: str, max_frame_size: int,
                 tls: ssl.SSLContext | None = None, handshake_timeout: float = 5.0,
                 send_timeout: float = StreamChannel.SEND_TIMEOUT):
        self._listener = listener
        self._send_timeout = send_timeout
        self.endpoint = endpoint
        self.max_frame_size = max_frame_size
        self.secure = tls is not None
        self._tls = tls
        self._handshake_timeout = handshake_timeout
        self._accepting = anyio.CancelScope()

    def stop_accepting(self) -> None:
        """Refuse new connections; those already accepted keep running."""
        self._accepting.cancel()

    async def _handshake(self, raw: anyio.abc.ByteStream, peer: str) -> TLSStream | None:
        """The server side of the TLS handshake, bounded by `handshake_timeout`; None (and
        the connection closed, nothing sent) if it fails."""
        assert self._tls is not None
        try:
            with anyio.fail_after(self._handshake_timeout):
                return await _TLSStream.wrap(raw, server_side=True, ssl_context=self._tls,
                                            standard_compatible=False)
        except TimeoutError:
            log.info("tcp: %s did not complete the TLS handshake within %gs; closed", peer,
                     self._handshake_timeout)
        except ssl.SSLError as exc:
            hint = "; it did not speak TLS (a client without TLS options?)" \
                if exc.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST") else ""
            log.info("tcp: TLS handshake with %s failed (%s)%s; closed", peer,
                     exc.reason or exc, hint)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            log.debug("tcp: %s went away during the TLS handshake (%r)", peer, exc)
        except BaseException:
            await anyio.aclose_forcefully(raw)
            raise
        await anyio.aclose_forcefully(raw)
        return None

    async def serve(self, handler: Handler) -> None:
        """Accept forever; neither a failing handler nor a failing accept (say, out of file
        descriptors) stops the listener. With TLS, each connection's handshake runs in
        that connection's own task, so a slow or silent peer never holds up the others."""
        secure = self.secure

        async def marked(channel: Channel) -> None:
            _mark(channel, secure)
            await handler(channel)

        async def accepted(raw: anyio.abc.ByteStream) -> None:
            try:
                _nodelay(raw)
            except OSError:
                await raw.aclose()
                return
            peer = _peer(raw)
            stream: anyio.abc.ByteStream = raw
            if self._tls is not None:
                wrapped = await self._handshake(raw, peer)
                if wrapped is None:
                    return
                stream = wrapped
            await serve_guarded(marked, stream, peer, self.max_frame_size, log,
                                self._send_timeout)

        async def accept_loop(listener: Any) -> None:
            # accepted sockets become SocketByteStreams (see sockets.py); the listener's
            # own accept() is never called, so its socket is only waited on here
            listening = listener.extra(SocketAttribute.raw_socket)
            while True:
                try:
                    stream = await sockets.accept(listening)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                except OSError as exc:
                    log.warning("accept on %s failed: %s; retrying", self.endpoint, exc)
                    await anyio.sleep(0.1)
                    continue
                tg.start_soon(accepted, stream)

        async with anyio.create_task_group() as tg:
            with self._accepting:
                async with anyio.create_task_group() as accepting:
                    for listener in getattr(self._listener, "listeners", [self._listener]):
                        accepting.start_soon(accept_loop, listener)
            with anyio.CancelScope(shield=True):
                await self._listener.aclose()


class TcpTransport:
    """Transport `tcp`. Options: `max_frame_size` (bytes, default 16 MiB); server:
    `send_timeout` (seconds, default 30), TLS `cert_file`, `key_file`, `handshake_timeout`
    (seconds, default 5); client TLS: `ca_file`, `fingerprint`, `insecure`, `tls`,
    `server_name`. See the README."""

    name = "tcp"

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 cert_file: str | None = None, key_file: str | None = None,
                 handshake_timeout: float = 5.0,
                 send_timeout: float = StreamChannel.SEND_TIMEOUT, ca_file: str | None = None,
                 fingerprint: str | None = None, insecure: bool = False,
                 tls: bool | None = None, server_name: str | None = None) -> None:
        if isinstance(max_frame_size, bool) or not isinstance(max_frame_size, int) \
                or max_frame_size < 64:
            raise ConfigError("transport_options.max_frame_size must be an int >= 64")
        self.max_frame_size = max_frame_size
        self.handshake_timeout = positive_seconds("handshake_timeout", handshake_timeout)
        self.send_timeout = positive_seconds("send_timeout", send_timeout)
        server = server_context(cert_file, key_file)
        self._server_tls: ssl.SSLContext | None = server[0] if server else None
        self._fingerprint: str | None = server[1] if server else None
        self._cert_file = cert_file
        self._client_tls: ClientTls | None = client_tls(ca_file, fingerprint, insecure, tls,
                                                        server_name)
        self._warned_insecure = False

    # -- client ---------------------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, endpoint: str, *, timeout: float) -> AsyncIterator[StreamChannel]:
        host, port = split_endpoint(endpoint)
        deadline = anyio.current_time() + timeout
        try:
            with anyio.fail_after(timeout):
                raw = await sockets.connect(host, port)
        except TimeoutError:
            raise ConnectError(
                f"connecting to {endpoint} timed out after {timeout:g}s: is the server up "
                "and reachable?"
            ) from None
        except OSError as exc:
            hint = ("; if the server uses another transport (a udp server takes no tcp "
                    "connections), set the same `transport` in [client]"
                    if isinstance(exc, ConnectionRefusedError) else "")
            raise ConnectError(
                f"cannot connect to {endpoint}: {exc.strerror or exc}; is a forkcore server "
                f"listening there?{hint}"
            ) from None
        _nodelay(raw)
        stream: anyio.abc.ByteStream = raw
        tls = self._client_tls
        if tls is not None:
            stream = await self._client_handshake(raw, endpoint, host, tls, timeout,
                                                  deadline - anyio.current_time())
        # StreamChannel.open's task group wraps whatever the block raises (say, the core's
        # ConnectError when the server hangs up during its handshake) in an exception
        # group; hand the block's own exception back unwrapped, as callers expect.
        thrown: BaseException | None = None
        unwrapped: BaseException | None = None
        try:
            async with StreamChannel.open(stream, endpoint, self.max_frame_size) as channel:
                # TLS without verification (insecure) may be a man in the middle's TLS
                _mark(channel, tls is not None and not tls.insecure)
                try:
                    yield channel
                except BaseException as exc:
                    thrown = exc
                    raise
        except BaseExceptionGroup as group:
            if thrown is None or len(group.exceptions) != 1 or group.exceptions[0] is not thrown:
                raise
            unwrapped = thrown
        if unwrapped is not None:
            raise unwrapped

    async def _client_handshake(self, raw: anyio.abc.ByteStream, endpoint: str, host: str,
                                tls: ClientTls, timeout: float, remaining: float) -> TLSStream:
        """TLS over `raw`, within what is left of the connect timeout, then the pinned
        fingerprint check; a `ConnectError` saying which check failed otherwise."""
        if tls.insecure and not self._warned_insecure:
            self._warned_insecure = True
            log.warning("tcp: transport_options.insecure is set: the server's certificate is "
                        "NOT verified, so anyone on the path can impersonate it; use ca_file "
                        "or fingerprint outside development")
        try:
            try:
                with anyio.fail_after(max(remaining, 0.0)):
                    stream = await _TLSStream.wrap(raw, server_side=False,
                                                  hostname=tls.hostname(host),
                                                  ssl_context=tls.context,
                                                  standard_compatible=False)
            except TimeoutError:
                raise ConnectError(
                    f"TLS handshake with {endpoint} did not complete within the connect "
                    f"timeout ({timeout:g}s); does the server use TLS (cert_file)?") from None
            except ssl.SSLCertVerificationError as exc:
                raise ConnectError(tls.describe_verify_failure(endpoint, exc)) from None
            except ssl.SSLError as exc:
                raise ConnectError(
                    f"TLS handshake with {endpoint} failed: {exc.reason or exc}; does the "
                    "server use TLS (cert_file)?") from None
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                raise ConnectError(
                    f"{endpoint} closed the connection during the TLS handshake; does the "
                    "server use TLS (cert_file)?") from None
            tls.check(endpoint, stream.extra(TLSAttribute.ssl_object))
        except BaseException:
            await anyio.aclose_forcefully(raw)
            raise
        return stream

    # -- server ---------------------------------------------------------------------------

    @asynccontextmanager
    async def listen(self, endpoint: str) -> AsyncIterator[TcpListener]:
        host, port = split_endpoint(endpoint)
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise ConnectError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None
        async with listener:
            address: Any = listener.extra(SocketAttribute.local_address)
            bound = join_endpoint(str(address[0]), int(address[1]))
            if self._server_tls is not None and self._fingerprint is not None:
                log.info("tcp: TLS on %s with the certificate from %s, SHA-256 fingerprint "
                         "%s (clients can pin it with transport_options fingerprint)", bound,
                         self._cert_file, pretty_fingerprint(self._fingerprint))
            yield TcpListener(listener, bound, self.max_frame_size, self._server_tls,
                              self.handshake_timeout, self.send_timeout)
