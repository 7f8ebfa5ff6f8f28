"""`forkcore call` takes keyword arguments as NAME=JSON, after the positional ones."""

from __future__ import annotations

from pathlib import Path

from serving import ServeProcess
from test_cli import assert_usage_error, call, call_ok, run_cli, served

__all__ = ["served"]  # the fixture, shared with test_cli


def test_keyword_arguments_reach_the_grain(served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    assert call_ok(config, "test.counter", "kw", "add", "amount=4") == 4
    assert call_ok(config, "test.counter", "kw", "add", "amount=-1") == 3
    assert call_ok(config, "test.counter", "kw", "echo", 'value={"a": [1, "b"]}') == \
        {"a": [1, "b"]}


def test_a_positional_argument_after_a_keyword_is_a_usage_error(
        served: tuple[ServeProcess, Path]) -> None:
    _, config = served
    assert_usage_error(call(config, "test.counter", "k", "add", "amount=1", "2"),
                       "after a keyword argument")
    assert_usage_error(call(config, "test.counter", "k", "add", "amount=1", "amount=2"),
                       "given twice")
    assert_usage_error(call(config, "test.counter", "k", "add", "amount=five"), "five")


def test_call_help_shows_keyword_arguments(tmp_path: Path) -> None:
    result = run_cli("call", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "NAME=JSON" in result.stdout and "count=3" in result.stdout
