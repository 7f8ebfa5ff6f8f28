"""Interceptors: code around every call, on the client (outgoing) or the server
(incoming, before the grain runs).

An interceptor is an object with `async def intercept(self, call, proceed)`: it looks
at (or changes) the `CallInfo`, awaits `proceed()` to go on to the next interceptor and
finally the call itself, and returns what `proceed()` returned, another value, or
raises. They are enabled by name and run in the order given (`[client] interceptors`,
`[server] interceptors`, options in `interceptor_options.NAME`). With none configured,
a call pays nothing for them.

On a server, an exception an interceptor raises reaches the caller as the same type
when it is a `forkcore.errors` type, else as `RemoteError`; what the grain raises
reaches it as `RemoteError`, with or without interceptors (docs/plugins.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import attrs

from .grains import GrainId
from .security import Identity

Proceed = Callable[[], Awaitable[Any]]


@attrs.define(slots=True, eq=False)
class CallInfo:
    """One call as interceptors see it. On the client `context` is writable: what it
    holds when the last interceptor proceeds is what the call carries."""

    side: Literal["client", "server"]
    grain_id: GrainId
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    context: dict[str, Any]
    caller: Identity | None = None


async def run_chain(interceptors: Sequence[Any], call: CallInfo, last: Proceed) -> Any:
    """Run `call` through `interceptors` in order, then `last`."""
    count = len(interceptors)

    def proceed_from(index: int) -> Proceed:
        if index == count:
            return last

        async def proceed() -> Any:
            return await interceptors[index].intercept(call, proceed_from(index + 1))
        return proceed

    return await proceed_from(0)()


__all__ = ["CallInfo", "Proceed", "run_chain"]
