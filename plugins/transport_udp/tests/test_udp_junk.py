"""Junk that looks like a QUIC Initial is refused before a connection is built (issue 12,
point 5): real sockets on 127.0.0.1, a real forkcore Server and Client, every wait
bounded. The listener's counters are in the server's stats under "transport"."""

from __future__ import annotations

import random
import socket
import struct
from typing import Any

import anyio
import pytest
from udp_grains import Game, IGame

import forkcore

pytestmark = pytest.mark.anyio


def initial_looking(rng: random.Random) -> bytes:
    """A well-formed QUIC v1 Initial header (fresh connection ids) over random bytes, of
    1200 bytes or more: it parses, and only the AEAD check can tell it is junk."""
    size = rng.choice([1200, 1252, 1350, 1472])
    dcid, scid = rng.randbytes(rng.randrange(8, 21)), rng.randbytes(rng.randrange(0, 21))
    header = bytes([0xC0 | rng.randrange(4)]) + struct.pack("!I", 1) + bytes([len(dcid)]) \
        + dcid + bytes([len(scid)]) + scid + b"\x00"
    length = size - len(header) - 2
    return header + struct.pack("!H", 0x4000 | length) + rng.randbytes(length)


def transport_stats(server: forkcore.Server) -> dict[str, Any]:
    return dict(server.stats()["transport"])


async def call_through(server: forkcore.Server) -> int:
    async with forkcore.Client(servers=[server.endpoint or ""], transport="udp",
                               request_timeout=10.0) as client:
        return int(await client.get_grain(IGame, "k").add(1))


async def test_a_flood_of_initial_looking_junk_builds_no_connection() -> None:
    rng = random.Random(12)
    flood_size = 3000
    async with forkcore.Server(id="s1", transport="udp", grains=[Game]) as server:
        host, port = (server.endpoint or "").rsplit(":", 1)
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        junk.setblocking(False)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for n in range(flood_size):
                data = initial_looking(rng)
                for _ in range(100):
                    try:
                        junk.sendto(data, (host, int(port)))
                        sent += 1
                        break
                    except BlockingIOError:
                        await anyio.sleep(0.001)
                if n % 20 == 0:
                    await anyio.sleep(0)

        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(flood)
                    await anyio.sleep(0.01)
                    assert await call_through(server) == 1  # connects during the flood
                # every junk datagram sent has been refused once the counter settles
                while transport_stats(server)["initials_refused"] < sent:
                    await anyio.sleep(0.01)
                during = transport_stats(server)
                assert await call_through(server) == 2  # and after it
        finally:
            junk.close()
    assert sent == flood_size
    assert during["initials_refused"] == flood_size
    assert during["connections_created"] == 1  # the real client's, none for the junk
    assert transport_stats(server)["connections_created"] == 2
