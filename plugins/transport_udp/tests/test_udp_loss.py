"""Grain calls over `udp` through a lossy relay: 10% loss each way, duplicates, and
jitter that reorders (seeded; 127.0.0.1 only; every wait bounded)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from udp_grains import Game, IGame
from udp_relay import LossyRelay

import forkcore
from forkcore.errors import ConnectError, RequestTimeout

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def through_relay(seed: int, *, client_options: dict[str, Any] | None = None,
                        **relay_options: Any) -> AsyncIterator[tuple[forkcore.Client,
                                                                     LossyRelay]]:
    async with forkcore.Server(id="s1", transport="udp", grains=[Game],
                               drain_timeout=0.2) as server:
        relay = LossyRelay(server.endpoint or "", seed=seed, **relay_options)
        async with anyio.create_task_group() as tg:
            await tg.start(relay.run)
            try:
                async with forkcore.Client(servers=[relay.endpoint], transport="udp",
                                           request_timeout=10.0,
                                           **(client_options or {})) as client:
                    yield client, relay
            finally:
                tg.cancel_scope.cancel()


async def settled(game: Any, key: str, expected: int, timeout: float = 3.0) -> list[int]:
    """The grain's log for `key` once it has `expected` entries or stopped growing."""
    seen: list[int] = []
    with anyio.move_on_after(timeout):
        quiet = 0
        while quiet < 5:
            now = (await game.log())[key]
            quiet = quiet + 1 if len(now) == len(seen) else 0
            seen = now
            if len(seen) >= expected:
                break
            await anyio.sleep(0.05)
    return seen


async def test_200_sequential_adds_return_1_to_200_in_order() -> None:
    with anyio.fail_after(30):
        async with through_relay(seed=11) as (client, relay):
            game = client.get_grain(IGame, "seq")
            results = [await game.add(1) for _ in range(200)]
    assert results == list(range(1, 201))
    assert relay.up.dropped and relay.down.dropped  # the loss was real


async def test_200_concurrent_echo_calls_each_get_their_own_payload() -> None:
    rng = random.Random(5)
    payloads = [rng.randbytes(rng.randrange(1, 3000)) for _ in range(200)]
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = await client.get_grain(IGame, i % 7).echo(payloads[i])

    with anyio.fail_after(30):
        async with through_relay(seed=12) as (client, relay):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(one, i)
    assert results == dict(enumerate(payloads))
    assert relay.up.reordered and relay.down.reordered


async def test_sequenced_updates_are_never_delivered_older_after_newer() -> None:
    with anyio.fail_after(30):
        async with through_relay(seed=13, jitter=0.01) as (client, relay):
            game = client.get_grain(IGame, "player")
            for seq in range(150):
                await game.position(seq)
                await game.heading(seq)
                # Updates sent in one loop turn replace each other (newest wins); a short
                # sleep lets each leave, so the relay gets to reorder many of them.
                await anyio.sleep(0.001)
            positions = await settled(game, "position", 150)
            headings = await settled(game, "heading", 150)
    for seen in (positions, headings):
        assert seen == sorted(set(seen)), "a sequenced update arrived after a newer one"
        assert len(seen) > 60, len(seen)  # most got through; some were lost or dropped
    assert relay.up.reordered > 10  # the relay did deliver datagrams out of order


async def test_unreliable_messages_are_never_duplicated() -> None:
    with anyio.fail_after(30):
        async with through_relay(seed=14, duplicate=0.2) as (client, relay):
            game = client.get_grain(IGame, "notes")
            for n in range(150):
                await game.note(n)
                await anyio.sleep(0.001)
            notes = await settled(game, "note", 150)
    assert len(notes) == len(set(notes)), "an unreliable message was delivered twice"
    assert 75 < len(notes) <= 150
    assert relay.up.duplicated > 10  # the relay did send datagrams twice


async def test_reliable_unordered_one_way_messages_all_arrive_once() -> None:
    with anyio.fail_after(30):
        async with through_relay(seed=15) as (client, _relay):
            game = client.get_grain(IGame, "events")
            for n in range(300):
                await game.event(n)
            events = await settled(game, "event", 300, timeout=10)
    assert sorted(events) == list(range(300))


async def test_silent_peer_fails_in_flight_calls_within_the_idle_timeout() -> None:
    options = {"transport_options": {"idle_timeout": 1.0}}
    with anyio.fail_after(20):
        async with through_relay(seed=16, loss=0.0, client_options=options) as (client, relay):
            game = client.get_grain(IGame, "k")
            assert await game.add(1) == 1
            errors: list[BaseException] = []

            async def in_flight() -> None:
                try:
                    await game.sleep(30)
                except (ConnectError, RequestTimeout) as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_flight)
                await anyio.sleep(0.2)
                relay.blackhole = True  # the server goes silent
                start = anyio.current_time()
            elapsed = anyio.current_time() - start
    assert len(errors) == 1 and isinstance(errors[0], ConnectError), errors
    assert "idle timeout" in str(errors[0])
    assert 0.9 < elapsed < 2.5, elapsed
