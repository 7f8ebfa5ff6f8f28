"""The `forkcore` command line, end to end: real `forkcore serve` / `call` / `status` /
`plugins` / `demo` processes, configuration files in tmp_path, ephemeral loopback ports.

Every wait is bounded; every process a test starts is killed in teardown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from serving import CLI, ServeProcess, cli_env, start_server, write

from forkcore.errors import ConfigError

RUN_TIMEOUT = 20.0  # seconds any one CLI invocation may take before the test fails

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and pipes")


# -- helpers ----------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `forkcore ARGS` to completion (bounded); its exit status, stdout and stderr."""
    proc = subprocess.Popen([*CLI, *args], cwd=cwd, env=env or cli_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"forkcore {' '.join(args)} did not finish within {timeout}s\n"
                    f"stdout: {out}\nstderr: {err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, nothing on stdout, exactly one line on stderr naming every needle,
    no traceback. Returns that line."""
    context = f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.returncode != 0, context
    assert result.stdout == "", context
    assert "Traceback" not in result.stderr, context
    err_lines = lines(result.stderr)
    assert len(err_lines) == 1, context
    line = err_lines[0]
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line\n{context}"
    return line


def assert_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A command-line mistake: exit 2, nothing on stdout, the usage and one error line
    naming every needle, no traceback. Returns the error line."""
    context = f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.returncode == 2, context
    assert result.stdout == "", context
    assert "Traceback" not in result.stderr and "ConfigError" not in result.stderr, context
    assert result.stderr.startswith("usage: forkcore"), context
    line = lines(result.stderr)[-1]
    assert line.startswith("forkcore ") and ": error: " in line, context
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line\n{context}"
    return line


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_toml(path: Path, port: int, extra: str = "") -> Path:
    return write(path, f'[client]\nservers = ["127.0.0.1:{port}"]\n{extra}')


def established(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:`port` is established (Linux /proc)."""
    try:
        with open("/proc/net/tcp", encoding="ascii") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        fields = row.split()
        local, state = fields[1], fields[3]
        if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
            return True
    return False


def wait_in_flight(port: int, call: subprocess.Popen[str], settle: float = 0.3) -> None:
    """Wait (bounded) until the `forkcore call` process has connected to the server on
    `port`, then a little longer so that its request is surely in flight."""
    if not os.path.exists("/proc/net/tcp"):
        time.sleep(1.0)  # no way to observe the connection: give the call time to start
        return
    deadline = time.monotonic() + 10.0
    while not established(port):
        if call.poll() is not None:
            out, err = call.communicate()
            pytest.fail(f"the call ended before it connected: exit {call.returncode}\n"
                        f"stdout: {out}\nstderr: {err}")
        if time.monotonic() > deadline:
            pytest.fail("the call did not connect to the server within 10s")
        time.sleep(0.02)
    time.sleep(settle)


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Processes (Popen or ServeProcess) a test started; killed at teardown."""
    started: list[Any] = []
    yield started
    for p in started:
        if isinstance(p, ServeProcess):
            p.stop()
        elif p.poll() is None:
            p.kill()
            try:
                p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, Path]]:
    """One server shared by the call tests, and a client configuration pointing at it."""
    directory = tmp_path_factory.mktemp("cli_served")
    server = start_server(directory, "cli-s1")
    try:
        yield server, client_toml(directory / "client.toml", server.port)
    finally:
        server.stop()


