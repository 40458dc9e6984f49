"""Configs from plain data and back: YAML files, ``key=value`` overrides, type coercion with the
dotted key named in every error, and the plain dict a run folder's config.yaml holds."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from edgelam.config import RunConfig
from edgelam.config_checks import ConfigError
from edgelam.config_checks import require as _require


def _is_optional(tp: Any) -> tuple[bool, Any]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0]
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    optional, tp = _is_optional(tp)
    if value is None:
        _require(optional, key, f"must not be null (expected {getattr(tp, '__name__', tp)})", value)
        return None
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), key, "must be a mapping of settings", value)
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), key, "must be a list", value)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        _require(len(value) == len(args), key, f"must be a list of {len(args)} values", value)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        _require(isinstance(value, bool), key, "must be true or false", value)
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, "must be an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, "must be a number", value)
        _require(isinstance(value, float) or abs(value) < 2**1024, key, "must be a number that a float can hold (< 1.8e308)",
                 value)  # a longer integer has no float
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, "must be a string", value)
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key '{where}'; allowed keys here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, returning a copy."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. fl.rounds=5")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ConfigError(f"override '{item}': the value is not valid YAML ({exc})") from None
    return out


def config_from_dict(data: dict[str, Any], overrides: typing.Sequence[str] = ()) -> RunConfig:
    merged = apply_overrides(data, overrides)
    cfg: RunConfig = _build(RunConfig, merged)
    return cfg


def load_config(path: str | os.PathLike[str], overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config and apply ``key=value`` overrides."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' not found; `edgelam ls` lists the shipped configs")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{p}' is not UTF-8 text ({exc.reason} at byte {exc.start}); is it a YAML file?") from None
    except (yaml.YAMLError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"config file '{p}' is empty; start from one in configs/ (`edgelam ls` lists them)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of settings at the top level")
    return config_from_dict(data, overrides)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return typing.cast(dict[str, Any], plain(dataclasses.asdict(cfg)))
