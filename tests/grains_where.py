"""For `forkcore serve` processes: a `test.where` grain that reports the server id
given in $FORKCORE_TEST_SERVER_ID, and versioned interfaces chosen by $FORKCORE_TEST_VERSION."""

from __future__ import annotations

import os

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
