"""A grain for tests that move a lot of bytes: echo a payload, or make a large answer."""

from __future__ import annotations

import forkcore


class IBulk(forkcore.GrainInterface, name="test.bulk"):
    async def echo(self, payload: bytes) -> bytes: ...
    async def blob(self, size: int) -> bytes: ...
    async def add(self, amount: int) -> int: ...


class Bulk(forkcore.Grain, IBulk):
    def __init__(self) -> None:
        self.total = 0

    async def echo(self, payload: bytes) -> bytes:
        return payload

    async def blob(self, size: int) -> bytes:
        return bytes(size)

    async def add(self, amount: int) -> int:
        self.total += amount
        return self.total
