"""Configuration files and keyword options: valid ones load, bad ones say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

import forkcore
from forkcore.errors import ConfigError, PluginNotFound

GOOD = """
[client]
mode = "single"
transport = "tcp"
servers = ["127.0.0.1:11111", "127.0.0.1:11112"]
strategy = "round_robin"
conflict_resolver = "highest_version"
affinity = "none"
connections_per_server = 2
request_timeout = 3
connect_timeout = 1.5

[client.strategy_options]
[client.transport_options]
[client.health]
heartbeat_interval = 0.5
unhealthy_after = 4

[server]
id = "s1"
listen = "127.0.0.1:11111"
transport = "tcp"
grains = ["grains_sample"]
zone = "eu-1"
metadata = { service = "game" }
[server.transport_options]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "forkcore.toml"
    path.write_text(text)
    return path


def test_contract_example_loads(tmp_path: Path) -> None:
    config = forkcore.load_config(write(tmp_path, GOOD))
    assert config.client is not None and config.server is not None
    assert config.client.servers == ["127.0.0.1:11111", "127.0.0.1:11112"]
    assert config.client.request_timeout == 3.0
    assert config.client.health.unhealthy_after == 4
    assert config.server.zone == "eu-1"
    assert config.server.metadata == {"service": "game"}


def test_either_table_may_be_missing(tmp_path: Path) -> None:
    config = forkcore.load_config(write(tmp_path, '[server]\nid = "x"\n'))
    assert config.client is None and config.server is not None
    assert config.server.listen == "127.0.0.1:0"


@pytest.mark.parametrize(("text", "fragment"), [
    ('[client]\nservers = ["127.0.0.1:1"]\nbogus = 1\n', "unknown key 'bogus'"),
    ('[client]\nservers = ["127.0.0.1:1"]\nrequest_timeout = "fast"\n',
     "'request_timeout' must be"),
    ('[client]\nservers = ["127.0.0.1:1"]\nrequest_timeout = -1\n', "greater than 0"),
    ('[client]\nservers = ["127.0.0.1:1"]\nmode = "many"\n', "'mode' must be one of"),
    ('[client]\nservers = ["nohostport"]\n', "'servers'"),
    ('[client]\nservers = []\n', "'servers' must list"),
    ("[client]\n", "'servers' is required"),
    ('[client]\nservers = ["127.0.0.1:1"]\n[client.health]\nunhealthy_after = 0\n',
     "'unhealthy_after'"),
    ('[client]\nservers = ["127.0.0.1:1"]\n[client.health]\nnope = 1\n', "unknown key 'nope'"),
    ('[client]\nservers = ["127.0.0.1:1"]\nconnections_per_server = true\n',
     "'connections_per_server' must be"),
    ("[server]\nlisten = '127.0.0.1:0'\n", "'id' is required"),
    ('[server]\nid = "s"\nlisten = "127.0.0.1:99999"\n', "'listen'"),
    ('[server]\nid = "s"\ngrains = "mod"\n', "'grains' must be"),
    ('[clients]\nservers = []\n', "unknown table [clients]"),
    ("[client\n", "not valid TOML"),
])
def test_bad_files_name_the_file_and_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        forkcore.load_config(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        forkcore.load_config(tmp_path / "absent.toml")


def test_plugin_names_resolve_when_the_client_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(forkcore.plugins.KNOWN_DISTRIBUTIONS, ("transport", "carrier"),
                        "forkcore-transport-carrier")
    path = write(tmp_path, '[client]\nservers = ["127.0.0.1:1"]\ntransport = "carrier"\n')
    with pytest.raises(PluginNotFound) as info:
        forkcore.Client.from_config(path)
    assert "distribution forkcore-transport-carrier" in str(info.value)
    assert "pip install ./plugins/transport_carrier" in str(info.value)
    assert str(path) in str(info.value) and "key 'transport'" in str(info.value)


def test_from_config_needs_its_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nid = "s"\n')
    with pytest.raises(ConfigError, match="no \\[client\\] table"):
        forkcore.Client.from_config(path)
    with pytest.raises(ConfigError, match="no \\[server\\] table"):
        forkcore.Server.from_config({"client": {"servers": ["127.0.0.1:1"]}})


def test_server_grain_modules_are_imported(tmp_path: Path) -> None:
    server = forkcore.Server.from_config({"server": {"id": "s", "grains": ["grains_sample"],
                                                     "transport": "memory"}})
    assert "test.counter" in server.interfaces and "test.gate" in server.interfaces
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        forkcore.Server.from_config({"server": {"id": "s", "grains": ["no_such_module"]}})
    with pytest.raises(ConfigError, match="defines no Grain class"):
        forkcore.Server.from_config({"server": {"id": "s", "grains": ["json"]}})


def test_keyword_options_get_the_same_checks() -> None:
    with pytest.raises(ConfigError, match="'request_timeout' must be greater than 0"):
        forkcore.Client(servers=["127.0.0.1:1"], transport="memory", request_timeout=0)
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        forkcore.Client(servers=["127.0.0.1:1"], transport="memory", colour="blue")
    with pytest.raises(ConfigError, match="'unhealthy_after'"):
        forkcore.Client(servers=["127.0.0.1:1"], transport="memory",
                        health={"unhealthy_after": -1})
    with pytest.raises(ConfigError, match="'id' must be"):
        forkcore.Server(id=3, transport="memory")  # type: ignore[arg-type]


def test_interface_definition_errors() -> None:
    with pytest.raises(ConfigError, match="must be 'async def'"):
        class IBad(forkcore.GrainInterface):
            def sync(self) -> None: ...

    with pytest.raises(ConfigError, match="version= must be an int"):
        class IBadVersion(forkcore.GrainInterface, version=0):
            pass

    with pytest.raises(ConfigError, match="delivery"):
        forkcore.rpc(delivery="carrier")


def test_unimplemented_method_is_refused_by_the_server() -> None:
    class IHalf(forkcore.GrainInterface, name="half"):
        async def one(self) -> int: ...
        async def two(self) -> int: ...

    class Half(forkcore.Grain, IHalf):
        async def one(self) -> int:
            return 1

    with pytest.raises(ConfigError, match=r"does not implement half\.two"):
        forkcore.Server(id="s", transport="memory", grains=[Half])


def test_two_grains_for_one_interface_are_refused() -> None:
    class IOne(forkcore.GrainInterface, name="one"):
        async def f(self) -> int: ...

    class A(forkcore.Grain, IOne):
        async def f(self) -> int:
            return 1

    class B(forkcore.Grain, IOne):
        async def f(self) -> int:
            return 2

    with pytest.raises(ConfigError, match="implemented by both"):
        forkcore.Server(id="s", transport="memory", grains=[A, B])
