"""The game example's client: players move and chat in rooms, across three servers.

    python game_client.py            # the servers of game1.toml, game2.toml, game3.toml
    python game_client.py --servers 127.0.0.1:12001,127.0.0.1:12002 --transport tcp

Players and rooms want different routing, and a multi-mode client has exactly one
strategy, so the script holds two clients on the same servers:

- `players` routes with `consistent_hash`: the players spread over every server, each one
  always on the same server while the servers stay the same, and when a server leaves
  only its players move;
- `rooms` routes with `grain_type_affinity`: every room on one server, the one its
  `mapping` option names (`game3` here), so chat never competes with movement on the
  other servers; if that server goes away, the rooms move together to one other server.

Each client holds one connection per server, so the script has two per server.
"""

from __future__ import annotations

import argparse
import functools
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
from game_grains import ChatLine, IPlayer, IRoom, Position

import forkcore
from forkcore.errors import ConfigError, ForkcoreError, RemoteError

HERE = Path(__file__).resolve().parent
CONFIGS = ("game1.toml", "game2.toml", "game3.toml")
SETTLE_TIMEOUT = 10.0  # seconds for a player's last position to arrive


def servers_from_configs(directory: Path = HERE) -> tuple[list[str], str]:
    """The endpoints and the (common) transport of the three server configurations."""
    endpoints: list[str] = []
    transports: set[str] = set()
    for name in CONFIGS:
        server = forkcore.load_config(directory / name).server
        if server is None:
            raise ConfigError(f"{directory / name}: no [server] table")
        endpoints.append(server.listen)
        transports.add(server.transport)
    if len(transports) != 1:
        raise ConfigError(f"{', '.join(CONFIGS)} use different transports "
                          f"({', '.join(sorted(transports))}); give them the same one")
    return endpoints, transports.pop()


def transport_options(transport: str, ca_file: str | None = None) -> dict[str, Any]:
    """Client transport options. QUIC always encrypts: without `cert_file` each udp
    server makes a self-signed certificate, so a client must pin it, check it against a
    CA (`ca_file`), or, for a local game like this one, skip the check."""
    if transport != "udp":
        return {}
    if ca_file:
        return {"ca_file": ca_file}
    return {"insecure": True}  # development only: give the servers certificates in production


def path(player: int, tick: int) -> tuple[float, float]:
    """Where player number `player` is at `tick`: each walks its own straight line."""
    return float(player * 10 + tick), float(tick * (player % 3 - 1))


@attrs.define
class Outcome:
    """What a game showed, for the caller to print or check."""

    player_servers: dict[str, str]  # player key → server id, as routed
    room_servers: dict[str, str]  # room key → server id, as routed
    expected: dict[str, Position]  # player key → the last position sent
    positions: dict[str, Position]  # player key → the position its grain holds
    moves_received: dict[str, int]  # player key → move calls that reached its grain
    moves_sent: int
    members: dict[str, list[str]]  # room key → members once everyone joined
    chat: dict[str, list[ChatLine]]  # room key → the room's chat, oldest first
    refused: str  # what a player who is in no room was told when speaking


async def wait_for_servers(clients: Sequence[forkcore.Client], count: int,
                           timeout: float = 5.0) -> bool:
    """Wait (at most `timeout` s) until every client sees `count` healthy servers."""
    with anyio.move_on_after(timeout):
        while any(sum(v.healthy for v in c.servers) < count for c in clients):
            await anyio.sleep(0.02)
        return True
    return False


async def settle(player: IPlayer, final: Position) -> Position:
    """Wait for a player's last position to arrive, resending it until it has: sequenced
    messages may be dropped, and a game re-sends its latest state until it is seen."""
    with anyio.move_on_after(SETTLE_TIMEOUT):
        while True:
            current = await player.position()
            if current is not None and current.tick >= final.tick:
                return current
            await player.move(final.tick, final.x, final.y)
            await anyio.sleep(0.05)
    raise TimeoutError(f"the last position of {player!r} did not arrive within "
                       f"{SETTLE_TIMEOUT:g}s")


