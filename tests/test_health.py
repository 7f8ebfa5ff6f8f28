"""Passive health (ejection), RTT, single-mode failover and state logging, in-process."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from grains_sample import IWhere
from test_multi import hosts, wait_until

import forkcore
from forkcore.client.health import RetryBudget, peak_ewma
from forkcore.errors import ConnectError, RequestTimeout

pytestmark = pytest.mark.anyio


def test_peak_ewma_takes_peaks_at_once_and_decays_slowly() -> None:
    assert peak_ewma(None, 0.010, 0) == 0.010
    assert peak_ewma(0.010, 0.050, 0.1) == 0.050  # a slower sample wins at once
    decayed = peak_ewma(0.050, 0.010, 1.0)
    assert 0.010 < decayed < 0.050
    assert peak_ewma(0.050, 0.010, 100.0) == pytest.approx(0.010, abs=1e-6)


def test_retry_budget_is_a_token_bucket() -> None:
    budget = RetryBudget(capacity=2, refill_per_success=0.1)
    assert budget.take() and budget.take() and not budget.take()
    for _ in range(10):
        budget.success()
    assert budget.take() and not budget.take()


async def test_consecutive_failures_eject_then_readmit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "forkcore")
    async with hosts("memory") as h:
        eps = [await h.start(f"s{i}") for i in range(3)]
        health = {"eject_after": 2, "ejection_time": 1.5, "max_ejected_share": 0.34}
        async with forkcore.Client(mode="multi", servers=eps, transport="memory",
                                   strategy="consistent_hash", request_timeout=0.1,
                                   health=health) as client:
            views = {v.id: v for v in client.servers}
            key = next(k for k in range(1000) if client.route(IWhere, k) == "s1")
            grain = client.get_grain(IWhere, key, server="s1", affinity="required")
            for _ in range(2):
                with pytest.raises(RequestTimeout):
                    await grain.sleep_where(1.0)
            assert views["s1"].state == "ejected" and not views["s1"].healthy
            assert client.route(IWhere, key) != "s1"
            # never more than a bounded share: a second server is not ejected
            other = next(k for k in range(1000) if client.route(IWhere, k) == "s2")
            grain2 = client.get_grain(IWhere, other, server="s2", affinity="required")
            for _ in range(3):
                with pytest.raises(RequestTimeout):
                    await grain2.sleep_where(1.0)
            assert views["s2"].state == "healthy"
            await wait_until(lambda: views["s1"].healthy, timeout=3)
            assert client.route(IWhere, key) == "s1"
    assert caplog.text.count("server s1: healthy -> ejected") == 1
    assert caplog.text.count("server s1: ejected -> healthy") == 1


async def test_rtt_is_measured_by_heartbeats() -> None:
    async with hosts("memory") as h:
        ep = await h.start("s0")
        async with forkcore.Client(mode="multi", servers=[ep], transport="memory",
                                   strategy="round_robin",
                                   health={"heartbeat_interval": 0.05}) as client:
            [view] = client.servers
            await wait_until(lambda: view.rtt is not None)
            assert 0 <= view.rtt < 1.0  # type: ignore[operator]


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_single_mode_moves_on_and_resends_only_idempotent_calls(transport: str) -> None:
    async with hosts(transport) as h:
        eps = [await h.start("first"), await h.start("second")]
        async with forkcore.Client(servers=eps, transport=transport, request_timeout=5.0,
                                   reconnect_initial_delay=0.02) as client:
            grain = client.get_grain(IWhere, "k")
            assert await grain.where() == "first"
            outcomes: dict[str, Any] = {}

            async def call(name: str, method: Any) -> None:
                try:
                    outcomes[name] = await method(2.0)
                except ConnectError as exc:
                    outcomes[name] = exc

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "idempotent", grain.sleep_where_idempotent)
                tg.start_soon(call, "plain", grain.sleep_where)
                await anyio.sleep(0.1)
                h.stop("first")  # drain_timeout 0.2 s < 2 s: the calls are cut off
            assert outcomes["idempotent"] == "second"
            assert isinstance(outcomes["plain"], ConnectError)
