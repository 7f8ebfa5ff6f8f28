"""The plugin system through its public surface."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

import forkcore
from forkcore.errors import ConfigError, PluginNotFound
from forkcore.plugins import get_plugin_manager, registrations, registry


class FirstStrategy:
    def select(self, grain_id: forkcore.GrainId, servers: Sequence[forkcore.ServerView]) -> str:
        return servers[0].id


class ThirdPartyPlugin:
    @forkcore.hookimpl
    def forkcore_register_strategies(self, register: Any) -> None:
        register("first", FirstStrategy)


class ClashingPlugin:
    @forkcore.hookimpl
    def forkcore_register_transports(self, register: Any) -> None:
        register("memory", object)


@pytest.fixture
def registered() -> Iterator[Any]:
    pm = get_plugin_manager()
    plugins: list[Any] = []

    def register(plugin: Any, name: str) -> None:
        pm.register(plugin, name=name)
        plugins.append(plugin)

    yield register
    for plugin in plugins:
        pm.unregister(plugin)


def test_builtins_register_through_the_manager() -> None:
    assert {"memory"} <= set(registry("transport"))
    assert {"highest_version", "union", "strict"} <= set(registry("conflict_resolver"))
    assert "none" in registry("affinity_policy")
    sources = {(r.kind, r.name): r.source for k in ("transport", "conflict_resolver",
               "affinity_policy") for r in registrations(k)}
    assert sources[("transport", "memory")] == "forkcore"
    assert sources[("conflict_resolver", "strict")] == "forkcore"


def test_installed_tcp_plugin_is_loaded_from_its_entry_point() -> None:
    [tcp] = [r for r in registrations("transport") if r.name == "tcp"]
    assert tcp.source == "forkcore-transport-tcp"


def test_unknown_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown plugin kind"):
        registry("widget")


def test_plugin_object_registered_in_a_test_appears_and_builds(registered: Any) -> None:
    registered(ThirdPartyPlugin(), "third-party")
    assert registry("strategy")["first"] is FirstStrategy


def test_name_registered_twice_names_both_sources(registered: Any) -> None:
    registered(ClashingPlugin(), "clashing-dist")
    with pytest.raises(ConfigError, match=r"registered twice: by forkcore and by clashing-dist"):
        registry("transport")


def test_unknown_name_lists_installed_and_the_distribution_to_install() -> None:
    code = ("import forkcore\n"
            "try:\n"
            "    forkcore.Client(servers=['127.0.0.1:1'], transport='udp')\n"
            "except forkcore.errors.PluginNotFound as exc:\n"
            "    print(exc)\n")
    env = {**os.environ, "FORKCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    message = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert "pip install ./plugins/transport_udp" in message
    assert "transports installed: 'memory'" in message


def test_multi_mode_without_strategies_names_the_distribution() -> None:
    code = ("import forkcore\n"
            "try:\n"
            "    forkcore.Client(mode='multi', servers=['127.0.0.1:1'], transport='memory')\n"
            "except forkcore.errors.PluginNotFound as exc:\n"
            "    print(exc)\n")
    env = {**os.environ, "FORKCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "multi mode needs a strategy plugin" in out
    assert "pip install ./plugins/strategies" in out
    assert "key 'mode'" in out


def test_unknown_name_we_do_not_know_suggests_checking_spelling() -> None:
    with pytest.raises(PluginNotFound, match="check the spelling"):
        forkcore.Client(servers=["127.0.0.1:1"], transport="carrier-pigeon")


def test_bad_transport_options_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="transport_options"):
        forkcore.Client(servers=["127.0.0.1:1"], transport="tcp",
                        transport_options={"no_such_option": 1})


def test_disable_autoload_keeps_only_builtins() -> None:
    code = ("from forkcore.plugins import registry; "
            "print(sorted(registry('transport')))")
    env = {**os.environ, "FORKCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "['memory']"
    env.pop("FORKCORE_DISABLE_PLUGIN_AUTOLOAD")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "'tcp'" in out
