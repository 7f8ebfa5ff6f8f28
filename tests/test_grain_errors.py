"""What a server says about grain modules that fail to import or host nothing: real
`forkcore serve` processes, one line on stderr, exit 1 (a configuration error)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from serving import CLI, cli_env, write

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes")


def serve(tmp_path: Path, grains: str, *, until_ready: bool = False
          ) -> subprocess.CompletedProcess[str]:
    config = write(tmp_path / "server.toml",
                   f'[server]\nid = "g"\nlisten = "127.0.0.1:0"\ngrains = {grains}\n')
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}"
    if until_ready:  # a server that starts: read its log up to the ready line, then stop it
        proc = subprocess.Popen([*CLI, "serve", "-c", str(config)], cwd=tmp_path, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline()
        finally:
            proc.terminate()
        out, err = proc.communicate(timeout=15)
        return subprocess.CompletedProcess(proc.args, 0, ready + out, err)
    return subprocess.run([*CLI, "serve", "-c", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=20,
                          stdin=subprocess.DEVNULL)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    context = f"exit {result.returncode}\nstderr: {result.stderr!r}"
    assert result.returncode == 1, context  # a ConfigError, not "unexpected error" (2)
    assert "Traceback" not in result.stderr, context
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, context
    return errors[0]


def test_a_missing_dependency_is_named(tmp_path: Path) -> None:
    write(tmp_path / "needs_dep.py", "import no_such_dependency_xyz  # noqa\n")
    line = one_error_line(serve(tmp_path, '["needs_dep"]'))
    assert "server.toml: [server] key 'grains'" in line
    assert "imports 'no_such_dependency_xyz', which is not installed" in line
    assert "directory that contains it" not in line


def test_a_missing_grains_module_says_where_to_run_from(tmp_path: Path) -> None:
    line = one_error_line(serve(tmp_path, '["no_such_grains_xyz"]'))
    assert "cannot import module 'no_such_grains_xyz'" in line
    assert "PYTHONPATH" in line


def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "broken_grains.py", "import forkcore\n\ndef oops(:\n    pass\n")
    line = one_error_line(serve(tmp_path, '["broken_grains"]'))
    assert "key 'grains'" in line and "syntax error" in line
    assert "broken_grains.py, line 3" in line


def test_code_that_raises_at_import_names_the_error_and_line(tmp_path: Path) -> None:
    write(tmp_path / "raising_grains.py", "x = 1\nraise RuntimeError('no config here')\n")
    line = one_error_line(serve(tmp_path, '["raising_grains"]'))
    assert "raised RuntimeError: no config here" in line
    assert "raising_grains.py, line 2" in line


def test_a_server_hosting_no_grains_warns(tmp_path: Path) -> None:
    result = serve(tmp_path, "[]", until_ready=True)
    assert "hosts no grains" in result.stderr, result.stderr
