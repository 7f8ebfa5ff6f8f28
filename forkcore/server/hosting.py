"""Hosting: which grain classes a server runs, and what each (interface, method) needs.

Grains come from classes or module names (`[server] grains`); `host_table` checks them
for gaps and clashes once, at start, and `Targets` answers the per-call questions (is
it hosted, which role does it require, is it reentrant) with one dictionary lookup.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError
from ..grains import Grain, InterfaceSpec, is_reentrant
from ..security import Role, required_role


def find_grain_classes(grains: Iterable[Any], where: str = "grains") -> list[type[Grain]]:
    """Grain classes from a mix of classes and module names (or modules); errors start
    with `where` (e.g. "server.toml: [server] key 'grains'")."""
    found: list[type[Grain]] = []
    for item in grains:
        if isinstance(item, type):
            if not issubclass(item, Grain) or not item.__forkcore_interfaces__:
                raise ConfigError(f"{where}: {item.__qualname__} is not a Grain implementing "
                                  "a GrainInterface")
            found.append(item)
            continue
        module = item if isinstance(item, types.ModuleType) else _import(item, where)
        classes = [obj for obj in vars(module).values()
                   if isinstance(obj, type) and issubclass(obj, Grain)
                   and obj.__module__ == module.__name__ and obj.__forkcore_interfaces__
                   and not inspect.isabstract(obj)]
        if not classes:
            raise ConfigError(f"{where}: module {module.__name__!r} defines no Grain class "
                              "implementing a GrainInterface")
        found.extend(classes)
    return list(dict.fromkeys(found))


def _import(name: Any, where: str) -> types.ModuleType:
    """Import a grains module; say which of three things went wrong: the module itself
    is not found, something it imports is missing, or its code is broken."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: {name!r} is neither a module name nor a Grain class")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and not (name == missing or name.startswith(missing + ".")):
            raise ConfigError(f"{where}: module {name!r} imports {missing!r}, which is not "
                              f"installed: install it (pip install {missing.split('.')[0]}) "
                              "in the environment that runs the server") from None
        raise ConfigError(f"{where}: cannot import module {name!r}: {exc}; is it installed "
                          "or on PYTHONPATH (run from the directory that contains it, or set "
                          "PYTHONPATH)?") from None
    except SyntaxError as exc:
        raise ConfigError(f"{where}: module {name!r} has a syntax error at {exc.filename}, "
                          f"line {exc.lineno}: {exc.msg}") from None
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {name!r}: {exc}") from None
    except Exception as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        place = f" ({tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno})" if tb else ""
        raise ConfigError(f"{where}: importing module {name!r} raised "
                          f"{type(exc).__name__}: {exc}{place}") from None


def host_table(classes: Iterable[type[Grain]]) -> dict[str, tuple[InterfaceSpec, type[Grain]]]:
    """interface wire name → (spec, implementing class), checked for gaps and clashes."""
    hosted: dict[str, tuple[InterfaceSpec, type[Grain]]] = {}
    for cls in classes:
        for spec in cls.__forkcore_interfaces__:
            if spec.name in hosted and hosted[spec.name][1] is not cls:
                other = hosted[spec.name][1]
                raise ConfigError(f"interface {spec.name!r} is implemented by both "
                                  f"{other.__qualname__} and {cls.__qualname__}; host one")
            for method in spec.methods:
                impl = getattr(cls, method, None)
                if impl is None or impl is getattr(spec.cls, method):
                    raise ConfigError(f"{cls.__qualname__} does not implement {spec.name}."
                                      f"{method}")
            hosted[spec.name] = (spec, cls)
    return hosted


class Targets:
    """(interface, method) → (required role, reentrant), and why a miss is a miss."""

    def __init__(self, server_id: str,
                 hosted: Mapping[str, tuple[InterfaceSpec, type[Grain]]]) -> None:
        self.server_id = server_id
        self.hosted = hosted
        # one lookup per call
        self.table: dict[tuple[str, str], tuple[Role, bool]] = {
            (name, method): (required_role(spec.cls, getattr(spec.cls, method), cls,
                                           getattr(cls, method)), is_reentrant(cls, method))
            for name, (spec, cls) in hosted.items() for method in spec.methods}

    def get(self, key: tuple[str, str]) -> tuple[Role, bool] | None:
        return self.table.get(key)

    def explain(self, interface: str, method: str) -> str:
        """Why (interface, method) cannot be called here."""
        entry = self.hosted.get(interface)
        if entry is None:
            hosted = ", ".join(sorted(self.hosted)) or "none"
            return (f"server {self.server_id} hosts no interface {interface!r} (it hosts: "
                    f"{hosted}); check the interface name and the server's grains")
        if method not in entry[0].methods:
            return (f"interface {interface!r} has no method {method!r} (methods: "
                    f"{', '.join(sorted(entry[0].methods))})")
        return "not hosted"