async def play(endpoints: Sequence[str], transport: str, *, match: str = "demo",
               players: int = 6, rooms: int = 2, ticks: int = 30,
               tick_seconds: float = 0.02, room_server: str = "game3",
               options: dict[str, Any] | None = None,
               out: Callable[[str], None] = print) -> Outcome:
    """One match: players join rooms, say hello, move for `ticks` ticks, report where
    they are in the chat, and leave. Keys start with `match`, so matches never share
    grains."""
    common: dict[str, Any] = dict(
        mode="multi", servers=list(endpoints), transport=transport, request_timeout=5.0,
        transport_options=transport_options(transport) if options is None else options)
    player_client = forkcore.Client(strategy="consistent_hash", **common)
    room_client = forkcore.Client(strategy="grain_type_affinity",
                                  strategy_options={"mapping": {"game.room": room_server}},
                                  **common)
    out(f"match {match}: {players} players in {rooms} rooms on {len(endpoints)} servers "
        f"(transport {transport})")
    async with player_client, room_client:
        if not await wait_for_servers((player_client, room_client), len(set(endpoints))):
            out("  (not every server is up; playing on those that are)")
        for view in sorted(player_client.servers, key=lambda v: v.id):
            out(f"  server {view.id} at {view.endpoint}: {view.state}")

        player_keys = [f"{match}/player-{i}" for i in range(players)]
        room_keys = [f"{match}/room-{j}" for j in range(rooms)]
        room_of = {key: room_keys[i % rooms] for i, key in enumerate(player_keys)}
        player = {key: player_client.get_grain(IPlayer, key) for key in player_keys}
        room = {key: room_client.get_grain(IRoom, key) for key in room_keys}

        player_servers = {key: player_client.route(IPlayer, key) for key in player_keys}
        room_servers = {key: room_client.route(IRoom, key) for key in room_keys}
        out("players, routed by consistent_hash:")
        for key, server in player_servers.items():
            out(f"  {key} -> {server}")
        out(f"rooms, routed by grain_type_affinity (mapping game.room -> {room_server}):")
        for key, server in room_servers.items():
            out(f"  {key} -> {server}")

        # Rooms and chat: reliable calls, answered in order.
        for key in player_keys:
            await room[room_of[key]].join(key)
            await room[room_of[key]].say(key, "hello!")
        members = {key: await room[key].members() for key in room_keys}

        # Movement: one sequenced (fire-and-forget) position per player per tick.
        expected: dict[str, Position] = {}
        sent = 0
        for tick in range(1, ticks + 1):
            for i, key in enumerate(player_keys):
                x, y = path(i, tick)
                await player[key].move(tick, x, y)
                expected[key] = Position(x, y, tick)
                sent += 1
            await anyio.sleep(tick_seconds)
        positions = {key: await settle(player[key], expected[key]) for key in player_keys}
        received = {key: await player[key].moves_received() for key in player_keys}
        out(f"moved: {ticks} ticks x {players} players = {sent} sequenced positions sent")
        for key in player_keys:
            p = positions[key]
            out(f"  {key} at ({p.x:g}, {p.y:g}), tick {p.tick}; {received[key]} of its "
                f"moves reached {player_servers[key]}")

        for key in player_keys:
            p = positions[key]
            await room[room_of[key]].say(key, f"I am at ({p.x:g}, {p.y:g})")
        try:
            await room[room_keys[0]].say(f"{match}/spectator", "can anyone hear me?")
            raise AssertionError("a player in no room was allowed to speak")
        except RemoteError as exc:  # the grain's exception, typed, with its message
            refused = f"{exc.type_name}: {exc.message}"
        out(f"a spectator who joined no room tried to speak: {refused}")

        chat = {key: await room[key].history() for key in room_keys}
        for key in room_keys:
            out(f"chat in {key} ({len(members[key])} members):")
            for line in chat[key]:
                out(f"  {line.seq:>3} {line.player}: {line.text}")
        for key in player_keys:
            await room[room_of[key]].leave(key)

    return Outcome(player_servers, room_servers, expected, positions, received, sent,
                   members, chat, refused)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Play one match of the game example.")
    parser.add_argument("--servers", help="comma-separated host:port (default: the listen "
                        "addresses of game1.toml, game2.toml and game3.toml)")
    parser.add_argument("--transport", help="default: the transport of those files")
    parser.add_argument("--ca-file", help="udp: PEM CA bundle the servers' certificates "
                        "chain to (default: no certificate check, for local play only)")
    parser.add_argument("--match", default=uuid.uuid4().hex[:6],
                        help="prefix of every grain key (default: random)")
    parser.add_argument("--players", type=int, default=6)
    parser.add_argument("--rooms", type=int, default=2)
    parser.add_argument("--ticks", type=int, default=30)
    parser.add_argument("--room-server", default="game3",
                        help="the server id that hosts every room (default game3)")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)
    if min(args.players, args.rooms, args.ticks) < 1:
        parser.error("--players, --rooms and --ticks must be at least 1")
    try:
        endpoints, transport = servers_from_configs()
        if args.servers:
            endpoints = [e.strip() for e in args.servers.split(",") if e.strip()]
        transport = args.transport or transport
        anyio.run(functools.partial(
            play, endpoints, transport, match=args.match, players=args.players,
            rooms=args.rooms, ticks=args.ticks, room_server=args.room_server,
            options=transport_options(transport, args.ca_file)), backend=args.backend)
    except (ForkcoreError, TimeoutError) as exc:
        print(f"game_client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
