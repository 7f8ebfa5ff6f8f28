"""examples/game end to end: the three shipped server configurations run as real
`forkcore serve` processes (started from examples/game, as the README says), and the
client script plays matches against them, over tcp and, when installed, udp."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import attrs
import pytest
from serving import cli_env, read_ready_line

import forkcore
from forkcore.plugins import registry

ROOT = Path(__file__).resolve().parent.parent
GAME_DIR = ROOT / "examples" / "game"
CONFIGS = ("game1.toml", "game2.toml", "game3.toml")
TRANSPORTS = [
    pytest.param(name, marks=pytest.mark.skipif(
        name not in registry("transport"),
        reason=f"transport {name!r} is not installed"))
    for name in ("tcp", "udp")
]
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def game_client() -> ModuleType:
    """examples/game/game_client.py, imported the way the script imports game_grains."""
    sys.path.insert(0, str(GAME_DIR))
    try:
        return importlib.import_module("game_client")
    finally:
        sys.path.remove(str(GAME_DIR))


def serve_env() -> dict[str, str]:
    """As `cli_env`, without tests/ on the path: game_grains must come from the cwd."""
    env = cli_env(PYTHONDONTWRITEBYTECODE="1")
    original = os.environ.get("PYTHONPATH")
    if original:
        env["PYTHONPATH"] = original
    else:
        env.pop("PYTHONPATH", None)
    return env


def configured(source: Path, directory: Path, transport: str) -> Path:
    """A copy of a shipped configuration on an ephemeral port and the given transport."""
    lines = source.read_text(encoding="utf-8").splitlines()
    replaced = {"listen": 0, "transport": 0}
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0].strip()
        if key in replaced:
            value = "127.0.0.1:0" if key == "listen" else transport
            lines[i] = f'{key} = "{value}"'
            replaced[key] += 1
    assert replaced == {"listen": 1, "transport": 1}, f"{source.name}: {replaced}"
    path = directory / source.name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@attrs.define
class Served:
    config: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    server_id: str = ""
    endpoint: str = ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


def start(config: Path) -> Served:
    """`forkcore serve -c CONFIG` with examples/game as the current directory."""
    stderr_path = config.with_suffix(".stderr")
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "forkcore.cli", "serve", "-c",
                                 str(config)], cwd=GAME_DIR, env=serve_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, bufsize=0)
    return Served(config, proc, stderr_path)


def wait_ready(served: Served, deadline: float) -> None:
    """Read the ready line (`forkcore: serving ID on HOST:PORT (...)`) or fail."""
    _line, match = read_ready_line(served.proc, deadline,
                                   lambda: f"{served.config.name}; stderr:\n{served.stderr()}")
    served.server_id = match["id"]
    served.endpoint = f"{match['host']}:{match['port']}"


def stop(served: Served) -> str | None:
    """SIGTERM, as an operator would; a complaint unless it drained and exited 0."""
    proc = served.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return f"{served.config.name}: still running {STOP_TIMEOUT}s after SIGTERM"
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    if proc.returncode != 0:
        return (f"{served.config.name}: exited {proc.returncode} after SIGTERM; "
                f"stderr:\n{served.stderr()}")
    return None


@attrs.frozen
class Game:
    transport: str
    endpoints: list[str]
    ids: list[str]


@pytest.fixture(scope="module", params=TRANSPORTS)
def game(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Game]:
    """The three game servers, started together, stopped with SIGTERM at the end."""
    transport = str(request.param)
    directory = tmp_path_factory.mktemp(f"game-{transport}")
    servers: list[Served] = []
    try:
        for name in CONFIGS:
            servers.append(start(configured(GAME_DIR / name, directory, transport)))
        deadline = time.monotonic() + READY_TIMEOUT
        for served in servers:
            wait_ready(served, deadline)
        yield Game(transport, [s.endpoint for s in servers], [s.server_id for s in servers])
    finally:
        complaints = [c for c in map(stop, servers) if c]
    if complaints:
        pytest.fail("\n".join(complaints))


def test_shipped_configurations(game_client: ModuleType) -> None:
    endpoints, transport = game_client.servers_from_configs()
    assert transport == "udp"
    assert endpoints == ["127.0.0.1:12001", "127.0.0.1:12002", "127.0.0.1:12003"]
    for i, name in enumerate(CONFIGS, 1):
        server = forkcore.load_config(GAME_DIR / name).server
        assert server is not None
        assert (server.id, server.grains) == (f"game{i}", ["game_grains"])
    if "udp" in registry("transport"):
        # game_grains is imported already (by game_client), as `forkcore serve` would
        built = forkcore.Server.from_config(GAME_DIR / CONFIGS[0])
        assert built.interfaces == ["game.player", "game.room"]


@pytest.mark.anyio
async def test_a_match(game: Game, game_client: ModuleType, anyio_backend: str) -> None:
    assert game.ids == ["game1", "game2", "game3"]
    players, rooms, ticks = 9, 3, 20
    match = f"{game.transport}-{anyio_backend}"
    lines: list[str] = []
    outcome = await game_client.play(game.endpoints, game.transport, match=match,
                                     players=players, rooms=rooms, ticks=ticks,
                                     tick_seconds=0.01, out=lines.append)
    report = "\n".join(lines)
    player_keys = [f"{match}/player-{i}" for i in range(players)]
    room_keys = [f"{match}/room-{j}" for j in range(rooms)]

    # players spread by consistent_hash; every room on game3 by grain_type_affinity
    assert set(outcome.player_servers) == set(player_keys)
    assert len(set(outcome.player_servers.values())) >= 2, report
    assert outcome.room_servers == dict.fromkeys(room_keys, "game3")

    # every player ends where its last sequenced move put it
    assert outcome.moves_sent == players * ticks
    assert outcome.positions == outcome.expected
    for i, key in enumerate(player_keys):
        x, y = game_client.path(i, ticks)
        assert (outcome.positions[key].x, outcome.positions[key].y) == (x, y)
        if game.transport == "tcp":  # ordered and reliable: every move arrives, once
            assert outcome.moves_received[key] == ticks, report
        else:  # datagrams: newer ones may supersede older ones; the last one is resent
            assert outcome.moves_received[key] >= 1, report

    # rooms and chat are reliable: every member, every line, in order
    for j, room in enumerate(room_keys):
        members = [k for i, k in enumerate(player_keys) if i % rooms == j]
        assert outcome.members[room] == members
        texts = [(line.player, line.text) for line in outcome.chat[room]]
        positions = [outcome.positions[k] for k in members]
        assert texts == [(k, "hello!") for k in members] + [
            (k, f"I am at ({p.x:g}, {p.y:g})") for k, p in zip(members, positions, strict=True)]
        assert [line.seq for line in outcome.chat[room]] == list(range(1, len(texts) + 1))
    assert outcome.refused.startswith("PermissionError: "), outcome.refused
    assert f"chat in {room_keys[0]}" in report


def test_the_script(game: Game) -> None:
    """`python game_client.py` as the README runs it, pointed at the test's servers."""
    match = f"script-{game.transport}"
    proc = subprocess.run(
        [sys.executable, "game_client.py", "--servers", ",".join(game.endpoints),
         "--transport", game.transport, "--match", match, "--ticks", "10"],
        cwd=GAME_DIR, env=serve_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"match {match}: 6 players in 2 rooms on 3 servers (transport {game.transport})" \
        in out
    assert "rooms, routed by grain_type_affinity (mapping game.room -> game3):" in out
    assert f"  {match}/room-0 -> game3" in out and f"  {match}/room-1 -> game3" in out
    assert "tried to speak: PermissionError:" in out
    assert f"{match}/player-0: I am at (10, -10)" in out
