"""Reading a config: YAML, `a.b=value` overrides (YAML values), the typed tree built from them
with every unknown key and wrong type named; saving, hashing and diffing a config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from lmdistill.config.build import build
from lmdistill.config.checks import check_sections
from lmdistill.config.schema import ConfigError, RunConfig, TeacherConfig
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
    _read_listed_protocol(raw)
    config: RunConfig = build(RunConfig, raw, prefix="")
    return with_teacher_list(config)


def with_teacher_list(config: RunConfig) -> RunConfig:
    """`teachers:` read: a list of one is today's single `teacher:` (the same run, exactly);
    with several, `teacher` is the first of them (and must not say otherwise), and each
    teacher has a name."""
    if not config.teachers:
        return config
    if config.teacher != TeacherConfig() and config.teacher != config.teachers[0]:
        raise ConfigError(
            "teacher: set either teacher or teachers (a list whose first entry is the run's "
            "teacher), not both"
        )
    if len(config.teachers) == 1:
        return dataclasses.replace(config, teacher=config.teachers[0], teachers=[])
    named = [
        dataclasses.replace(t, name=t.name or f"teacher{i}") for i, t in enumerate(config.teachers)
    ]
    return dataclasses.replace(config, teacher=named[0], teachers=named)


def _read_listed_protocol(raw: dict[str, Any]) -> None:
    """Protocol methods and KD settings were once lists of `key.path=value` overrides, and
    every saved config.yaml holds them so: read that form as the sections it stands for."""
    protocol = raw.get("protocol")
    if not isinstance(protocol, dict):
        return
    methods = protocol.get("methods")
    if isinstance(methods, dict):
        for name, value in methods.items():
            if isinstance(value, list):
                where = f"protocol.methods.{name}"
                methods[name] = _listed_sections(value, where, only="select").get("select", {})
    if isinstance(protocol.get("kd"), list):
        protocol["kd"] = _listed_sections(protocol["kd"], "protocol.kd")


def _listed_sections(items: list[Any], where: str, only: str | None = None) -> dict[str, Any]:
    sections: dict[str, Any] = {}
    for item in items:
        prefix = f"{only}." if only else ""
        if not isinstance(item, str) or "=" not in item or not item.startswith(prefix):
            expected = f"{only}.key=value items" if only else "key.path=value items"
            raise ConfigError(
                f"{where}: {item!r} is not allowed; expected a mapping of fields (or a list of "
                f"{expected}, the older form)"
            )
        _apply_override(sections, item)
    return sections


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


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config (YAML) beside the outputs."""
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


# Settings that change no result (experiment tracking; recomputing activations and sharding
# over processes, tested to train identically): a run resumed with one changed is the same run.
OBSERVERS = (
    ("train", "report_to"),
    ("train", "tracking_dir"),
    ("train", "gradient_checkpointing"),
    ("train", "sharding"),
)


def config_hash(config: Any) -> str:
    """A short hash of the settings that differ from lmdistill's defaults: a new option whose
    default keeps the old behaviour leaves the hash (and so checkpoints, finished sweep runs
    and protocol arms) valid."""
    settings, defaults = to_dict(config), to_dict(type(config)())
    for section, key in OBSERVERS:  # where results are watched, not what they are
        for found in (settings, defaults):
            found.get(section, {}).pop(key, None)
    blob = json.dumps(changed_settings(settings, defaults), sort_keys=True)
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
