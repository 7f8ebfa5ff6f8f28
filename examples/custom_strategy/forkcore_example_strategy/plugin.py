"""The hook implementations forkcore finds through the entry point
`[project.entry-points.forkcore] example = "forkcore_example_strategy.plugin"`."""

from __future__ import annotations

import forkcore
from forkcore.interfaces import RegisterStrategy

from .strategy import NAME, weighted_rendezvous


# register(name, factory): forkcore calls factory(**strategy_options) for each client;
# mypy checks that what the factory returns is a forkcore.interfaces.Strategy
@forkcore.hookimpl
def forkcore_register_strategies(register: RegisterStrategy) -> None:
    register(NAME, weighted_rendezvous)
