"""The typed config tree built from plain mappings (YAML, overrides, partial sections), with
every unknown key and wrong type named; and partial sections applied to a built tree."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

from lmdistill.config.schema import ConfigError

T = TypeVar("T")


def updated(config: T, changes: dict[str, Any], where: str) -> T:
    """`config` (a config dataclass) with `changes` applied: a partial section, nested
    mappings for nested sections (`{loss: {alpha: 0.5}}`), every key and type checked as in
    a config file, errors naming the field under `where`."""
    if not isinstance(changes, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {changes!r}")
    raw = _merged(config, changes)
    result: T = build(type(config), raw, prefix=where)
    return result


def _merged(config: Any, changes: dict[str, Any]) -> dict[str, Any]:
    """`config` as a mapping with `changes` applied: a mapping for a nested section is
    merged into it; any other value (a mapping-valued field such as teacher.extra_body
    included) replaces the field's."""
    out = dataclasses.asdict(config)
    for key, value in changes.items():
        section = getattr(config, key, None)
        if isinstance(value, dict) and dataclasses.is_dataclass(section):
            out[key] = _merged(section, value)
        else:
            out[key] = value
    return out


def build(cls: type, raw: Any, prefix: str) -> Any:
    """`cls` (a config dataclass) from a mapping: every unknown key and wrong type is a
    ConfigError naming the field under `prefix`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix or "the top level"
        raise ConfigError(
            f"unknown key(s) {', '.join(_join(prefix, k) for k in unknown)}; "
            f"allowed at {where}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(typing.cast(type, hint), value, name)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, name)
        for option in inner:  # the first option that takes the value
            try:
                return _coerce(option, value, name)
            except ConfigError:
                continue
        kinds = " or ".join(getattr(o, "__name__", str(o)) for o in inner)
        raise ConfigError(f"{name}: {value!r} is not allowed; expected {kinds}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `4e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
