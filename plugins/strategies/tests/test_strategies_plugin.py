"""Registration through the entry point, and option checking through the factories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

import pytest
from forkcore_strategies import plugin

from forkcore.errors import ConfigError
from forkcore.plugins import create, get_plugin_manager, registrations

STRATEGIES = {"round_robin", "consistent_hash", "grain_type_affinity", "lowest_latency",
              "least_loaded"}
POLICIES = {"sticky", "zone"}


def test_entry_point_is_declared() -> None:
    [ep] = [e for e in entry_points(group="forkcore") if e.name == "strategies"]
    assert ep.value == "forkcore_strategies.plugin"
    assert ep.dist is not None and ep.dist.name == "forkcore-strategies"


_REGISTRY_SCRIPT = """
import json
from forkcore.plugins import registrations
print(json.dumps({k: {r.name: r.source for r in registrations(k)}
                  for k in ("strategy", "affinity_policy")}))
"""


def test_entry_point_registers_every_name() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FORKCORE_DISABLE_PLUGIN_AUTOLOAD"}
    out = subprocess.run([sys.executable, "-c", _REGISTRY_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    found = json.loads(out.stdout)
    assert {n: s for n, s in found["strategy"].items() if n in STRATEGIES} == \
        dict.fromkeys(STRATEGIES, "forkcore-strategies")
    assert {n: s for n, s in found["affinity_policy"].items() if n in POLICIES} == \
        dict.fromkeys(POLICIES, "forkcore-strategies")


@pytest.fixture
def loaded() -> Iterator[None]:
    """The plugin in this process's manager, even with autoload switched off."""
    pm = get_plugin_manager()
    added = not pm.is_registered(plugin)
    if added:
        pm.register(plugin, name="forkcore-strategies-test")
    yield
    if added:
        pm.unregister(plugin)


def test_registry_in_process(loaded: None) -> None:
    assert STRATEGIES <= {r.name for r in registrations("strategy")}
    assert POLICIES <= {r.name for r in registrations("affinity_policy")}


@pytest.mark.parametrize(("kind", "name", "options"), [
    ("strategy", "round_robin", {}),
    ("strategy", "round_robin", {"seed": 3}),
    ("strategy", "consistent_hash", {"vnodes": 100, "load_factor": 1.25}),
    ("strategy", "consistent_hash", {"load_factor": 2, "recount_every": 1}),
    ("strategy", "grain_type_affinity", {"mapping": {"game": "s1"}}),
    ("strategy", "lowest_latency", {"seed": "x", "decay": 5, "default_rtt": 0.01,
                                    "explore": 0}),
    ("strategy", "least_loaded", {"seed": 1}),
    ("affinity_policy", "sticky", {"max_grains": 10}),
    ("affinity_policy", "zone", {"zones": {"1": "eu"}, "default_zone": "us"}),
])
def test_good_options_build(loaded: None, kind: str, name: str, options: dict[str, Any]
                            ) -> None:
    obj = create(kind, name, options, "[client] options")
    assert hasattr(obj, "select" if kind == "strategy" else "affinity")


@pytest.mark.parametrize(("kind", "name", "options", "message"), [
    ("strategy", "consistent_hash", {"vnode": 10}, r"no option 'vnode' \(did you mean "
                                                   r"'vnodes'\?\); its options are: "),
    ("strategy", "round_robin", {"colour": 1}, r"no option 'colour'; its options are: seed$"),
    ("strategy", "consistent_hash", {"vnodes": 0},
     r"'vnodes' must be at least 1 and at most 65536, not 0"),
    ("strategy", "consistent_hash", {"vnodes": "many"}, r"'vnodes' must be an integer"),
    ("strategy", "consistent_hash", {"vnodes": True}, r"'vnodes' must be an integer"),
    ("strategy", "consistent_hash", {"load_factor": 0.5}, r"'load_factor' must be at least 1"),
    ("strategy", "consistent_hash", {"load_factor": "1.5"}, r"'load_factor' must be a finite"),
    ("strategy", "consistent_hash", {"load_factor": float("inf")}, r"finite number"),
    ("strategy", "consistent_hash", {"recount_every": 0}, r"'recount_every' must be at least"),
    ("strategy", "grain_type_affinity", {"mapping": ["game"]}, r"'mapping' must be a table"),
    ("strategy", "grain_type_affinity", {"mapping": {"game": 3}}, r"value for 'game'"),
    ("strategy", "lowest_latency", {"seed": 1.5}, r"'seed' must be an integer or a string"),
    ("strategy", "lowest_latency", {"explore": 0.9}, r"'explore' must be at least 0.0 and at "
                                                     r"most 0.5"),
    ("strategy", "lowest_latency", {"decay": 0}, r"'decay' must be greater than 0"),
    ("strategy", "lowest_latency", {"default_rtt": -1}, r"'default_rtt' must be greater"),
    ("strategy", "least_loaded", {"seed": [1]}, r"'seed' must be an integer"),
    ("affinity_policy", "sticky", {"max_grains": 0}, r"'max_grains' must be at least 1"),
    ("affinity_policy", "sticky", {"max_grain": 5}, r"did you mean 'max_grains'"),
    ("affinity_policy", "zone", {}, r"needs option 'zones'"),
    ("affinity_policy", "zone", {"zones": {"k": ""}}, r"value for 'k'"),
    ("affinity_policy", "zone", {"zone_of": "eu"}, r"'zone_of' must be a callable"),
    ("affinity_policy", "zone", {"default_zone": 5}, r"'default_zone' must be a non-empty"),
])
def test_bad_options_are_config_errors(loaded: None, kind: str, name: str,
                                       options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        create(kind, name, options, "client.toml: [client]")
    assert str(info.value).startswith("client.toml: [client]")  # the core names the place
    assert name in str(info.value)  # we name the plugin
