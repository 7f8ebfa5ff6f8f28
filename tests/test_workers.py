"""The server's worker pool: grows when every worker is busy, reuses idle workers, and
`trim()` lets the surplus go."""

from __future__ import annotations

import anyio
import pytest

from forkcore.server.workers import WorkerPool

pytestmark = pytest.mark.anyio


async def test_pool_grows_reuses_and_trims() -> None:
    release = anyio.Event()
    done: list[int] = []

    async def job(n: int) -> None:
        await release.wait()
        done.append(n)

    async def quick(n: int) -> None:
        done.append(n)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            pool = WorkerPool(tg, keep=2)
            for n in range(10):
                pool.submit(job, n)
            assert pool.workers == 10  # every worker was busy: one more each time
            release.set()
            while len(done) < 10:
                await anyio.sleep(0.01)
            await anyio.sleep(0.01)
            for n in range(10, 20):
                pool.submit(quick, n)  # idle workers take these: no new worker
                await anyio.sleep(0)
            while len(done) < 20:
                await anyio.sleep(0.01)
            assert pool.workers == 10
            assert pool.trim() == 8
            while pool.workers > 2:
                await anyio.sleep(0.01)
            assert pool.trim() == 0
            pool.submit(quick, 20)
            while len(done) < 21:
                await anyio.sleep(0.01)
            assert pool.workers == 2
            pool.close()
    assert sorted(done) == list(range(21))


async def test_a_failing_job_does_not_kill_its_worker(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    async def bad() -> None:
        raise RuntimeError("boom")

    async def good() -> None:
        ran.append("good")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            pool = WorkerPool(tg, keep=1)
            pool.submit(bad)
            await anyio.sleep(0.01)
            pool.submit(good)
            while not ran:
                await anyio.sleep(0.01)
            assert pool.workers == 1
            pool.close()
    assert "a server job failed" in caplog.text
