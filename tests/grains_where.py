"""For `forkcore serve` processes: a `test.where` grain that reports the server id
given in $FORKCORE_TEST_SERVER_ID, and versioned interfaces chosen by $FORKCORE_TEST_VERSION."""

from __future__ import annotations

import os

import anyio
from grains_sample import Where

import forkcore


class ServedWhere(Where):
    server_id = os.environ.get("FORKCORE_TEST_SERVER_ID", "?")


_VERSION = int(os.environ.get("FORKCORE_TEST_VERSION", "1"))


class IVersioned(forkcore.GrainInterface, name="test.versioned", version=_VERSION):
    async def version(self) -> int: ...


class Versioned(forkcore.Grain, IVersioned):
    async def version(self) -> int:
        return _VERSION


class IRecorder(forkcore.GrainInterface, name="test.recorder"):
    """Appends "<server id> <tag>" to $FORKCORE_TEST_LOG when a call starts running."""

    async def record(self, tag: str, seconds: float) -> str: ...
    @forkcore.rpc(idempotent=True)
    async def record_idempotent(self, tag: str, seconds: float) -> str: ...


class Recorder(forkcore.Grain, IRecorder):
    async def record(self, tag: str, seconds: float) -> str:
        log = anyio.Path(os.environ["FORKCORE_TEST_LOG"])
        async with await log.open("a", encoding="utf-8") as f:
            await f.write(f"{ServedWhere.server_id} {tag}\n")
        await anyio.sleep(seconds)
        return ServedWhere.server_id

    async def record_idempotent(self, tag: str, seconds: float) -> str:
        return await self.record(tag, seconds)
