"""What a new user trips over (issue 14), through the public API: relative paths in a
configuration file, where an unsendable value is, a server that said goodbye, plugin
names in messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest
from grains_sample import Counter, ICounter

import forkcore
from forkcore.errors import ConfigError, PluginNotFound

KEY = "0123456789abcdef0123456789abcdef"


# -- relative paths resolve against the configuration file's directory -----------------


def test_relative_psk_file_resolves_against_the_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    (conf / "secrets").mkdir(parents=True)
    (conf / "secrets" / "cluster.key").write_text(KEY)
    path = conf / "both.toml"
    path.write_text('[client]\nservers = ["127.0.0.1:1"]\ntransport = "memory"\n'
                    '[client.security]\npsk_file = "secrets/cluster.key"\n'
                    '[server]\nid = "s"\ntransport = "memory"\n'
                    '[server.security]\npsk_file = "secrets/cluster.key"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory has no secrets/
    config = forkcore.load_config(path)
    assert config.client is not None and config.server is not None
    expected = str(conf / "secrets" / "cluster.key")
    assert config.client.security.psk_file == expected
    assert config.server.security.psk_file == expected
    forkcore.Client.from_config(path)  # reads the key: no ConfigError
    forkcore.Server.from_config(path)


def test_plugin_file_options_resolve_and_absolute_ones_stay(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[client]\nservers = ["127.0.0.1:1"]\n'
                    '[client.transport_options]\nca_file = "certs/ca.pem"\n'
                    'cert_path = "/etc/absolute.pem"\nlabel = "not/a/path"\n'
                    '[client.observer_options.mine]\nlog_dir = "logs"\n')
    config = forkcore.load_config(path)
    assert config.client is not None
    options = config.client.transport_options
    assert options["ca_file"] == str(tmp_path / "certs" / "ca.pem")
    assert options["cert_path"] == "/etc/absolute.pem"
    assert options["label"] == "not/a/path"  # not a path option: untouched
    assert config.client.observer_options["mine"]["log_dir"] == str(tmp_path / "logs")


def test_tcp_cert_files_relative_to_the_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[server]\nid = "s"\n[server.transport_options]\n'
                    'cert_file = "missing-cert.pem"\n')
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(ConfigError) as info:
        forkcore.Server.from_config(path)
    assert str(tmp_path / "missing-cert.pem") in str(info.value)  # looked beside the file


def test_a_mapping_resolves_against_base_dir(tmp_path: Path) -> None:
    data = {"client": {"servers": ["127.0.0.1:1"], "security": {"psk_file": "k"}}}
    config = forkcore.load_config(data, base_dir=tmp_path)
    assert config.client is not None
    assert config.client.security.psk_file == str(tmp_path / "k")
    unresolved = forkcore.load_config(data)
    assert unresolved.client is not None and unresolved.client.security.psk_file == "k"


# -- misspelt keys ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "suggestion"), [
    ('[client]\nservers = ["127.0.0.1:1"]\nrequest_timout = 1\n', "'request_timeout'"),
    ('[client]\nservers = ["127.0.0.1:1"]\n[client.health]\nheartbeat_intervall = 1\n',
     "'heartbeat_interval'"),
    ('[clinet]\nservers = ["127.0.0.1:1"]\n', "'client'"),
])
def test_misspelt_key_suggests_the_closest(tmp_path: Path, text: str, suggestion: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}\\?"):
        forkcore.load_config(path)


def test_misspelt_plugin_name_suggests_the_closest() -> None:
    with pytest.raises(PluginNotFound, match="did you mean 'memory'"):
        forkcore.Client(servers=["127.0.0.1:1"], transport="memroy")


# -- install hints ----------------------------------------------------------------------


def _without_plugins(code: str) -> str:
    env = {**os.environ, "FORKCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=True).stdout


def test_install_hint_names_the_distribution_and_the_folder() -> None:
    out = _without_plugins(
        "import forkcore\n"
        "try:\n"
        "    forkcore.Client(servers=['127.0.0.1:1'], transport='memory', affinity='zone')\n"
        "except forkcore.errors.PluginNotFound as exc:\n"
        "    print(exc)\n")
    assert "distribution forkcore-strategies" in out
    assert "pip install ./plugins/strategies" in out
    assert "pip install forkcore-strategies" not in out
    assert "(affinity policies installed: 'none')" in out  # a name, not the word none


def test_multi_mode_without_a_strategy_says_what_it_needs() -> None:
    out = _without_plugins(
        "import forkcore\n"
        "try:\n"
        "    forkcore.Client(mode='multi', servers=['127.0.0.1:1'], transport='memory')\n"
        "except forkcore.errors.PluginNotFound as exc:\n"
        "    print(exc)\n")
    assert "multi mode needs a strategy plugin and none is installed" in out
    assert "'round_robin'" in out and "pip install ./plugins/strategies" in out
    assert "key 'strategy'" not in out  # the user wrote no strategy key


# -- values that cannot cross, a server that said goodbye -------------------------------


@pytest.mark.anyio
async def test_unsendable_value_names_its_path() -> None:
    async with forkcore.Server(id="s", transport="memory", grains=[Counter]) as server:
        async with forkcore.Client(servers=[server.endpoint or ""],
                                   transport="memory") as client:
            counter = client.get_grain(ICounter, "k")
            with pytest.raises(forkcore.WireTypeError) as info:
                await counter.echo({"a": [1, object()]})
            assert "a value of type object (at args[0]['a'][1]) cannot cross the wire" \
                in str(info.value)
            with pytest.raises(forkcore.WireTypeError, match=r"\(at kwargs\['value'\]\)"):
                await client.call("test.counter", "k", "echo", value={1, 2})


async def _host(server: forkcore.Server, stop: anyio.Event, *,
                task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
    async with server:
        task_status.started(server.endpoint or "")
        await stop.wait()


@pytest.mark.anyio
async def test_a_server_that_said_goodbye_is_draining() -> None:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        a = await tg.start(_host, forkcore.Server(id="a", transport="memory",
                                                  grains=[Counter]), anyio.Event())
        b = await tg.start(_host, forkcore.Server(id="b", transport="memory",
                                                  grains=[Counter], drain_timeout=0.5), stop)
        async with forkcore.Client(mode="multi", servers=[a, b], transport="memory",
                                   strategy="consistent_hash",
                                   reconnect_initial_delay=5.0) as client:
            stop.set()  # b stops in order: it says goodbye, drains, closes
            with anyio.fail_after(5):  # until b no longer answers: it has closed
                while "b" in await client.server_stats(timeout=0.2):
                    await anyio.sleep(0.01)
            view = next(v for v in client.servers if v.id == "b")
            assert view.state == "draining", view.last_error  # not "unhealthy ... closed"
            assert view.last_error is not None and "said goodbye" in view.last_error
            assert not view.healthy
        tg.cancel_scope.cancel()


# -- docs -------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_forkcore_testing_after_import_forkcore() -> None:
    code = ("import sys, forkcore\n"
            "assert 'pytest' not in sys.modules  # import forkcore stays light\n"
            "print(forkcore.testing.cluster.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "cluster"


def test_getting_started_shares_interfaces_and_needs_no_double_dash() -> None:
    text = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    assert "# interfaces.py" in text and "from interfaces import ICounter" in text
    assert "## Where the files go" in text
    assert " -- -" not in text


def test_operations_documents_the_unreachable_row() -> None:
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    assert "**unreachable** rows" in text and "`client.unreachable`" in text
