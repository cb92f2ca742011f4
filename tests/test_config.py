"""The config language: YAML + overrides, validated once, errors that name the field."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmdistill.config import ConfigError, RunConfig, save_config, to_dict
from lmdistill.validate import load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "accelerate"
) + sorted((ROOT / "lmdistill" / "configs").glob("*.yaml"))  # accelerate/: not run configs


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, RunConfig)
    # Nothing in the file is silently dropped: every key it sets survives into the tree.
    raw = yaml.safe_load(path.read_text())
    resolved = to_dict(config)
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert resolved[section][key] == value, f"{section}.{key}"


def test_demo_config_is_shipped_inside_the_package() -> None:
    assert (ROOT / "configs" / "demo.yaml").read_text() == (
        ROOT / "lmdistill" / "configs" / "demo.yaml"
    ).read_text()


def test_overrides_are_typed_and_nested() -> None:
    config = load_config(
        None,
        [
            "train.max_steps=7",
            "loss.alpha=0.25",
            "baseline=true",
            "student.path=null",
            "loss.divergence=reverse_kl",
        ],
    )
    assert config.train.max_steps == 7
    assert config.loss.alpha == 0.25
    assert config.baseline is True
    assert config.loss.divergence == "reverse_kl"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_stepz=3", "unknown key(s) train.max_stepz; allowed at train: max_steps"),
        ("nope=1", "unknown key(s) nope; allowed at the top level"),
        ("student.init=magic", "student.init: 'magic' is not allowed; choose one of"),
        ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
        ("train.max_steps=0", "train.max_steps: 0 is not allowed; expected an integer >= 1"),
        ("loss.alpha=1.5", "loss.alpha: 1.5 is not allowed; expected a number in [0, 1]"),
        ("loss.divergence=kl", "loss.divergence: 'kl' is not allowed; expected one of"),
        ("baseline=yes please", "baseline: expected true or false"),
        ("train=3", "train must be a mapping"),
        ("train.max_steps", "must look like key.path=value"),
        ("teacher.kind=remote", "teacher.kind: 'remote' is not allowed; expected one of"),
        ("teacher.kind=served", "teacher.base_url: None is not allowed; expected a value when"),
        ("teacher.extra_body=3", "teacher.extra_body: expected a mapping, got 3"),
        ("teacher.max_concurrency=0", "teacher.max_concurrency: 0 is not allowed"),
        ("data.on_empty=bogus", "data.on_empty: 'bogus' is not allowed; choose one of ['drop', "),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_unknown_key_in_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  temprature: 2.0\n")
    with pytest.raises(ConfigError, match=r"loss\.temprature; allowed at loss: .*temperature"):
        load_config(path)


def test_the_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "tiny.yaml", ["train.lr=0.01"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_loading_does_not_mutate_the_users_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n")
    load_config(path, ["train.max_steps=9"])
    assert path.read_text() == "train:\n  max_steps: 5\n"


def test_list_fields_are_typed_item_by_item() -> None:
    assert load_config(None, ["loss.layer_map=[2, 4]"]).loss.layer_map == [2, 4]
    with pytest.raises(ConfigError, match=r"loss.layer_map\[1\]: expected an integer"):
        load_config(None, ["loss.layer_map=[2, x]"])
    with pytest.raises(ConfigError, match=r"loss\.layer_map: expected a list"):
        load_config(None, ["loss.layer_map=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generate.enabled=false", "generate.enabled: False is not allowed; expected true with"),
        ("loss.temperature=2", "loss.temperature: 2.0 is not allowed; expected 1.0 with"),
        ("loss.hidden_weight=1", "feature losses need the teacher in memory"),
    ],
)
def test_a_served_teacher_refuses_what_it_cannot_give(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs" / "served.yaml", [override])


def test_exponent_floats_without_a_dot_are_numbers() -> None:
    # YAML 1.1 reads 4e-3 as a string; a learning rate written that way must still work.
    assert load_config(None, ["train.lr=4e-3"]).train.lr == 4e-3
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'fast'"):
        load_config(None, ["train.lr=fast"])


def test_no_default_changes_silently() -> None:
    """Config hashes (checkpoints, finished sweep runs, protocol arms) cover the settings that
    differ from the defaults, so a changed default would let old results pass for new ones.
    Changing one is a deliberate act: update tests/config_defaults.json and say in the README
    that earlier runs no longer resume. New options are fine (their default must keep the old
    behaviour)."""
    snapshot = json.loads((ROOT / "tests" / "config_defaults.json").read_text())

    def walk(saved: dict[str, Any], now: dict[str, Any], prefix: str) -> None:
        for key, value in saved.items():
            assert key in now, f"{prefix}{key} was removed"
            if isinstance(value, dict) and isinstance(now[key], dict) and value:
                walk(value, now[key], f"{prefix}{key}.")
            else:
                assert now[key] == value, f"the default of {prefix}{key} changed"

    walk(snapshot, to_dict(RunConfig()), "")