def call(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("call", "-c", str(config), *args, cwd=config.parent)


def call_ok(config: Path, *args: str) -> Any:
    """`forkcore call` that must succeed: its stdout is exactly one JSON line; the value."""
    result = call(config, *args)
    context = f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.returncode == 0, context
    assert result.stdout.endswith("\n"), context
    assert len(result.stdout.splitlines()) == 1, context
    return json.loads(result.stdout)


# -- serve + call -----------------------------------------------------------------------


def test_serve_prints_ready_line(served: tuple[ServeProcess, Path]) -> None:
    server, _ = served
    assert server.id == "cli-s1"
    assert server.host == "127.0.0.1"
    assert server.port > 0
    assert "test.counter" in server.ready_line
    assert server.proc.poll() is None


def test_call_prints_exactly_the_result(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    result = call(config, "test.counter", "exact", "add", "5")
    assert (result.returncode, result.stdout) == (0, "5\n"), result.stderr
    assert "Traceback" not in result.stderr


def test_calls_accumulate(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    assert call_ok(config, "test.counter", "acc", "add", "5") == 5
    assert call_ok(config, "test.counter", "acc", "add", "5") == 10
    assert call_ok(config, "test.counter", "acc", "add", "-3") == 7
    assert call_ok(config, "test.counter", "acc", "get") == 7
    assert call_ok(config, "test.counter", "other", "get") == 0


@pytest.mark.parametrize("loop", ["uvloop", "trio"])
def test_serve_and_call_on_another_event_loop(tmp_path: Path, procs: list[Any],
                                              loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    server = start_server(tmp_path, f"loop-{loop}", cli_args=("--loop", loop))
    procs.append(server)
    config = client_toml(tmp_path / "client.toml", server.port)
    result = run_cli("--loop", loop, "call", "-c", str(config), "test.counter", "k", "add",
                     "2", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "2\n"), result.stderr


def test_loop_uvloop_without_uvloop_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from forkcore import cli

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails as if not installed

    async def nothing() -> None:
        return None

    with pytest.raises(ConfigError, match=r"pip install 'forkcore\[uvloop\]'"):
        cli.run(argparse.Namespace(loop="uvloop"), nothing)


@pytest.mark.parametrize(("key_arg", "key"), [
    ("player-1", "player-1"),  # not JSON: taken as a string
    ('"player-2"', "player-2"),  # a JSON string
    ("42", 42),  # a JSON int
    ('"42"', "42"),  # a JSON string that looks like a number stays a string
])
def test_string_and_int_keys(served: tuple[ServeProcess, Path], key_arg: str,
                             key: Any) -> None:
    _, config = served
    value = call_ok(config, "test.counter", key_arg, "key_of")
    assert value == key
    assert type(value) is type(key)


def test_int_and_string_keys_are_different_grains(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    assert call_ok(config, "test.counter", "77", "add", "1") == 1
    assert call_ok(config, "test.counter", '"77"', "add", "10") == 10
    assert call_ok(config, "test.counter", "77", "get") == 1


@pytest.mark.parametrize("value", [
    [1, 2, 3],
    {"a": {"b": [True, None, 1.5]}, "c": "x"},
    "ünïcode ✓ hello world",
    [None, False, True, -7, 2.25, "", [], {}, [[["deep"]], {"k": [1, {"m": "n"}]}]],
])
def test_echo_round_trips_json(served: tuple[ServeProcess, Path], value: Any) -> None:
    _, config = served
    echoed = call_ok(config, "test.counter", "echo", "echo", json.dumps(value))
    assert echoed == value
    assert json.dumps(echoed) == json.dumps(value)  # same types all the way down (1 ≠ true)


def test_json_args_reach_the_grain(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    # a JSON string argument, then a JSON float: the grain gets them decoded
    result = call(config, "test.counter", "args", "fail", '"from json"')
    assert_one_line_error(result, "from json")
    assert call_ok(config, "test.counter", "args", "sleep", "0.01") == "slept"


def test_argument_that_is_not_json(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    assert_usage_error(call(config, "test.counter", "k", "add", "five"), "argument 1", "five")


@pytest.mark.parametrize("text", ["Infinity", "[-Infinity]", "NaN", "[1, NaN]"])
def test_argument_that_is_not_standard_json(served: tuple[ServeProcess, Path],
                                            text: str) -> None:
    _, config = served
    assert_usage_error(call(config, "test.counter", "k", "echo", text), "not JSON")


def test_result_that_is_not_json_is_refused(served: tuple[ServeProcess, Path]) -> None:
    _, config = served  # 1e999 is a JSON number; the grain echoes it back as inf
    result = call(config, "test.counter", "inf", "echo", "[1e999]")
    line = assert_one_line_error(result, "cannot be shown as JSON", "inf")
    assert "unexpected" not in line


def test_negative_number_needs_no_double_dash(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    assert call_ok(config, "test.counter", "neg", "add", "-4") == -4


# -- errors from the server -------------------------------------------------------------


def test_grain_error_is_one_line(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    result = call(config, "test.counter", "err", "fail", '"boom 42"')
    assert_one_line_error(result, "RemoteError", "ValueError", "boom 42")


def test_grain_error_with_debug_shows_traceback(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    result = run_cli("--debug", "call", "-c", str(config), "test.counter", "err", "fail",
                     '"boom 43"', cwd=config.parent)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" in result.stderr
    assert "RemoteError" in result.stderr
    assert "boom 43" in result.stderr


def test_unknown_method(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    result = call(config, "test.counter", "k", "no_such_method")
    assert_one_line_error(result, "MethodNotFound", "no_such_method")


def test_unknown_interface(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    result = call(config, "test.no_such_interface", "k", "add", "1")
    assert_one_line_error(result, "MethodNotFound", "test.no_such_interface")


def test_call_with_no_server_listening(tmp_path: Path) -> None:
    config = client_toml(tmp_path / "client.toml", free_port(), "connect_timeout = 2.0\n")
    started = time.monotonic()
    result = call(config, "test.counter", "k", "get")
    assert_one_line_error(result, "ConnectError")
    assert time.monotonic() - started < 10


# -- status -----------------------------------------------------------------------------


def test_status_shows_server_and_health(served: tuple[ServeProcess, Path]) -> None:
    server, config = served
    result = run_cli("status", "-c", str(config), cwd=config.parent)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    row = [line for line in result.stdout.splitlines() if server.id in line]
    assert row, result.stdout
    assert "healthy" in row[0]
    assert f"127.0.0.1:{server.port}" in row[0]
    assert "test.counter" in row[0]


def test_status_watch_refreshes_with_server_counters(served: tuple[ServeProcess, Path]) -> None:
    server, config = served
    call_ok(config, "test.counter", "watched", "add", "1")
    result = run_cli("status", "-c", str(config), "--watch", "--interval", "0.2",
                     "--count", "3", cwd=config.parent)
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("SERVER")]
    assert len(headers) == 3
    assert all("CALLS/S" in h and "GRAINS" in h for h in headers)
    rows = [line for line in result.stdout.splitlines() if line.startswith(server.id)]
    assert len(rows) == 3
    column = headers[-1].index(" CALLS ") + 1  # columns are aligned under their headers
    assert int(rows[-1][column:].split()[0]) >= 1


def test_status_shows_an_endpoint_that_never_answered(
        served: tuple[ServeProcess, Path], tmp_path: Path) -> None:
    server, _ = served
    dead = free_port()
    config = write(tmp_path / "two.toml",
                   f'[client]\nmode = "multi"\nstrategy = "consistent_hash"\n'
                   f'connect_timeout = 0.5\nservers = ["127.0.0.1:{server.port}", '
                   f'"127.0.0.1:{dead}"]\n')
    result = run_cli("status", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [row] = [line for line in result.stdout.splitlines() if f"127.0.0.1:{dead}" in line]
    assert "unreachable" in row and "cannot connect" in row


# -- signals ----------------------------------------------------------------------------


def test_sigterm_during_a_call_lets_it_finish(tmp_path: Path, procs: list[Any]) -> None:
    server = start_server(tmp_path, "cli-term")
    procs.append(server)
    config = client_toml(tmp_path / "client.toml", server.port)
    call_proc = subprocess.Popen(
        [*CLI, "call", "-c", str(config), "test.counter", "k", "sleep", "1.0"],
        cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    procs.append(call_proc)
    wait_in_flight(server.port, call_proc)
    assert call_proc.poll() is None, "the call finished before the server was signalled"
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    out, err = call_proc.communicate(timeout=15)
    assert call_proc.returncode == 0, f"stdout: {out!r}\nstderr: {err!r}"
    assert out == '"slept"\n', err

    try:
        status = server.proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail(f"forkcore serve still running 8s after SIGTERM\n{server.stderr()}")
    assert status == 0, server.stderr()
    assert time.monotonic() - signalled < 8
    assert "Traceback" not in server.stderr()


def test_sigint_stops_an_idle_server(tmp_path: Path, procs: list[Any]) -> None:
    server = start_server(tmp_path, "cli-int")
    procs.append(server)
    server.proc.send_signal(signal.SIGINT)
    try:
        status = server.proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail(f"forkcore serve still running 8s after SIGINT\n{server.stderr()}")
    assert status == 0, server.stderr()
    assert "Traceback" not in server.stderr()


def test_sigkill_during_a_call_fails_it_fast(tmp_path: Path, procs: list[Any]) -> None:
    server = start_server(tmp_path, "cli-kill")
    procs.append(server)
    config = client_toml(tmp_path / "client.toml", server.port)
    call_proc = subprocess.Popen(
        [*CLI, "call", "-c", str(config), "test.counter", "k", "sleep", "5"],
        cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    procs.append(call_proc)
    wait_in_flight(server.port, call_proc)
    assert call_proc.poll() is None, "the call finished before the server was killed"
    server.proc.kill()
    killed = time.monotonic()
    try:
        out, err = call_proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("forkcore call still running 10s after its server was killed")
    elapsed = time.monotonic() - killed
    context = f"exit {call_proc.returncode}\nstdout: {out!r}\nstderr: {err!r}"
    assert call_proc.returncode != 0, context
    assert out == "", context
    assert elapsed < 3.0, f"the call took {elapsed:.2f}s to fail\n{context}"
    assert "Traceback" not in err, context
    error_lines = [line for line in err.splitlines() if line.startswith("forkcore:")]
    assert len(error_lines) == 1, context
    assert "ConnectError" in error_lines[0], context


# -- configuration errors ---------------------------------------------------------------

CLIENT_HEAD = '[client]\nservers = ["127.0.0.1:{port}"]\n'
SERVER_HEAD = '[server]\nid = "bad"\nlisten = "127.0.0.1:0"\ngrains = ["grains_sample"]\n'

CONFIG_ERRORS = [
    # (id, command, file text, words the one-line error must contain besides the file)
    ("client-unknown-key", "call", CLIENT_HEAD + "bogus_key = 1\n", ["bogus_key"]),
    ("client-wrong-type", "call", CLIENT_HEAD + 'request_timeout = "soon"\n',
     ["request_timeout"]),
    ("client-bad-value", "call", CLIENT_HEAD + "connections_per_server = 0\n",
     ["connections_per_server"]),
    ("client-nested-unknown-key", "call", CLIENT_HEAD + "[client.health]\nbogus_beat = 1\n",
     ["bogus_beat"]),
    ("client-unknown-table", "call", CLIENT_HEAD + "[bogus_table]\nx = 1\n", ["bogus_table"]),
    ("client-unknown-transport", "call", CLIENT_HEAD + 'transport = "udp"\n',
     ["transport", "udp", "forkcore-transport-udp"]),
    ("client-unknown-strategy", "call", CLIENT_HEAD + 'strategy = "no_such_strategy"\n',
     ["strategy", "no_such_strategy"]),
    ("client-multi-unknown-strategy", "call",
     CLIENT_HEAD + 'mode = "multi"\nstrategy = "no_such_strategy"\n',
     ["strategy", "no_such_strategy"]),
    ("client-unknown-resolver", "call", CLIENT_HEAD + 'conflict_resolver = "no_such_res"\n',
     ["conflict_resolver", "no_such_res"]),
    ("client-unknown-affinity", "call", CLIENT_HEAD + 'affinity = "no_such_policy"\n',
     ["affinity", "no_such_policy"]),
    ("status-unknown-key", "status", CLIENT_HEAD + "bogus_key = 1\n", ["bogus_key"]),
    ("server-unknown-key", "serve", SERVER_HEAD + "bogus_key = 1\n", ["bogus_key"]),
    ("server-wrong-type", "serve", SERVER_HEAD + 'max_in_flight = "many"\n',
     ["max_in_flight"]),
    ("server-unknown-transport", "serve", SERVER_HEAD + 'transport = "udp"\n',
     ["transport", "udp", "forkcore-transport-udp"]),
    ("invalid-toml", "call", "[client\nservers = 1\n", []),
]


@pytest.mark.parametrize(("command", "text", "words"),
                         [pytest.param(*c[1:], id=c[0]) for c in CONFIG_ERRORS])
def test_configuration_error(tmp_path: Path, command: str, text: str,
                             words: Sequence[str]) -> None:
    config = write(tmp_path / "bad.toml", text.format(port=free_port()))
    args = ["call", "-c", str(config), "test.counter", "k", "get"] if command == "call" \
        else [command, "-c", str(config)]
    started = time.monotonic()
    # the udp plugin may be installed: hide installed plugins to see the install hint
    env = cli_env(FORKCORE_DISABLE_PLUGIN_AUTOLOAD="1") if "udp" in words else None
    result = run_cli(*args, cwd=tmp_path, timeout=10, env=env)
    assert_one_line_error(result, str(config), *words)
    # a configuration error is found before anything connects or listens
    assert time.monotonic() - started < 8


@pytest.mark.parametrize("command", ["call", "serve", "status"])
def test_missing_configuration_file(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "no-such-file.toml"
    args = ["call", "-c", str(missing), "test.counter", "k", "get"] if command == "call" \
        else [command, "-c", str(missing)]
    assert_one_line_error(run_cli(*args, cwd=tmp_path, timeout=10), str(missing))


def test_serve_grain_module_that_does_not_import(tmp_path: Path) -> None:
    config = write(tmp_path / "server.toml",
                   '[server]\nid = "x"\ngrains = ["no_such_grains_module_xyz"]\n')
    result = run_cli("serve", "-c", str(config), cwd=tmp_path, timeout=10)
    assert_one_line_error(result, "grains", "no_such_grains_module_xyz")


def test_call_needs_a_client_table(tmp_path: Path) -> None:
    config = write(tmp_path / "server-only.toml", SERVER_HEAD)
    result = call(config, "test.counter", "k", "get")
    assert_one_line_error(result, str(config), "[client]")


# -- plugins and demo -------------------------------------------------------------------


def plugin_rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()]


def has_plugin(rows: list[list[str]], kind_word: str, name: str, distribution: str) -> bool:
    return any(name in row and distribution in row
               and any(kind_word in cell.lower() for cell in row) for row in rows)


def test_plugins_lists_builtins_and_tcp(tmp_path: Path) -> None:
    result = run_cli("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = plugin_rows(result.stdout)
    expected = [
        ("transport", "memory", "forkcore"),
        ("transport", "tcp", "forkcore-transport-tcp"),
        ("resolver", "highest_version", "forkcore"),
        ("resolver", "union", "forkcore"),
        ("resolver", "strict", "forkcore"),
        ("affinity", "none", "forkcore"),
    ]
    for kind_word, name, distribution in expected:
        assert has_plugin(rows, kind_word, name, distribution), \
            f"{kind_word} {name} ({distribution}) missing from:\n{result.stdout}"


def test_plugins_without_autoload_keeps_builtins(tmp_path: Path) -> None:
    result = run_cli("plugins", cwd=tmp_path,
                     env=cli_env(FORKCORE_DISABLE_PLUGIN_AUTOLOAD="1"))
    assert result.returncode == 0, result.stderr
    rows = plugin_rows(result.stdout)
    assert has_plugin(rows, "transport", "memory", "forkcore"), result.stdout
    assert has_plugin(rows, "resolver", "highest_version", "forkcore"), result.stdout
    assert not any("tcp" in row for row in rows), result.stdout


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("forkcore")
    found = str(script) if script.exists() else shutil.which("forkcore")
    if found is None:
        pytest.skip("no forkcore console script installed next to this Python")
    proc = subprocess.run([found, "plugins"], cwd=tmp_path, env=cli_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert has_plugin(plugin_rows(proc.stdout), "transport", "memory", "forkcore")


def test_demo(tmp_path: Path) -> None:
    result = run_cli("demo", cwd=tmp_path, timeout=30)
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    report = result.stdout
    assert len(lines(report)) >= 5, report
    assert "healthy" in report
    assert "s1" in report and "s2" in report, report


# -- the command line itself (issue 14) -------------------------------------------------


def test_version(tmp_path: Path) -> None:
    import forkcore

    result = run_cli("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"forkcore {forkcore.__version__}\n")


@pytest.mark.parametrize("flags_after", [False, True])
def test_global_flags_before_or_after_the_command(served: tuple[ServeProcess, Path],
                                                  flags_after: bool) -> None:
    _, config = served
    command = ["call", "-c", str(config), "test.counter", "flags", "get"]
    flags = ["--debug", "--loop", "trio"]
    result = run_cli(*(command + flags if flags_after else flags + command), cwd=config.parent)
    assert (result.returncode, result.stdout) == (0, "0\n"), result.stderr
    assert " INFO forkcore" in result.stderr  # --debug took effect wherever it was given


@pytest.mark.parametrize("command", ["serve", "call", "status", "plugins", "demo"])
def test_every_command_help_has_a_description_and_an_example(tmp_path: Path,
                                                             command: str) -> None:
    result = run_cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    usage, _, rest = text.partition("\n\n")
    assert usage.startswith(f"usage: forkcore {command}")
    assert rest.split("\n\n")[0].strip(), f"no description:\n{text}"
    assert f"example:\n  forkcore {command}" in text, text
    assert "--debug" in text and "--loop" in text  # the global flags work here too
    # every argument has its help, on its line or (a long one) on the next
    text_lines = text.splitlines()
    for i, line in enumerate(text_lines):
        if line.startswith("  ") and not line.startswith("   ") and \
                not line.startswith("  forkcore"):
            has_help = "  " in line.strip() or (
                i + 1 < len(text_lines) and text_lines[i + 1].startswith(" " * 10))
            assert has_help, f"argument without help: {line!r}\n{text}"


def test_call_help_shows_optional_arguments_as_optional(tmp_path: Path) -> None:
    result = run_cli("call", "--help", cwd=tmp_path)
    assert "interface key method [ARG ...]" in result.stdout
    missing = run_cli("call", cwd=tmp_path)
    line = assert_usage_error(missing, "-c/--config", "method")
    assert "ARG" not in line  # optional: not among the required arguments


@pytest.mark.parametrize(("args", "words"), [
    (["status", "-c", "x.toml", "--count", "2"], ["--count needs --watch"]),
    (["status", "-c", "x.toml", "--watch", "--count", "0"], ["--count must be at least 1"]),
    (["status", "-c", "x.toml", "--interval", "0"], ["--interval must be greater than 0"]),
    (["demo", "--players", "0"], ["--players must be at least 1"]),
])
def test_wrong_arguments_are_usage_errors(tmp_path: Path, args: list[str],
                                          words: list[str]) -> None:
    assert_usage_error(run_cli(*args, cwd=tmp_path), *words)


def test_misspelt_key_through_the_cli(tmp_path: Path) -> None:
    config = client_toml(tmp_path / "c.toml", free_port(), "request_timout = 2\n")
    result = call(config, "test.counter", "k", "get")
    assert_one_line_error(result, "unknown key 'request_timout'",
                          "did you mean 'request_timeout'?")


# -- status --watch while nothing answers, and what its columns mean --------------------


def test_status_watch_keeps_running_while_no_server_answers(tmp_path: Path) -> None:
    config = client_toml(tmp_path / "c.toml", free_port(), "connect_timeout = 0.5\n")
    result = run_cli("status", "-c", str(config), "--watch", "--interval", "0.1",
                     "--count", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stamps = [line for line in result.stdout.splitlines()
              if line.startswith("forkcore status at ")]
    assert len(stamps) == 3, result.stdout  # three refreshes, each with its time
    assert all(len(line.split()[-1].split(":")) == 3 for line in stamps), stamps
    rows = [line for line in result.stdout.splitlines() if "unreachable" in line
            and line.startswith("?")]
    assert len(rows) == 3 and all("cannot connect" in row for row in rows), result.stdout
    assert "trying again every 0.1s" in result.stdout


def test_status_without_watch_and_no_server_is_one_error(tmp_path: Path) -> None:
    config = client_toml(tmp_path / "c.toml", free_port(), "connect_timeout = 0.5\n")
    assert_one_line_error(run_cli("status", "-c", str(config), cwd=tmp_path), "ConnectError")


def test_status_watch_finds_a_server_that_starts_later(tmp_path: Path,
                                                        procs: list[Any]) -> None:
    port = free_port()
    config = client_toml(tmp_path / "c.toml", port, "connect_timeout = 0.5\n")
    watch = subprocess.Popen([*CLI, "status", "-c", str(config), "--watch", "--interval",
                              "0.2", "--count", "25"], cwd=tmp_path, env=cli_env(),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    procs.append(watch)
    time.sleep(0.5)  # a refresh or two with nothing there
    procs.append(start_server(tmp_path, "late", listen=f"127.0.0.1:{port}"))
    out, err = watch.communicate(timeout=RUN_TIMEOUT)
    assert watch.returncode == 0, err
    assert "unreachable" in out
    rows = [line for line in out.splitlines() if line.startswith("late ")]
    assert rows and "healthy" in rows[-1], out


def test_status_in_flight_is_the_servers_own(served: tuple[ServeProcess, Path],
                                             procs: list[Any]) -> None:
    server, config = served
    slow = subprocess.Popen([*CLI, "call", "-c", str(config), "test.counter", "busy", "sleep",
                             "3"], cwd=config.parent, env=cli_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    procs.append(slow)
    wait_in_flight(server.port, slow)
    result = run_cli("status", "-c", str(config), cwd=config.parent)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("SERVER"))
    row = next(line for line in result.stdout.splitlines() if line.startswith(server.id))
    column = header.index("IN FLIGHT")
    assert int(row[column:].split()[0]) >= 1, result.stdout  # the other process's call
    assert "calls running" in result.stdout  # the legend says what it counts


def test_demo_tells_one_story(tmp_path: Path) -> None:
    result = run_cli("demo", "--players", "60", cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr + result.stdout  # no log line in the narrative
    assert "said goodbye" in result.stdout  # the narrative says it instead
    assert "CALLS: served by each server since it started" in result.stdout
    assert "IN FLIGHT" not in result.stdout
    assert "docs/getting-started.md" in lines(result.stdout)[-1]


def test_status_watch_shows_a_stopping_server_draining(tmp_path: Path,
                                                       procs: list[Any]) -> None:
    server = start_server(tmp_path, "stopping")
    procs.append(server)
    config = client_toml(tmp_path / "c.toml", server.port)
    slow = subprocess.Popen([*CLI, "call", "-c", str(config), "test.counter", "k", "sleep",
                             "2"], cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(slow)
    wait_in_flight(server.port, slow)
    watch = subprocess.Popen([*CLI, "status", "-c", str(config), "--watch", "--interval",
                              "0.2", "--count", "12"], cwd=tmp_path, env=cli_env(),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    procs.append(watch)
    time.sleep(0.6)  # let the watch start (it may or may not see the server healthy)
    server.proc.send_signal(signal.SIGTERM)  # it says goodbye, then drains the slow call
    out, err = watch.communicate(timeout=RUN_TIMEOUT)
    assert watch.returncode == 0, err
    states = [line.split()[2] for line in out.splitlines() if line.startswith("stopping ")]
    assert "draining" in states, out
    rows = [line for line in out.splitlines() if line.startswith("stopping ")]
    assert not any("closed" in row for row in rows), out  # never "unhealthy ... closed"
    assert any("said goodbye" in row for row in rows if " draining " in row), out
    assert slow.wait(timeout=RUN_TIMEOUT) == 0  # the call in flight finished
