"""The activation catalog: one activation per grain id, turn-based execution, idle collection.

Calls to one activation wait in its mailbox and run one at a time in arrival order; a
task runs an activation only while its mailbox is non-empty, so an idle activation costs
a small object, not a task. Reentrant methods start at once instead of queueing.

Deadlines are `time.clock()` values. The calls an activation runs back to back share
one cancel scope (entering a scope costs more than a small call), and one watcher task
per catalog cancels the scope of a call that outlives its deadline.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
from anyio.lowlevel import checkpoint

from ..clock import now as clock
from ..context import enter_served, leave_served
from ..errors import ForkcoreError, MethodNotFound, RemoteError, Unauthorized
from ..grains import Grain, GrainId, InterfaceSpec, Key
from ..interceptors import CallInfo, run_chain
from ..protocol.messages import FailureKind
from ..security import ANONYMOUS, Identity, reset_caller, set_caller
from .reports import Reports, traceback_text
from .workers import WorkerPool

log = logging.getLogger("forkcore.server.catalog")

# reply(ok, value): ok=True → value is the result; ok=False → value is
# (FailureKind, type name, message)
Reply = Callable[[bool, Any], None]

# the watcher looks for new running calls at least this often (seconds): a call whose
# timeout is shorter than this may be cancelled up to this much after its deadline
WATCH_TICK = 0.1

# a run of calls that never wait lets other tasks in after this many calls
YIELD_EVERY = 16


_HASH_MODULUS = sys.hash_info.modulus  # Python hashes integers modulo this prime


def activation_slot(interface: str, key: Key) -> tuple[Any, ...]:
    """The activation table's key for a grain. String and bytes hashes are randomized per
    process; integer and UUID hashes are not, so a client could choose keys that all
    share one hash and make every lookup slow. Those are keyed by their bytes instead."""
    t = type(key)
    if t is str or t is bytes:
        return (interface, key)
    if t is int:
        assert isinstance(key, int)
        if -_HASH_MODULUS < key < _HASH_MODULUS:
            # distinct integers below the modulus have distinct hashes (but -1 and -2):
            # nothing to collide
            return (interface, key)
        return (interface, "int", key.to_bytes((key.bit_length() + 8) // 8, "big",
                                               signed=True))
    return (interface, "uuid", key.bytes)  # type: ignore[union-attr]


class InterceptorError(Exception):
    """A `forkcore.errors` exception an interceptor raised: the caller gets its type."""

    def __init__(self, error: ForkcoreError) -> None:
        super().__init__(str(error))
        self.error = error


def failure_of(exc: BaseException, debug: bool = False
               ) -> tuple[FailureKind, str, str, str | None]:
    """(failure kind, type name, message, remote traceback) of an exception that ended a
    call; the traceback only with `debug` (it can show the server's internals)."""
    trace = traceback_text(exc) if debug else None
    if type(exc) is InterceptorError:
        error = exc.error
        if isinstance(error, RemoteError):
            return (FailureKind.REMOTE, error.type_name, error.message, trace)
        # (a RequestTimeout of an interceptor's goes as `error`: the caller must not take
        # it for the server being slow, which counts towards ejecting it)
        kind = (FailureKind.UNAUTHORIZED if isinstance(error, Unauthorized) else
                FailureKind.NOT_FOUND if isinstance(error, MethodNotFound) else
                FailureKind.ERROR)
        return (kind, type(error).__name__, str(error), trace)
    return (FailureKind.REMOTE, type(exc).__name__, str(exc), trace)


class Call:
    """One call waiting for or running on an activation. `reply` is None for a one-way
    call; `done`, if given, is called once the call has left the catalog (run, failed or
    cancelled)."""

    __slots__ = ("args", "caller", "cancelled", "context", "deadline", "done", "expired",
                 "kwargs", "method", "reply", "scope")

    def __init__(self, method: str, args: list[Any], kwargs: dict[str, Any], deadline: float,
                 reply: Reply | None, caller: Identity = ANONYMOUS,
                 done: Callable[[], None] | None = None,
                 context: dict[str, Any] | None = None) -> None:
        self.caller = caller
        self.context = context  # the call context entries it carries (None: none)
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.deadline = deadline
        self.reply = reply  # set to None once the call has answered
        self.done = done
        self.cancelled = False  # the caller gave up (or left): no answer is wanted
        self.expired = False  # its deadline passed while it ran
        self.scope: anyio.CancelScope | None = None  # while it runs

    def cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class Activation:
    __slots__ = ("active", "busy", "grain", "grain_id", "last_used", "mailbox", "ready",
                 "reentrant_running")

    def __init__(self, grain: Grain, grain_id: GrainId, now: float) -> None:
        self.grain = grain
        self.grain_id = grain_id
        # created when a call queues, dropped when drained: an idle activation holds none
        self.mailbox: deque[Call] | None = None
        self.busy = False  # a task is draining the mailbox
        self.active = False  # on_activate has completed
        self.ready: anyio.Event | None = None  # set once on_activate has finished (or failed)
        self.reentrant_running = 0
        self.last_used = now

    @property
    def idle(self) -> bool:
        return not self.busy and not self.mailbox and not self.reentrant_running


class Catalog:
    """Activations of the grains one server hosts, and the tasks that run their calls."""

    def __init__(self, hosted: Mapping[str, tuple[InterfaceSpec, type[Grain]]],
                 task_group: anyio.abc.TaskGroup, max_activations: int = 1_000_000,
                 interceptors: Sequence[Any] = (), debug: bool = False) -> None:
        self.hosted = hosted
        self.debug = debug  # failures carry the remote traceback (it can leak internals)
        self.reports = Reports()
        self.interceptors = list(interceptors)
        self._tg = task_group
        self._workers = WorkerPool(task_group)
        # fixed per (interface, method): looked up once here, not on every call
        self.max_activations = max_activations
        # slot(interface, key) → activation, least recently used first, so making room
        # is O(1) in the common case. Keyed by a plain tuple: hashing a GrainId (attrs)
        # costs more than the rest of the lookup.
        self.activations: OrderedDict[tuple[Any, ...], Activation] = OrderedDict()
        self.running_calls = 0
        self.calls_total = 0
        self._calls_done: anyio.Event | None = None  # made by wait_idle, set when idle
        # calls running now that have a deadline, and the scope that cancels each
        self._running: dict[Call, anyio.CancelScope] = {}
        self._watch_wake = anyio.Event()
        task_group.start_soon(self._watch_deadlines)

    # -- submitting -----------------------------------------------------------------------

    def submit(self, interface: str, key: Key, call: Call, reentrant: bool) -> None:
        """Queue `call` on the activation of (interface, key), creating it if needed, or
        start it at once if its method is `reentrant`.

        The interface and method must already be checked against `hosted`."""
        slot = activation_slot(interface, key)
        activations = self.activations
        act = activations.get(slot)
        if act is None:
            if len(activations) >= self.max_activations:
                self._make_room()
            act = self._create(GrainId(interface, key))
        else:
            activations.move_to_end(slot)
        act.last_used = clock()
        self.calls_total += 1
        self.running_calls += 1
        if reentrant:
            act.reentrant_running += 1
            self._workers.submit(self._run_reentrant, act, call)
            return
        if act.mailbox is None:
            act.mailbox = deque()
        act.mailbox.append(call)
        if not act.busy:
            act.busy = True
            self._workers.submit(self._drain, act)

    def _create(self, grain_id: GrainId) -> Activation:
        _spec, cls = self.hosted[grain_id.interface]
        grain = cls.__new__(cls)
        grain.grain_id = grain_id
        grain.key = grain_id.key
        grain.__init__()  # type: ignore[misc]
        act = Activation(grain, grain_id, clock())
        self.activations[activation_slot(grain_id.interface, grain_id.key)] = act
        return act

    def _make_room(self) -> None:
        """Drop the least recently used idle activation (deactivated in the background)."""
        for act in self.activations.values():
            if act.idle:
                self._forget(act)
                self._workers.submit(self._deactivate, act)
                return
        log.warning("all %d activations are busy; exceeding max_activations",
                    len(self.activations))

    def _finished(self) -> None:
        self.running_calls -= 1
        if self.running_calls == 0 and self._calls_done is not None:
            self._calls_done.set()

    async def wait_idle(self) -> None:
        """Return once no call is queued or running."""
        while self.running_calls:
            self._calls_done = anyio.Event()
            await self._calls_done.wait()

    # -- running --------------------------------------------------------------------------

    async def _activate(self, act: Activation) -> BaseException | None:
        """Run on_activate once; the error if it failed (the activation is then dropped)."""
        if act.active:
            return None
        if act.ready is not None:
            await act.ready.wait()
            return None if act.active else RuntimeError("activation failed")
        act.ready = anyio.Event()
        try:
            await act.grain.on_activate()
        except Exception as exc:
            log.warning("on_activate of %s failed: %s: %s", act.grain_id, type(exc).__name__, exc)
            self._forget(act)
            return exc
        finally:
            act.ready.set()
        act.active = True
        return None

    async def _drain(self, act: Activation) -> None:
        try:
            error = await self._activate(act)
            assert act.mailbox is not None
            await self._run_calls(act, act.mailbox, error)
        finally:
            act.busy = False
            if not act.mailbox:
                act.mailbox = None
            act.last_used = clock()

    async def _run_reentrant(self, act: Activation, call: Call) -> None:
        try:
            error = await self._activate(act)
            await self._run_calls(act, deque((call,)), error)
        finally:
            act.reentrant_running -= 1
            act.last_used = clock()

    async def _run_calls(self, act: Activation, calls: deque[Call],
                         error: BaseException | None) -> None:
        """Run `calls` one after another until none is left (more may arrive meanwhile)
        and answer each. They share one cancel scope until one is cancelled (by the
        deadline watcher or a Cancel), then the rest go on in a fresh one."""
        running = self._running
        first_token = None
        caller = None
        context: dict[str, Any] | None = None
        first_context_token = None
        intercepted = bool(self.interceptors)
        try:
            while calls:
                if error is not None:
                    self._fail_activation(calls.popleft(), error)
                    continue
                with anyio.CancelScope() as scope:
                    ran = 0
                    while calls and not scope.cancel_called:
                        if ran == YIELD_EVERY:
                            # let the writer send what is answered so far (the caller
                            # works on it while we go on) and let other tasks run
                            ran = 0
                            await checkpoint()
                            continue
                        ran += 1
                        call = calls.popleft()
                        try:
                            if call.cancelled:
                                continue
                            deadline = call.deadline
                            if deadline <= clock():
                                if call.reply is not None:
                                    self.reports.timed_out(act.grain_id, call.method,
                                                           "it waited in the grain's queue "
                                                           "past its deadline")
                                    call.reply(False, (
                                        FailureKind.TIMEOUT, "RequestTimeout",
                                        "the call's deadline passed while it waited in the "
                                        "grain's queue"))
                                continue
                            if call.caller is not caller:
                                caller = call.caller  # forkcore.current_caller()
                                token = set_caller(caller)
                                first_token = first_token or token
                            if call.context is not context:
                                context = call.context  # forkcore.current_context()
                                token = enter_served(context)
                                first_context_token = first_context_token or token
                            timed = deadline != math.inf
                            if timed:
                                if not running:
                                    self._watch_wake.set()
                                running[call] = scope
                            call.scope = scope
                            try:
                                if intercepted:
                                    result = await self._intercepted(act, call)
                                else:
                                    result = await getattr(act.grain, call.method)(
                                        *call.args, **call.kwargs)
                            except Exception as exc:
                                reply, call.reply = call.reply, None
                                if type(exc) is not InterceptorError:
                                    self.reports.raised(act.grain_id, call.method, exc,
                                                        reply is None)
                                if reply is not None:
                                    reply(False, failure_of(exc, self.debug))
                                continue
                            finally:
                                call.scope = None
                                if timed:
                                    running.pop(call, None)
                            reply, call.reply = call.reply, None
                            if reply is not None:
                                reply(True, result)
                        except Exception:
                            # answering failed (a bug of ours): the calls behind it go on
                            log.exception("answering %s.%s failed", act.grain_id,
                                          call.method)
                        finally:
                            self._finished()
                            if call.done is not None:
                                call.done()
                self._answer_expired(act, call)
        finally:
            if first_context_token is not None:
                leave_served(first_context_token)
            if first_token is not None:
                reset_caller(first_token)

    async def _intercepted(self, act: Activation, call: Call) -> Any:
        """Run `call` through the server's interceptors, then the grain. What the grain
        raises goes on as it is (the caller gets RemoteError); a `forkcore.errors`
        exception of an interceptor's own is marked to reach the caller as its type."""
        info = CallInfo("server", act.grain_id, call.method, call.args, call.kwargs,
                        dict(call.context) if call.context else {}, call.caller)
        from_grain: list[BaseException] = []

        async def run_grain() -> Any:
            try:
                return await getattr(act.grain, call.method)(*info.args, **info.kwargs)
            except Exception as exc:
                from_grain.append(exc)
                raise

        try:
            return await run_chain(self.interceptors, info, run_grain)
        except ForkcoreError as exc:
            if exc in from_grain:
                raise
            raise InterceptorError(exc) from exc

    def _answer_expired(self, act: Activation, call: Call) -> None:
        """Answer a call whose work the watcher cancelled at its deadline (and report a
        call its caller cancelled)."""
        if call.cancelled and call.scope is None and not call.expired:
            if call.reply is not None:
                call.reply = None
                self.reports.cancelled(act.grain_id, call.method)
            return
        if call.expired and not call.cancelled and call.reply is not None:
            self.reports.timed_out(act.grain_id, call.method,
                                   "the grain did not finish before the caller's deadline; "
                                   "its work was cancelled")
            reply, call.reply = call.reply, None
            try:
                reply(False, (FailureKind.TIMEOUT, "RequestTimeout",
                              f"the grain did not finish {call.method} before the "
                              "caller's deadline; the work was cancelled"))
            except Exception:
                log.exception("answering %s after its deadline failed", call.method)

    async def _watch_deadlines(self) -> None:
        """Cancel the work of calls that outlive their deadline. Sleeps while no call
        with a deadline runs; otherwise wakes at the earliest deadline, or after
        `WATCH_TICK` to see calls that started since. Woken by a call that starts while
        it sleeps, it first waits a tick: most calls are over by then, and waking for
        each one would cost a task switch per call."""
        running = self._running
        while True:
            if not running:
                self._watch_wake = anyio.Event()
                await self._watch_wake.wait()
                await anyio.sleep(WATCH_TICK)
                continue
            now = clock()
            earliest = math.inf
            for call, scope in list(running.items()):
                if call.deadline <= now:
                    del running[call]
                    call.expired = True
                    scope.cancel()
                elif call.deadline < earliest:
                    earliest = call.deadline
            await anyio.sleep(min(earliest - now, WATCH_TICK))

    def _fail_activation(self, call: Call, error: BaseException) -> None:
        try:
            if call.reply is not None:
                call.reply(False, (FailureKind.REMOTE, type(error).__name__,
                                   f"on_activate failed: {error}"))
        except Exception:
            log.exception("answering %s after a failed activation failed", call.method)
        finally:
            self._finished()
            if call.done is not None:
                call.done()

    # -- collection -----------------------------------------------------------------------

    async def collect_idle(self, idle_timeout: float) -> int:
        """Deactivate activations idle for longer than `idle_timeout`; how many."""
        self._workers.trim()
        cutoff = clock() - idle_timeout
        victims = [a for a in self.activations.values() if a.idle and a.last_used <= cutoff]
        for act in victims:
            await self._deactivate(act)
        return len(victims)

    async def deactivate_all(self, timeout: float) -> None:
        """Deactivate every activation, giving them `timeout` seconds in all."""
        with anyio.move_on_after(timeout):
            for act in list(self.activations.values()):
                await self._deactivate(act)
        if self.activations:
            log.warning("%d activations were not deactivated within %gs",
                        len(self.activations), timeout)

    def _forget(self, act: Activation) -> None:
        slot = activation_slot(act.grain_id.interface, act.grain_id.key)
        if self.activations.get(slot) is act:
            del self.activations[slot]

    async def _deactivate(self, act: Activation) -> None:
        self._forget(act)
        if not act.active:
            return
        act.active = False
        try:
            with anyio.fail_after(30.0):
                await act.grain.on_deactivate()
        except Exception as exc:
            log.warning("on_deactivate of %s failed: %s: %s", act.grain_id, type(exc).__name__,
                        exc)
