"""The grains of the game example: players that move, rooms with chat.

`forkcore serve -c game1.toml` (run from this directory) imports this module and hosts
`Player` and `Room`; `game_client.py` imports it for the interfaces and wire types.

- `game.player`: `move()` is `sequenced`: the client does not wait for it, and over the
  `udp` transport an older position that arrives after a newer one is dropped (the latest
  position wins; a lost one is simply superseded by the next). Over `tcp` every position
  arrives, in order. The grain also ignores a tick older than the one it has, so a late
  or resent position can never move a player back, whatever the transport.
- `game.room`: membership and chat, all `reliable` (ordered, answered): a chat line is
  never lost and every member sees the same order.
"""

from __future__ import annotations

import attrs

import forkcore


@forkcore.wire_type(name="game.Position")
@attrs.frozen
class Position:
    """Where a player is, as of game tick `tick`."""

    x: float
    y: float
    tick: int


@forkcore.wire_type(name="game.ChatLine")
@attrs.frozen
class ChatLine:
    """One line of a room's chat; `seq` numbers the room's lines from 1."""

    seq: int
    player: str
    text: str


class IPlayer(forkcore.GrainInterface, name="game.player"):
    @forkcore.rpc(delivery="sequenced")
    async def move(self, tick: int, x: float, y: float) -> None:
        """Fire and forget: the newest position wins."""

    @forkcore.rpc(idempotent=True)
    async def position(self) -> Position | None:
        """The latest position received (None before the first)."""

    @forkcore.rpc(idempotent=True)
    async def moves_received(self) -> int:
        """How many `move` calls reached this activation (dropped ones never do)."""


class IRoom(forkcore.GrainInterface, name="game.room"):
    async def join(self, player: str) -> list[str]:
        """Enter the room; the members after joining."""

    async def leave(self, player: str) -> None: ...

    @forkcore.rpc(idempotent=True)
    async def members(self) -> list[str]: ...

    async def say(self, player: str, text: str) -> int:
        """Post a chat line (members only); its sequence number."""

    @forkcore.rpc(idempotent=True)
    async def history(self, since: int = 0) -> list[ChatLine]:
        """Chat lines with `seq` greater than `since`, oldest first."""


class Player(forkcore.Grain, IPlayer):
    def __init__(self) -> None:
        self.current: Position | None = None
        self.received = 0

    async def move(self, tick: int, x: float, y: float) -> None:
        self.received += 1
        if self.current is None or tick > self.current.tick:
            self.current = Position(x, y, tick)

    async def position(self) -> Position | None:
        return self.current

    async def moves_received(self) -> int:
        return self.received


class Room(forkcore.Grain, IRoom):
    MAX_LINES = 1000  # a room keeps its last lines only

    def __init__(self) -> None:
        self.players: list[str] = []
        self.lines: list[ChatLine] = []
        self.next_seq = 1

    async def join(self, player: str) -> list[str]:
        if player not in self.players:
            self.players.append(player)
        return list(self.players)

    async def leave(self, player: str) -> None:
        if player in self.players:
            self.players.remove(player)

    async def members(self) -> list[str]:
        return list(self.players)

    async def say(self, player: str, text: str) -> int:
        if player not in self.players:
            raise PermissionError(f"{player} is not in room {self.key}; join it first")
        line = ChatLine(self.next_seq, player, text)
        self.next_seq += 1
        self.lines.append(line)
        del self.lines[:-self.MAX_LINES]
        return line.seq

    async def history(self, since: int = 0) -> list[ChatLine]:
        return [line for line in self.lines if line.seq > since]
