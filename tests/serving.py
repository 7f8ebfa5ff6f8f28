"""Real `forkcore serve` processes for tests: start one on an ephemeral loopback port
(or a given one), learn its endpoint from its ready line, stop or kill it."""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

TESTS_DIR = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "forkcore.cli"]
READY = re.compile(r"forkcore: serving (?P<id>\S+) on (?P<host>[^\s:]+):(?P<port>\d+) \(")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `forkcore` subprocess: autoload on, tests/ importable."""
    env = dict(os.environ)
    env.pop("FORKCORE_DISABLE_PLUGIN_AUTOLOAD", None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class ServeProcess:
    """A running `forkcore serve` whose ready line has been read."""

    def __init__(self, proc: subprocess.Popen[bytes], server_id: str, host: str, port: int,
                 ready_line: str, stderr_path: Path) -> None:
        self.proc = proc
        self.id = server_id
        self.host = host
        self.port = port
        self.ready_line = ready_line
        self.stderr_path = stderr_path

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def read_ready_line(proc: subprocess.Popen[bytes], deadline: float,
                    describe: Callable[[], str]) -> tuple[str, re.Match[str]]:
    """The first line `forkcore serve` prints on stdout and its parse as a ready line;
    kills the process and fails the test if it does not come by `deadline`, the process
    exits first, or the line is not a ready line. `describe()` says which server."""
    assert proc.stdout is not None
    buffer = b""

    def fail(why: str) -> NoReturn:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"{describe()}\n{why}; stdout so far: {buffer!r}")

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fail("no ready line by the deadline")
            if not sel.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                fail("forkcore serve exited before it was ready")
            buffer += chunk
    line = buffer.split(b"\n", 1)[0].decode()
    match = READY.search(line)
    if match is None:
        fail(f"unexpected ready line {line!r}")
    assert match is not None
    return line, match


def start_server(directory: Path, server_id: str, extra: str = "",
                 timeout: float = 15.0, *, grains: str = '["grains_sample"]',
                 listen: str = "127.0.0.1:0", env: dict[str, str] | None = None,
                 cli_args: tuple[str, ...] = ()) -> ServeProcess:
    """Start `forkcore serve` (ephemeral loopback port unless `listen` says otherwise);
    return once it printed its ready line (or fail the test at the deadline)."""
    config = write(directory / f"{server_id}.toml",
                   f'[server]\nid = "{server_id}"\nlisten = "{listen}"\n'
                   f'grains = {grains}\n{extra}')
    stderr_path = directory / f"{server_id}.stderr"
    with open(stderr_path, "ab") as stderr_file:
        proc = subprocess.Popen([*CLI, *cli_args, "serve", "-c", str(config)], cwd=directory,
                                env=cli_env(**(env or {})), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=stderr_file, bufsize=0)
    line, match = read_ready_line(
        proc, time.monotonic() + timeout,
        lambda: f"forkcore serve ({server_id}); stderr:\n{stderr_path.read_text()}")
    return ServeProcess(proc, match["id"], match["host"], int(match["port"]), line, stderr_path)


