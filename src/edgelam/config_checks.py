"""Config checks that name the dotted key and what is allowed (used by every config section)."""

from __future__ import annotations

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
