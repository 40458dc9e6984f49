"""Config checks that name the dotted key and what is allowed (used by every config section)."""

from __future__ import annotations

import contextlib
import math
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule} (got {value!r})")


def one_of(value: Any, key: str, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    require(value in allowed, key, f"must be one of {allowed}", value)


def number(data: dict[str, Any], key: str, default: float | None, minimum: float, where: str, integer: bool = False,
            strict: bool = False) -> Any:
    """``data[key]`` (``default`` when absent; None: required) as an int / float >= ``minimum`` (> when
    ``strict``), or a ConfigError naming the key."""
    value: Any = data.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: {key} is required")
    if isinstance(value, str):  # YAML 1.1 reads 1.0e11 (no sign in the exponent) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (not integer or float(value).is_integer()))
    if not ok or (value <= minimum if strict else value < minimum):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: {key} must be {kind} {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return int(value) if integer else float(value)
