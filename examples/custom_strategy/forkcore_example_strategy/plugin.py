"""The hook implementations forkcore finds through the entry point
`[project.entry-points.forkcore] example = "forkcore_example_strategy.plugin"`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import forkcore

from .strategy import NAME, weighted_rendezvous

# register(name, factory): forkcore calls factory(**strategy_options) for each client
Register = Callable[[str, Callable[..., Any]], None]


@forkcore.hookimpl
def forkcore_register_strategies(register: Register) -> None:
    register(NAME, weighted_rendezvous)
