"""The I/O loop: one UDP socket, the QUIC connections on it, their timers and packets.

Datagrams are taken from the socket in batches (up to BATCH per wake-up) and fed to their
connections. Due timers fire, and then, once per loop turn, every connection that was
touched (by a datagram, a timer, or the application sending) is asked for its packets,
which are sent: frames queued during one turn leave together, and acknowledgements of a
batch of received packets share packets.

Two drivers do this, with the same behaviour:

- on asyncio, callbacks: the socket stays registered with the event loop (`add_reader`),
  a touch schedules one flush with `call_soon`, and one timer handle is armed for the
  earliest deadline. A grain call at one in flight then costs two loop callbacks per
  side instead of three task wake-ups, two cancel scopes with timers and an
  `epoll_ctl` pair per datagram (measured: docs/transports.md, "udp and latency");
- elsewhere (trio), two tasks on a plain non-blocking socket with `anyio.wait_readable`
  / `wait_writable`: a reader, and a driver that fires timers and flushes.

(anyio's own UDP socket objects were measured unsuitable: on asyncio they drop
datagrams past 100 queued ones and swallow ICMP errors, so a refused connection would
look like a timeout.)
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
import sniffio

log = logging.getLogger("forkcore.transport.udp")

Address = Any  # a socket address tuple
BATCH = 256  # datagrams read per wake-up before packets go out
RECEIVE_BUFFER = 4 * 1024 * 1024
RECEIPT_TURNS = 2  # loop turns a flush after received datagrams may wait for a send


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
        # the asyncio driver
        self._loop: Any = None  # the asyncio loop, while the callback driver runs
        self._flush_handle: Any = None  # a flush scheduled with call_soon
        self._timer_handle: Any = None  # call_at for the earliest deadline
        self._timer_handle_at = math.inf
        self._unsent: list[tuple[bytes, Address]] = []  # waiting for the socket to drain
        self._failure: BaseException | None = None  # raised by a callback: run() raises it
        self._reading = False  # taking datagrams: touches are flushed after the batch
        self._touched = False  # touched while a flush after a receipt waits
        self._turns_left = 0  # loop turns that flush may still wait

    def touch(self, session: Session) -> None:
        """`session` has something to send: transmit it at the end of this loop turn."""
        self._dirty[session] = None
        if self._loop is not None:
            if self._reading:
                return  # _read_and_flush schedules the flush
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)
            else:
                self._touched = True
        elif not self._woken:
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
                if sniffio.current_async_library() == "asyncio":
                    await self._run_callbacks(task_status)
                else:
                    task_status.started()
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._read_loop)
                        await self._drive_loop()
            if self._failure is not None:
                raise self._failure
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
            self._read_batch(anyio.current_time())
            if not self._woken:
                self._woken = True
                self._wake.set()

    def _read_batch(self, now: float) -> None:
        """Take up to BATCH datagrams from the socket and feed them to their connections."""
        sock = self.sock
        connected = self._connected
        on_datagram = self._on_datagram
        for _ in range(BATCH):
            try:
                if connected:
                    data, addr = sock.recv(65536), None
                else:
                    data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._socket_error(exc)
                break
            self.received += 1
            on_datagram(data, addr, now)

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
            self._fire_timers(now)
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

    def _fire_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, session = heapq.heappop(timers)
            if self._timer_at.get(session) != when:
                continue  # rescheduled or forgotten since
            del self._timer_at[session]
            session.timer_fired(now)
            self._dirty[session] = None

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
                self._send_failed(data, exc)
                return

    # -- the asyncio driver: callbacks instead of tasks -----------------------------------

    async def _run_callbacks(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        fd = self.sock.fileno()
        self._loop = loop
        loop.add_reader(fd, self._readable)
        try:
            task_status.started()
            if self._dirty and self._flush_handle is None:  # touched before we ran
                self._flush_handle = loop.call_soon(self._flush)
            await anyio.sleep_forever()  # until aclose() cancels our scope
        finally:
            self._loop = None
            loop.remove_reader(fd)
            if self._unsent:
                loop.remove_writer(fd)
            for handle in (self._flush_handle, self._timer_handle):
                if handle is not None:
                    handle.cancel()
            self._flush_handle = self._timer_handle = None

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a callback's work; an error stops the engine and leaves run() with it, as it
        would leave the task driver."""
        if self._closed:
            return
        try:
            step()
        except Exception as exc:
            self._failure = exc
            self._closed = True
            self._scope.cancel()

    def _readable(self) -> None:
        self._guarded(self._read_and_flush)

    def _read_and_flush(self) -> None:
        self._reading = True
        try:
            self._read_batch(self._loop.time())
        finally:
            self._reading = False
        if self._dirty and self._flush_handle is None:
            self._touched = False
            self._turns_left = RECEIPT_TURNS
            self._flush_handle = self._loop.call_soon(self._flush_after_receipt)

    def _flush_after_receipt(self) -> None:
        """Flush a few loop turns after datagrams came, or at the end of the first turn
        in which the application sends: what the datagrams woke (the channel's reader,
        then the caller it answers) runs first, so the next request and the
        acknowledgements leave in one transmit instead of an empty one first. The
        acknowledgements wait for their ack delay anyway."""
        if self._touched or not self._turns_left:
            self._flush()
        else:
            self._turns_left -= 1
            self._flush_handle = self._loop.call_soon(self._flush_after_receipt)

    def _flush(self) -> None:
        self._flush_handle = None
        self._guarded(self._flush_now)

    def _on_timer(self) -> None:
        self._timer_handle = None
        self._timer_handle_at = math.inf
        self._guarded(self._flush_now)

    def _flush_now(self) -> None:
        """Fire due timers, send what every touched connection has, arm the timer."""
        now = self._loop.time()
        self._fire_timers(now)
        dirty, self._dirty = list(self._dirty), {}  # touched meanwhile: the next flush
        for i, session in enumerate(dirty):
            if self._unsent:  # the socket is full: the rest waits for _writable
                self._dirty.update(dict.fromkeys(dirty[i:]))
                break
            for data, addr in session.transmit(now):
                self._send_now(data, addr)
            if session.finished:
                self.forget(session)
            else:
                self._schedule(session)
        if self._dirty and self._flush_handle is None and not self._unsent:
            self._flush_handle = self._loop.call_soon(self._flush)
        self._arm_timer()

    def _arm_timer(self) -> None:
        timers = self._timers
        timer_at = self._timer_at
        while timers and timer_at.get(timers[0][2]) != timers[0][0]:
            heapq.heappop(timers)  # rescheduled or forgotten since
        if not timers:
            return
        when = timers[0][0]
        if when != self._timer_handle_at:
            if self._timer_handle is not None:
                self._timer_handle.cancel()
            self._timer_handle = self._loop.call_at(when, self._on_timer)
            self._timer_handle_at = when

    def _send_now(self, data: bytes, addr: Address) -> None:
        if self._unsent:  # behind others waiting for the socket: keep the order
            self._unsent.append((data, addr))
            return
        try:
            if self._connected:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
            self.sent += 1
        except (BlockingIOError, InterruptedError):
            self._unsent.append((data, addr))
            self._loop.add_writer(self.sock.fileno(), self._writable)
        except OSError as exc:
            self._send_failed(data, exc)

    def _writable(self) -> None:
        self._guarded(self._send_unsent)

    def _send_unsent(self) -> None:
        unsent = self._unsent
        sock = self.sock
        sent = 0
        for data, addr in unsent:
            try:
                if self._connected:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
                self.sent += 1
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._send_failed(data, exc)
            sent += 1
        del unsent[:sent]
        if not unsent:
            self._loop.remove_writer(sock.fileno())
            if self._dirty:
                self._flush_now()

    def _send_failed(self, data: bytes, exc: OSError) -> None:
        if exc.errno in (errno.EMSGSIZE,):
            log.warning("udp datagram of %d bytes too big for the path: %s", len(data), exc)
        else:
            self._socket_error(exc)
