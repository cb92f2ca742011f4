"""Reading a config: YAML, `a.b=value` overrides (YAML values), the typed tree built from them
with every unknown key and wrong type named; saving, hashing and diffing a config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lmdistill.config.checks import check_sections
from lmdistill.config.schema import ConfigError, RunConfig
from lmdistill.io import atomic_write_text, read_utf8


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or the defaults when `path` is None), apply `a.b=value` overrides, build the
    typed tree and run each section's checks. `lmdistill.validate.load_config` also checks the
    names other packages register; commands load through it."""
    config = build_config(path, overrides)
    check_sections(config)
    return config


def build_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The typed tree from YAML and overrides: unknown keys and wrong types are errors; ranges
    are not checked yet."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(read_utf8(path)) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: {_yaml_problem(error)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping, got {type(loaded).__name__}"
            )
        raw = loaded
    for item in overrides or []:
        _apply_override(raw, item)
    config: RunConfig = _build(RunConfig, raw, prefix="")
    return config


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(
            f"override {item!r}: {_yaml_problem(error, line=False)} (quote a value that "
            "should stay text)"
        ) from None


def _yaml_problem(error: yaml.YAMLError, line: bool = True) -> str:
    """One line from a YAML error: what is wrong and where (line and column, 1-based)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return f"invalid YAML: {problem}"
    where = (
        f"line {mark.line + 1}, column {mark.column + 1}" if line else f"column {mark.column + 1}"
    )
    return f"invalid YAML at {where}: {problem}"


def _build(cls: type, raw: Any, prefix: str) -> Any:
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
        return _build(typing.cast(type, hint), value, name)
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


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config (YAML) beside the outputs."""
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def config_hash(config: Any) -> str:
    """A short hash of the settings that differ from lmdistill's defaults: a new option whose
    default keeps the old behaviour leaves the hash (and so checkpoints, finished sweep runs
    and protocol arms) valid."""
    settings = to_dict(config)
    blob = json.dumps(changed_settings(settings, to_dict(type(config)())), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def changed_settings(settings: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of `settings` (nested dicts) that are not equal to `defaults`."""
    changed: dict[str, Any] = {}
    for key, value in settings.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            inner = changed_settings(value, default)
            if inner:
                changed[key] = inner
        elif key not in defaults or value != default:
            changed[key] = value
    return changed
