"""The plugin manager, registries by kind, and plugin lookup with helpful errors.

Built-ins register through the same manager as installed plugins, so `forkcore plugins`
and `registry()` show them the same way.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import ConfigError, PluginNotFound

log = logging.getLogger("forkcore.plugins")

KINDS: dict[str, str] = {
    "transport": "forkcore_register_transports",
    "strategy": "forkcore_register_strategies",
    "conflict_resolver": "forkcore_register_conflict_resolvers",
    "affinity_policy": "forkcore_register_affinity_policies",
    "observer": "forkcore_register_observers",
    "authenticator": "forkcore_register_authenticators",
    "membership": "forkcore_register_membership",
    "storage": "forkcore_register_storage",
    "interceptor": "forkcore_register_interceptors",
}

# Names we know of that live in distributions which may not be installed.
KNOWN_DISTRIBUTIONS: dict[tuple[str, str], str] = {
    ("transport", "tcp"): "forkcore-transport-tcp",
    ("transport", "udp"): "forkcore-transport-udp",
    **{("strategy", n): "forkcore-strategies" for n in (
        "round_robin", "consistent_hash", "grain_type_affinity", "lowest_latency",
        "least_loaded")},
    ("affinity_policy", "sticky"): "forkcore-strategies",
    ("affinity_policy", "zone"): "forkcore-strategies",
    ("observer", "opentelemetry"): "forkcore-opentelemetry",
    ("interceptor", "opentelemetry"): "forkcore-opentelemetry",
    ("membership", "etcd"): "forkcore-membership-etcd",
    ("storage", "redis"): "forkcore-storage-redis",
}

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


@attrs.frozen
class Registration:
    kind: str
    name: str
    factory: Callable[..., Any]
    source: str  # the distribution (or plugin name) that registered it


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: built-ins, then entry points of group `forkcore`
    unless FORKCORE_DISABLE_PLUGIN_AUTOLOAD is set."""
    global _manager
    with _lock:
        if _manager is None:
            pm = pluggy.PluginManager("forkcore")
            pm.add_hookspecs(hookspecs)
            from . import builtins

            pm.register(builtins, name="forkcore")
            if os.environ.get("FORKCORE_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0"):
                _load_entry_points(pm)
            _manager = pm
        return _manager


_distributions: dict[int, str] = {}  # id(plugin object) -> distribution that installed it


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Load every entry point of group `forkcore`; one that fails to import is logged
    with its distribution and skipped, so it cannot break the others."""
    for ep in importlib.metadata.entry_points(group="forkcore"):
        dist = ep.dist.name if ep.dist is not None else "?"
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            log.error("forkcore plugin %r from distribution %s failed to load and is skipped "
                      "(%s: %s); reinstall or uninstall it", ep.name, dist,
                      type(exc).__name__, exc)
            continue
        _distributions[id(plugin)] = dist


def _source_names(pm: pluggy.PluginManager) -> dict[int, str]:
    sources = dict(_distributions)
    for name, plugin in pm.list_name_plugin():
        sources.setdefault(id(plugin), name or repr(plugin))
    return sources


def registrations(kind: str) -> list[Registration]:
    """Everything registered for `kind` now, in registration order."""
    if kind not in KINDS:
        raise ConfigError(f"unknown plugin kind {kind!r}: use one of {', '.join(KINDS)}")
    pm = get_plugin_manager()
    sources = _source_names(pm)
    hook = getattr(pm.hook, KINDS[kind])
    found: dict[str, Registration] = {}
    for impl in hook.get_hookimpls():  # in registration order: built-ins first
        source = sources.get(id(impl.plugin), impl.plugin_name)

        def register(name: str, factory: Callable[..., Any], _source: str = source) -> None:
            if not isinstance(name, str) or not name or not callable(factory):
                raise ConfigError(
                    f"plugin {_source} registered an invalid {kind}: {name!r} -> {factory!r}"
                )
            if name in found:
                raise ConfigError(
                    f"{kind} {name!r} is registered twice: by {found[name].source} and by "
                    f"{_source}; uninstall one of them"
                )
            found[name] = Registration(kind, name, factory, _source)

        impl.function(register=register)
    return list(found.values())


def registry(kind: str) -> Mapping[str, Callable[..., Any]]:
    """What is registered for `kind` now: name → factory."""
    return MappingProxyType({r.name: r.factory for r in registrations(kind)})


def lookup(kind: str, name: str) -> Callable[..., Any]:
    """The factory for `name`, or `PluginNotFound` listing what is installed and what to
    install."""
    regs = {r.name: r for r in registrations(kind)}
    if name in regs:
        return regs[name].factory
    installed = ", ".join(repr(n) for n in sorted(regs)) or "none"
    label = kind.replace("_", " ")
    plural = {"strategy": "strategies", "affinity_policy": "affinity policies"}.get(
        kind, label + "s")
    hint = install_hint(kind, str(name))
    advice = f"it {hint}" if hint else None
    if advice is None:
        close = difflib.get_close_matches(str(name), list(regs), n=1)
        advice = f"did you mean {close[0]!r}?" if close else \
            "check the spelling, or install the plugin that provides it"
    raise PluginNotFound(
        f"{label} {name!r} is not installed ({plural} installed: {installed}); {advice}"
    )


def install_hint(kind: str, name: str) -> str | None:
    """Where `name` comes from and how to install it ("comes with the distribution ...:
    install it ..."), or None if unknown. The plugins are not on a package index: they
    install from the folders of a forkcore checkout."""
    dist = KNOWN_DISTRIBUTIONS.get((kind, name))
    if dist is None:
        return None
    folder = checkout_folder(dist)
    return (f"comes with the distribution {dist}: install it from a forkcore checkout "
            f"with 'pip install ./{folder}'")


def checkout_folder(dist: str) -> str:
    """The folder of a forkcore checkout that holds distribution `dist`."""
    return "plugins/" + dist.removeprefix("forkcore-").replace("-", "_")


def create(kind: str, name: str, options: Mapping[str, Any] | None, where: str,
           name_key: str | None = None, options_key: str | None = None) -> Any:
    """Build the plugin `name` of `kind` with `options`. Errors name their place:
    `where` (file and table, e.g. "client.toml: [client]") and the key."""
    name_key = name_key or kind
    try:
        factory = lookup(kind, name)
    except PluginNotFound as exc:
        raise PluginNotFound(f"{where} key {name_key!r}: {exc}") from None
    place = f"{where} key {options_key!r}" if options_key else f"{where} key {name_key!r}"
    try:
        return factory(**dict(options or {}))
    except ConfigError as exc:
        raise ConfigError(f"{place}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{place}: {kind.replace('_', ' ')} {name!r} rejected its options: "
                          f"{exc}") from None


def create_interceptors(names: Sequence[Any], options: Mapping[str, Any],
                       where: str) -> list[Any]:
    """The interceptor objects for `names` (plugin names, or objects from Python)."""
    built = []
    for item in names:
        if not isinstance(item, str):
            if not callable(getattr(item, "intercept", None)):
                raise ConfigError(f"{where} key 'interceptors': {item!r} is neither an "
                                  "interceptor name nor an object with intercept()")
            built.append(item)
            continue
        extra = options.get(item, {})
        if not isinstance(extra, Mapping):
            raise ConfigError(f"{where} key 'interceptor_options': the options of {item!r} "
                              "must be a table")
        built.append(create("interceptor", item, extra, where, "interceptors",
                            "interceptor_options"))
    return built
