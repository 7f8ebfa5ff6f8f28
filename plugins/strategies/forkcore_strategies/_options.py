"""Option checking shared by the factories: every bad option is a `ConfigError` that names
the plugin, the option, what was given and what is expected."""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from forkcore.errors import ConfigError

T = TypeVar("T")


def factory(kind: str, name: str, cls: Callable[..., T]) -> Callable[..., T]:
    """A factory for `cls` that rejects unknown option names with a `ConfigError` listing
    the valid ones (and the nearest match), then lets `cls` check the values."""
    valid = sorted(
        p.name for p in inspect.signature(cls).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    )

    def make(**options: Any) -> T:
        unknown = sorted(set(options) - set(valid))
        if unknown:
            hints = [
                f"{u!r} (did you mean {close[0]!r}?)" if close else repr(u)
                for u in unknown
                for close in [difflib.get_close_matches(u, valid, n=1)]
            ]
            known = ", ".join(valid) if valid else "none"
            raise ConfigError(
                f"{kind} {name!r} has no option {', '.join(hints)}; its options are: {known}"
            )
        return cls(**options)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = cls.__doc__
    make.__wrapped__ = cls  # type: ignore[attr-defined]
    return make


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(owner: str, name: str, value: object, *, minimum: int,
              maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum]; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}: option {name!r} must be an integer, not {_describe(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(
            f"{owner}: option {name!r} must be at least {minimum}{upper}, not {value}"
        )
    return value


def check_number(owner: str, name: str, value: object, *, minimum: float,
                 maximum: float | None = None, exclusive_minimum: bool = False) -> float:
    """`value` as a finite float in the given range; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise ConfigError(
            f"{owner}: option {name!r} must be a finite number, not {_describe(value)}"
        )
    number = float(value)
    low_ok = number > minimum if exclusive_minimum else number >= minimum
    if not low_ok or (maximum is not None and number > maximum):
        low = f"greater than {minimum}" if exclusive_minimum else f"at least {minimum}"
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(f"{owner}: option {name!r} must be {low}{upper}, not {value}")
    return number


def check_seed(owner: str, value: object) -> int | str | None:
    """A seed for `random.Random`: None (fresh entropy), an int or a string."""
    if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
        return value
    raise ConfigError(
        f"{owner}: option 'seed' must be an integer or a string, not {_describe(value)}"
    )


def check_str(owner: str, name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{owner}: option {name!r} must be a non-empty string, "
                          f"not {_describe(value)}")
    return value


def check_str_mapping(owner: str, name: str, value: object, *,
                      key_types: tuple[type, ...] = (str,)) -> dict[Any, str]:
    """A mapping whose values are non-empty strings (a TOML table, or a dict in Python)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{owner}: option {name!r} must be a table (mapping), "
                          f"not {_describe(value)}")
    out: dict[Any, str] = {}
    for key, item in value.items():
        if isinstance(key, bool) or not isinstance(key, key_types):
            raise ConfigError(f"{owner}: option {name!r} has a key {_describe(key)}; keys "
                              f"must be {' or '.join(t.__name__ for t in key_types)}")
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{owner}: option {name!r}: the value for {key!r} must be a "
                              f"non-empty string, not {_describe(item)}")
        out[key] = item
    return out
