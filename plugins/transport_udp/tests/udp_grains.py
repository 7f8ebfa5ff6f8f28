"""Grains for the udp transport's tests."""

from __future__ import annotations

from typing import Any

import anyio

import forkcore


class IGame(forkcore.GrainInterface, name="udptest.game"):
    async def add(self, amount: int) -> int: ...
    async def echo(self, value: Any) -> Any: ...
    async def blob(self, size: int) -> bytes: ...
    async def log(self) -> dict[str, list[int]]: ...
    async def sleep(self, seconds: float) -> str: ...
    @forkcore.rpc(delivery="sequenced")
    async def position(self, seq: int) -> None: ...
    @forkcore.rpc(delivery="sequenced")
    async def heading(self, seq: int) -> None: ...
    @forkcore.rpc(delivery="unreliable")
    async def note(self, n: int, padding: bytes = b"") -> None: ...
    @forkcore.rpc(delivery="reliable_unordered", one_way=True)
    async def event(self, n: int) -> None: ...


class Game(forkcore.Grain, IGame):
    def __init__(self) -> None:
        self.total = 0
        self.seen: dict[str, list[int]] = {"position": [], "heading": [], "note": [],
                                           "event": []}

    async def add(self, amount: int) -> int:
        self.total += amount
        return self.total

    async def echo(self, value: Any) -> Any:
        return value

    async def blob(self, size: int) -> bytes:
        return bytes(size)

    async def log(self) -> dict[str, list[int]]:
        return self.seen

    async def sleep(self, seconds: float) -> str:
        await anyio.sleep(seconds)
        return "slept"

    async def position(self, seq: int) -> None:
        self.seen["position"].append(seq)

    async def heading(self, seq: int) -> None:
        self.seen["heading"].append(seq)

    async def note(self, n: int, padding: bytes = b"") -> None:
        self.seen["note"].append(n)

    async def event(self, n: int) -> None:
        self.seen["event"].append(n)
