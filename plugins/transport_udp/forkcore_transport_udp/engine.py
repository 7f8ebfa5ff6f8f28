"""The I/O loop: one UDP socket, the QUIC connections on it, their timers and packets.

Two tasks share the socket. The reader waits until the socket is readable, then takes
every datagram the kernel holds (up to a batch) and feeds each to its connection. The
driver fires due timers and then, once per loop turn, asks every connection that was
touched (by a datagram, a timer, or the application sending) for its packets and sends
them: frames queued during one turn leave together, and acknowledgements of a batch of
received packets share packets.

The socket is a plain non-blocking socket driven with `anyio.wait_readable` /
`wait_writable`, so the loop runs on asyncio and trio alike. (anyio's own UDP socket
objects were measured unsuitable: on asyncio they drop datagrams past 100 queued ones
and swallow ICMP errors, so a refused connection would look like a timeout.)
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import math
import socket
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel

log = logging.getLogger("forkcore.transport.udp")

Address = Any  # a socket address tuple
BATCH = 256  # datagrams read per wake-up before packets go out
RECEIVE_BUFFER = 4 * 1024 * 1024


class Session(Protocol):
    """What the engine drives: a QUIC connection plus its timers."""

    def transmit(self, now: float) -> list[tuple[bytes, Address]]: ...
    def timer_fired(self, now: float) -> None: ...
    def deadline(self) -> float | None: ...
    @property
    def finished(self) -> bool: ...


class Engine:
    def __init__(self, sock: socket.socket,
                 on_datagram: Callable[[bytes, Address, float], None],
                 on_error: Callable[[OSError], None] | None = None,
                 connected: bool = False) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        except OSError:
            pass
        self.sock = sock
        self._on_datagram = on_datagram
        self._on_error = on_error
        self._connected = connected
        self._dirty: dict[Session, None] = {}
        self._timers: list[tuple[float, int, Session]] = []
        self._timer_at: dict[Session, float] = {}
        self._order = itertools.count()
        self._wake = anyio.Event()
        self._woken = False
        self._scope = anyio.CancelScope(shield=True)
        self._closed = False
        self._started = False
        self._done = anyio.Event()
        self.sent = 0
        self.received = 0

    def touch(self, session: Session) -> None:
        """`session` has something to send: transmit it at the end of this loop turn."""
        self._dirty[session] = None
        if not self._woken:
            self._woken = True
            self._wake.set()

    def forget(self, session: Session) -> None:
        self._dirty.pop(session, None)
        self._timer_at.pop(session, None)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run until `aclose()`; cancelling the surrounding scope does not stop it, since
        closing connections (after that) still needs it. The socket is closed here, by
        this task, once its loops have ended: closing it from another task while a loop
        still waits on it would leave a stale registration in the event loop for the next
        socket that gets the same file descriptor."""
        self._started = True
        try:
            if self._closed:
                return  # closed before it began
            with self._scope:
                task_status.started()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read_loop)
                    await self._drive_loop()
        finally:
            self._closed = True
            self.sock.close()
            self._done.set()

    async def aclose(self) -> None:
        """Stop the loop and close the socket (idempotent)."""
        self._closed = True
        self._scope.cancel()
        if self._started:
            await self._done.wait()
        else:
            self.sock.close()

    # -- reading ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        sock = self.sock
        while not self._closed:
            try:
                await anyio.wait_readable(sock)
            except (anyio.ClosedResourceError, OSError, ValueError):
                return
            if self._closed:
                return
            now = anyio.current_time()
            for _ in range(BATCH):
                try:
                    if self._connected:
                        data, addr = sock.recv(65536), None
                    else:
                        data, addr = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._socket_error(exc)
                    break
                self.received += 1
                self._on_datagram(data, addr, now)
            if not self._woken:
                self._woken = True
                self._wake.set()

    def _socket_error(self, exc: OSError) -> None:
        if self._on_error is not None:
            self._on_error(exc)
        else:
            # an ICMP error for one client's address arrives on the shared socket; it
            # says nothing about the others
            log.debug("udp socket error (ignored): %s", exc)

    # -- timers and sending -------------------------------------------------------------

    async def _drive_loop(self) -> None:
        timers = self._timers
        while not self._closed:
            now = anyio.current_time()
            while timers and timers[0][0] <= now:
                when, _, session = heapq.heappop(timers)
                if self._timer_at.get(session) != when:
                    continue  # rescheduled or forgotten since
                del self._timer_at[session]
                session.timer_fired(now)
                self._dirty[session] = None
            self._woken = False
            self._wake = anyio.Event()
            dirty, self._dirty = self._dirty, {}
            for session in dirty:
                for data, addr in session.transmit(now):
                    await self._send(data, addr)
                if session.finished:
                    self.forget(session)
                else:
                    self._schedule(session)
            if self._woken or self._dirty:
                await anyio.lowlevel.checkpoint()
                continue
            wait = math.inf
            if timers:
                wait = max(0.0, timers[0][0] - anyio.current_time())
            with anyio.move_on_after(wait):
                await self._wake.wait()

    def _schedule(self, session: Session) -> None:
        when = session.deadline()
        if when is None:
            self._timer_at.pop(session, None)
            return
        if self._timer_at.get(session) == when:
            return
        self._timer_at[session] = when
        heapq.heappush(self._timers, (when, next(self._order), session))
        if len(self._timers) > 4 * len(self._timer_at) + 64:  # drop stale entries
            # in place: the driver holds this very list, so a new one would never fire
            self._timers[:] = [t for t in self._timers if self._timer_at.get(t[2]) == t[0]]
            heapq.heapify(self._timers)

    async def _send(self, data: bytes, addr: Address) -> None:
        sock = self.sock
        while not self._closed:
            try:
                if self._connected:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
                self.sent += 1
                return
            except (BlockingIOError, InterruptedError):
                try:
                    await anyio.wait_writable(sock)
                except (anyio.ClosedResourceError, OSError, ValueError):
                    return
            except OSError as exc:
                if exc.errno in (errno.EMSGSIZE,):
                    log.warning("udp datagram of %d bytes too big for the path: %s", len(data),
                                exc)
                    return
                self._socket_error(exc)
                return
