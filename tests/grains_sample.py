"""Grains used by the tests (also importable by `forkcore serve` as module
`grains_sample` when tests/ is on the path)."""

from __future__ import annotations

import decimal
import uuid
from typing import Any

import anyio
import anyio.lowlevel
import attrs

import forkcore


@forkcore.wire_type(name="tests.Point")
@attrs.frozen
class Point:
    x: int
    y: int


class ICounter(forkcore.GrainInterface, name="test.counter"):
    async def add(self, amount: int) -> int: ...
    async def get(self) -> int: ...
    async def key_of(self) -> Any: ...
    async def echo(self, value: Any) -> Any: ...
    async def fail(self, message: str) -> None: ...
    async def odd(self, kind: str) -> Any: ...
    async def sleep(self, seconds: float) -> str: ...
    @forkcore.rpc(timeout=0.5)
    async def slow(self, seconds: float) -> str: ...
    @forkcore.rpc(one_way=True)
    async def bump(self, amount: int) -> None: ...


class Counter(forkcore.Grain, ICounter):
    activations = 0
    deactivations = 0

    def __init__(self) -> None:
        self.total = 0
        self.activated = False

    async def on_activate(self) -> None:
        type(self).activations += 1
        self.activated = True

    async def on_deactivate(self) -> None:
        type(self).deactivations += 1

    async def add(self, amount: int) -> int:
        current = self.total
        await anyio.lowlevel.checkpoint()
        self.total = current + amount
        return self.total

    async def get(self) -> int:
        return self.total

    async def key_of(self) -> Any:
        return self.key

    async def echo(self, value: Any) -> Any:
        return value

    async def fail(self, message: str) -> None:
        raise ValueError(message)

    async def odd(self, kind: str) -> Any:
        """Results and errors that are awkward to send back (made here, since the
        client would refuse to send them)."""
        if kind == "bad error":
            raise ValueError("cannot be encoded: \udc80")
        return {"empty tuple": (), "empty set": set(), "zero decimal": decimal.Decimal(0),
                "empty frozenset": frozenset(), "nested tuple": [()]}[kind]

    async def sleep(self, seconds: float) -> str:
        await anyio.sleep(seconds)
        return "slept"

    async def slow(self, seconds: float) -> str:
        await anyio.sleep(seconds)
        return "slept"

    async def bump(self, amount: int) -> None:
        self.total += amount


def new_uuid() -> uuid.UUID:
    return uuid.uuid4()


class IGate(forkcore.GrainInterface, name="test.gate"):
    @forkcore.rpc(timeout=0.5)
    async def wait_open(self) -> str: ...
    async def open(self) -> None: ...


class Gate(forkcore.Grain, IGate):
    """Turn-based: `open` queues behind `wait_open`, which therefore times out."""

    def __init__(self) -> None:
        self.opened = anyio.Event()

    async def wait_open(self) -> str:
        await self.opened.wait()
        return "opened"

    async def open(self) -> None:
        self.opened.set()


class IMethodReentrantGate(IGate, name="test.gate.method"):
    pass


class MethodReentrantGate(Gate, IMethodReentrantGate):
    """`wait_open` is reentrant, so it does not hold the turn and `open` can run."""

    @forkcore.reentrant
    async def wait_open(self) -> str:
        return await super().wait_open()


class IClassReentrantGate(IGate, name="test.gate.class"):
    pass


@forkcore.reentrant
class ClassReentrantGate(Gate, IClassReentrantGate):
    """Every call interleaves."""


class IWhere(forkcore.GrainInterface, name="test.where"):
    async def where(self) -> str: ...
    async def sleep_where(self, seconds: float) -> str: ...
    @forkcore.rpc(idempotent=True)
    async def sleep_where_idempotent(self, seconds: float) -> str: ...


class Where(forkcore.Grain, IWhere):
    """Says which server it runs on: `located(id)` makes a subclass per server for
    in-process clusters; under `forkcore serve` it reads $FORKCORE_TEST_SERVER_ID."""

    server_id = "?"

    async def where(self) -> str:
        return self.server_id

    async def sleep_where(self, seconds: float) -> str:
        await anyio.sleep(seconds)
        return self.server_id

    async def sleep_where_idempotent(self, seconds: float) -> str:
        return await self.sleep_where(seconds)


def located(server_id: str) -> type[Where]:
    return type(f"Where_{server_id}", (Where,), {"server_id": server_id})
