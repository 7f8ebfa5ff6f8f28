"""The activation catalog: one activation per grain id, turn-based execution, idle collection.

Calls to one activation wait in its mailbox and run one at a time in arrival order; a
task runs an activation only while its mailbox is non-empty, so an idle activation costs
a small object, not a task. Reentrant methods start at once instead of queueing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc

from ..grains import Grain, GrainId, InterfaceSpec, Key, is_reentrant
from ..security import ANONYMOUS, Identity, reset_caller, set_caller
from .workers import WorkerPool

log = logging.getLogger("forkcore.server.catalog")

# reply(ok, value): ok=True → value is the result; ok=False → value is (kind, type, message)
Reply = Callable[[bool, Any], None]


class Call:
    """One call waiting for or running on an activation. `reply` is None for a one-way
    call; `done`, if given, is called once the call has left the catalog (run, failed or
    cancelled)."""

    __slots__ = ("args", "caller", "cancelled", "deadline", "done", "kwargs", "method",
                 "reply", "scope")

    def __init__(self, method: str, args: list[Any], kwargs: dict[str, Any], deadline: float,
                 reply: Reply | None, caller: Identity = ANONYMOUS,
                 done: Callable[[], None] | None = None) -> None:
        self.caller = caller
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.deadline = deadline
        self.reply = reply
        self.done = done
        self.cancelled = False
        self.scope: anyio.CancelScope | None = None

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
                 task_group: anyio.abc.TaskGroup, max_activations: int = 1_000_000) -> None:
        self.hosted = hosted
        self._tg = task_group
        self._workers = WorkerPool(task_group)
        # fixed per (interface, method): looked up once here, not on every call
        self._reentrant = {(name, method): is_reentrant(cls, method)
                           for name, (spec, cls) in hosted.items() for method in spec.methods}
        self.max_activations = max_activations
        # least recently used first, so making room is O(1) in the common case
        self.activations: OrderedDict[GrainId, Activation] = OrderedDict()
        self.running_calls = 0
        self.calls_total = 0
        self._calls_done = anyio.Event()
        self._calls_done.set()

    # -- submitting -----------------------------------------------------------------------

    def submit(self, interface: str, key: Key, call: Call) -> None:
        """Queue `call` on the activation of (interface, key), creating it if needed.

        The interface and method must already be checked against `hosted`."""
        grain_id = GrainId(interface, key)
        act = self.activations.get(grain_id)
        if act is None:
            if len(self.activations) >= self.max_activations:
                self._make_room()
            act = self._create(grain_id)
        else:
            self.activations.move_to_end(grain_id)
        act.last_used = anyio.current_time()
        self._started()
        if self._reentrant[(interface, call.method)]:
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
        act = Activation(grain, grain_id, anyio.current_time())
        self.activations[grain_id] = act
        return act

    def _make_room(self) -> None:
        """Drop the least recently used idle activation (deactivated in the background)."""
        for act in self.activations.values():
            if act.idle:
                del self.activations[act.grain_id]
                self._workers.submit(self._deactivate, act)
                return
        log.warning("all %d activations are busy; exceeding max_activations",
                    len(self.activations))

    def _started(self) -> None:
        self.calls_total += 1
        if self.running_calls == 0:
            self._calls_done = anyio.Event()
        self.running_calls += 1

    def _finished(self) -> None:
        self.running_calls -= 1
        if self.running_calls == 0:
            self._calls_done.set()

    async def wait_idle(self) -> None:
        """Return once no call is queued or running."""
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
            if self.activations.get(act.grain_id) is act:
                del self.activations[act.grain_id]
            return exc
        finally:
            act.ready.set()
        act.active = True
        return None

    async def _drain(self, act: Activation) -> None:
        try:
            error = await self._activate(act)
            while act.mailbox:
                call = act.mailbox.popleft()
                if error is not None:
                    self._fail_activation(call, error)
                    continue
                await self._run(act, call)
        finally:
            act.busy = False
            if not act.mailbox:
                act.mailbox = None
            act.last_used = anyio.current_time()

    async def _run_reentrant(self, act: Activation, call: Call) -> None:
        try:
            error = await self._activate(act)
            if error is not None:
                self._fail_activation(call, error)
            else:
                await self._run(act, call)
        finally:
            act.reentrant_running -= 1
            act.last_used = anyio.current_time()

    def _fail_activation(self, call: Call, error: BaseException) -> None:
        try:
            if call.reply is not None:
                call.reply(False, ("remote", type(error).__name__,
                                   f"on_activate failed: {error}"))
        finally:
            self._finished()
            if call.done is not None:
                call.done()

    async def _run(self, act: Activation, call: Call) -> None:
        try:
            if call.cancelled:
                return
            if call.deadline <= anyio.current_time():
                if call.reply is not None:
                    call.reply(False, ("timeout", "RequestTimeout",
                                       "the call's deadline passed while it waited in the "
                                       "grain's queue"))
                return
            token = set_caller(call.caller)  # forkcore.current_caller() in grain code
            try:
                await self._invoke(act, call)
            finally:
                reset_caller(token)
        finally:
            call.scope = None
            act.last_used = anyio.current_time()
            self._finished()
            if call.done is not None:
                call.done()

    async def _invoke(self, act: Activation, call: Call) -> None:
        """Run the grain method within the caller's deadline and reply."""
        method = getattr(act.grain, call.method)
        with anyio.CancelScope(deadline=call.deadline) as scope:
            call.scope = scope
            try:
                result = await method(*call.args, **call.kwargs)
            except Exception as exc:
                if call.reply is not None:
                    call.reply(False, ("remote", type(exc).__name__, str(exc)))
                else:
                    log.warning("one-way call %s.%s failed: %s: %s", act.grain_id,
                                call.method, type(exc).__name__, exc)
                return
            if call.reply is not None:
                call.reply(True, result)
            return
        if call.reply is not None and not call.cancelled:
            call.reply(False, ("timeout", "RequestTimeout",
                               f"the grain did not finish {call.method} before the "
                               "caller's deadline; the work was cancelled"))

    # -- collection -----------------------------------------------------------------------

    async def collect_idle(self, idle_timeout: float) -> int:
        """Deactivate activations idle for longer than `idle_timeout`; how many."""
        self._workers.trim()
        cutoff = anyio.current_time() - idle_timeout
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

    async def _deactivate(self, act: Activation) -> None:
        if self.activations.get(act.grain_id) is act:
            del self.activations[act.grain_id]
        if not act.active:
            return
        act.active = False
        try:
            with anyio.fail_after(30.0):
                await act.grain.on_deactivate()
        except Exception as exc:
            log.warning("on_deactivate of %s failed: %s: %s", act.grain_id, type(exc).__name__,
                        exc)
