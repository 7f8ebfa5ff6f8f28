"""The server side: one UDP socket, many QUIC connections, handed to the handler.

Datagrams are routed by destination connection id. A datagram for no known connection
starts one only if it is a well-formed Initial packet of at least 1200 bytes, from an
address with fewer than `max_handshakes_per_address` handshakes in progress, and its
first packet decrypts with the Initial keys of its destination connection id: that is
checked (quic.initial_decrypts) before any connection object is built, so junk that
merely looks like an Initial costs a key derivation and one AEAD check, not a connection
(measured by bench/junk.py; figures in docs/transports.md). Everything else is dropped
at the cost of parsing a header. A connection is handed to the handler once the client
has opened the ordered stream.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import anyio
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from forkcore.transport import Handler, join_endpoint

from .channel import QuicChannel
from .engine import Engine
from .quic import BoundedQuicConnection, initial_decrypts

log = logging.getLogger("forkcore.transport.udp")

MIN_INITIAL_SIZE = 1200
ACCEPT_BACKLOG = 1024

# Listeners of this process that stopped accepting but still hold their port while their
# connections finish: a new listener on the same port waits for the old one to let go
# (as a restarted server expects, since a stopped TCP listener frees its port at once).
_stopping: dict[tuple[str, int], anyio.Event] = {}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


async def wait_for_port(address: tuple[str, int], timeout: float) -> bool:
    """Wait until a stopping listener of this process releases `address`; False if none
    holds it."""
    released = _stopping.get(address)
    if released is None:
        return False
    with anyio.move_on_after(timeout):
        await released.wait()
    return True


class UdpListener:
    def __init__(self, sock: Any, endpoint: str, configuration: QuicConfiguration,
                 new_connection: Callable[..., BoundedQuicConnection],
                 new_channel: Callable[..., QuicChannel], options: Any,
                 fingerprint: str, address: tuple[str, int]) -> None:
        self.endpoint = endpoint
        self.fingerprint = fingerprint  # SHA-256 of our certificate, lower-case hex
        self.engine = Engine(sock, self._datagram)
        self._configuration = configuration
        self._new_connection = new_connection
        self._new_channel = new_channel
        self._options = options
        self._by_cid: dict[bytes, QuicChannel] = {}
        self._cids: dict[QuicChannel, set[bytes]] = {}
        self._handshaking: dict[QuicChannel, str] = {}
        self._per_host: dict[str, int] = {}
        self._accepting = True
        self._accept_send, self._accept_receive = \
            anyio.create_memory_object_stream[QuicChannel](ACCEPT_BACKLOG)
        # counters (stats()): datagrams that reached no connection, Initial-looking ones
        # among them that did not decrypt, and QUIC connections ever built
        self.dropped = 0
        self.initials_refused = 0
        self.connections_created = 0
        self._address = address
        self.released = anyio.Event()

    @property
    def connection_count(self) -> int:
        return len(self._cids)

    def stats(self) -> dict[str, int]:
        """The listener's counters, in the server's stats under "transport"."""
        return {"connections": len(self._cids), "connections_created": self.connections_created,
                "datagrams_dropped": self.dropped, "initials_refused": self.initials_refused}

    # -- the Listener interface -----------------------------------------------------------

    async def serve(self, handler: Handler) -> None:
        """Hand connections to `handler` until `stop_accepting()`; return once the
        accepted ones have ended, and then let go of the port at once (unlike a TCP
        listening socket, ours carries the connections, so it cannot close earlier)."""
        async with anyio.create_task_group() as tg:
            async for channel in self._accept_receive:
                tg.start_soon(self._run, handler, channel)
        if not self._accepting:
            with anyio.CancelScope(shield=True):
                await self.shutdown()
                await self.release()

    def stop_accepting(self) -> None:
        if self._accepting:
            self._accepting = False
            self._accept_send.close()
            _stopping.setdefault(self._address, self.released)

    async def release(self) -> None:
        """Stop the engine and close the socket: the port is free for a new listener."""
        await self.engine.aclose()
        if _stopping.get(self._address) is self.released:
            del _stopping[self._address]
        self.released.set()

    async def _run(self, handler: Handler, channel: QuicChannel) -> None:
        try:
            await handler(channel)
        except Exception:
            log.exception("connection handler for %s failed", channel.peer)
        finally:
            with anyio.CancelScope(shield=True):
                await channel.close()

    async def shutdown(self) -> None:
        """Close every connection now, and give the engine a moment to say so."""
        self.stop_accepting()
        channels = list(self._cids)
        for channel in channels:
            channel.close_now("server is shutting down")
        with anyio.move_on_after(0.5):
            for channel in channels:
                while not channel.finished:
                    await anyio.sleep(0.005)

    # -- routing datagrams ----------------------------------------------------------------

    def _datagram(self, data: bytes, addr: Any, now: float) -> None:
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf,
                                      host_cid_length=self._configuration.connection_id_length)
        except ValueError:
            self.dropped += 1
            return
        channel = self._by_cid.get(header.destination_cid)
        if channel is not None:
            channel.datagram_received(data, addr, now)
            self.engine.touch(channel)
            return
        if len(data) < MIN_INITIAL_SIZE or header.packet_type is not QuicPacketType.INITIAL:
            if (len(data) >= MIN_INITIAL_SIZE and header.version is not None
                    and header.packet_type is not QuicPacketType.VERSION_NEGOTIATION
                    and header.version not in self._configuration.supported_versions):
                self._negotiate_version(header, addr)
            self.dropped += 1
            return
        if header.version not in self._configuration.supported_versions:
            self._negotiate_version(header, addr)
            return
        self._new(data, addr, now, header, buf.tell())

    def _negotiate_version(self, header: Any, addr: Any) -> None:
        packet = encode_quic_version_negotiation(
            source_cid=header.destination_cid, destination_cid=header.source_cid,
            supported_versions=self._configuration.supported_versions)
        try:
            self.engine.sock.sendto(packet, addr)
        except OSError:
            pass

    def _new(self, data: bytes, addr: Any, now: float, header: Any, pn_offset: int) -> None:
        options = self._options
        host = str(addr[0])
        refusal = None
        if not self._accepting:
            refusal = "the server is not accepting connections"
        elif len(self._cids) >= options.max_connections:
            refusal = f"the server is at its limit of {options.max_connections} connections"
        elif self._per_host.get(host, 0) >= options.max_handshakes_per_address:
            self.dropped += 1  # an address with this many handshakes open is not heard
            return
        original_cid = header.destination_cid
        if not initial_decrypts(data[:header.packet_length], pn_offset, original_cid,
                                header.version):
            self.dropped += 1  # junk that looks like an Initial: no connection for it
            self.initials_refused += 1
            return
        quic = self._new_connection(original_cid, _is_loopback(host))
        self.connections_created += 1
        quic.receive_datagram(data, addr, now)
        if not quic.accepted_a_packet():
            self.dropped += 1
            return
        channel = self._new_channel(quic, peer=join_endpoint(host, int(addr[1])), addr=addr,
                                    touch=self.engine.touch)
        if refusal is not None:
            channel.close_now(refusal, QuicErrorCode.CONNECTION_REFUSED, application=False)
            self.engine.touch(channel)
            return
        self._cids[channel] = set()
        self._route(channel, original_cid, True)
        self._route(channel, quic.host_cid, True)
        channel.on_connection_id = lambda cid, issued: self._route(channel, cid, issued)
        channel.on_open = self._opened
        channel.on_end = self._ended
        channel.deadline_at = now + options.handshake_timeout
        self._handshaking[channel] = host
        self._per_host[host] = self._per_host.get(host, 0) + 1
        channel.process_events()
        self.engine.touch(channel)

    def _route(self, channel: QuicChannel, cid: bytes, add: bool) -> None:
        cids = self._cids.get(channel)
        if cids is None:
            return
        if add:
            cids.add(cid)
            self._by_cid[cid] = channel
        else:
            cids.discard(cid)
            if self._by_cid.get(cid) is channel:
                del self._by_cid[cid]

    def _handshake_over(self, channel: QuicChannel) -> None:
        host = self._handshaking.pop(channel, None)
        if host is not None:
            left = self._per_host[host] - 1
            if left:
                self._per_host[host] = left
            else:
                del self._per_host[host]

    def _opened(self, channel: QuicChannel) -> None:
        self._handshake_over(channel)
        if not self._accepting:
            channel.close_now("the server is not accepting connections",
                              QuicErrorCode.CONNECTION_REFUSED, application=False)
            return
        try:
            self._accept_send.send_nowait(channel)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            channel.close_now("the server is too busy to accept connections",
                              QuicErrorCode.CONNECTION_REFUSED, application=False)

    def _ended(self, channel: QuicChannel) -> None:
        self._handshake_over(channel)
        for cid in self._cids.pop(channel, ()):
            if self._by_cid.get(cid) is channel:
                del self._by_cid[cid]
