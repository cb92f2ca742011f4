"""Extension points are registries: a new divergence, objective, scorer, feature kind or
selector is one function and a decorator, the config validator accepts it by name and lists it
when a name is wrong, and nothing else needs editing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from lmdistill.config import ConfigError, ObjectiveConfig
from lmdistill.data import Example
from lmdistill.dd.select import SELECTORS, SelectorInputs, register_selector, select
from lmdistill.dd.stage import FEATURES, SCORERS, Pool, register_scorer, run_select
from lmdistill.kd.rationale import OBJECTIVES, apply_objective, register_objective
from lmdistill.losses import LOSSES, register_loss
from lmdistill.registry import Registry
from lmdistill.validate import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_registry_is_a_read_only_mapping_with_clear_errors() -> None:
    numbers: Registry[int] = Registry("number", "demo.number")
    numbers.register_as("one", lambda item: 1)(object())
    assert dict(numbers) == {"one": 1} and "one" in numbers and len(numbers) == 1
    with pytest.raises(ValueError, match="number 'one' is already registered"):
        numbers.register_as("one", lambda item: 2)(object())
    with pytest.raises(
        ValueError, match=r"demo.number: 'two' is unknown; expected one of \['one'\]"
    ):
        numbers.lookup("two")
    with pytest.raises(TypeError):
        numbers["two"] = 2  # type: ignore[index]
    numbers.unregister("one")
    assert len(numbers) == 0


@pytest.fixture
def temporary() -> Iterator[list[tuple[Registry[object], str]]]:
    """Entries a test registers, removed afterwards."""
    added: list[tuple[Registry[object], str]] = []
    yield added
    for registry, name in added:
        registry.unregister(name)


def test_every_extension_point_is_a_registry_the_validator_lists() -> None:
    cases = [
        (LOSSES, "loss.divergence=nope"),
        (OBJECTIVES, "objective.kind=nope"),
        (SCORERS, "select.scorer=nope"),
        (FEATURES, "select.features=nope"),
        (SELECTORS, "select.selector=nope"),
    ]
    for registry, override in cases:
        assert isinstance(registry, Registry) and len(registry) >= 2
        with pytest.raises(ConfigError) as error:
            load_config(None, [override])
        assert str(error.value) == (
            f"{registry.field}: 'nope' is not allowed; expected one of {sorted(registry)}"
        )


def test_a_new_selector_is_one_function(temporary, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    @register_selector("every_other")
    def every_other(inputs: SelectorInputs):  # type: ignore[no-untyped-def]
        order = iter(range(0, len(inputs.costs), 2))
        return order, lambda indices: {"skipped": len(inputs.costs) - len(indices)}

    temporary.append((SELECTORS, "every_other"))
    picked = select("every_other", costs=np.ones(10), budget=3, unit="examples")
    assert picked.indices == [0, 2, 4] and picked.info["skipped"] == 7
    config = _stage_config(tmp_path, "select.selector=every_other", "select.budget=5")
    summary = run_select(config)
    assert summary["selected"] == 5


def test_a_new_scorer_is_one_function(temporary, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    @register_scorer("prompt_chars", uses_model=False)
    def prompt_chars(config, pool: Pool, models):  # type: ignore[no-untyped-def]
        return np.array([len(e.messages[-1]["content"]) for e in pool.examples], np.float64)

    temporary.append((SCORERS, "prompt_chars"))
    config = _stage_config(
        tmp_path, "select.scorer=prompt_chars", "select.selector=top", "select.budget=4"
    )
    run_select(config)
    out = tmp_path / "run" / "select"
    values = np.load(out / "scores" / "score-prompt_chars" / "values.npy")
    ids = json.loads((out / "selection.json").read_text())["ids"]
    pool = load_pool_ids(config)
    assert ids == [pool[int(i)] for i in np.argsort(-values, kind="stable")[:4]]


def test_a_new_objective_and_divergence_are_one_function_each(temporary) -> None:  # type: ignore[no-untyped-def]
    @register_objective("shout")
    def shout(examples: list[Example], config: ObjectiveConfig) -> list[Example]:
        return [Example(e.id, e.messages, (e.response or "").upper()) for e in examples]

    @register_loss("half_forward_kl")
    def half_forward_kl(student: Tensor, teacher: Tensor, *, temperature: float = 1.0) -> Tensor:
        return 0.5 * LOSSES["forward_kl"](student, teacher, temperature=temperature)

    temporary += [(OBJECTIVES, "shout"), (LOSSES, "half_forward_kl")]
    config = load_config(None, ["objective.kind=shout", "loss.divergence=half_forward_kl"])
    made = apply_objective(
        [Example("a", ({"role": "user", "content": "q"},), "yes")], config.objective
    )
    assert made[0].response == "YES"
    logits = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(LOSSES["half_forward_kl"](*logits), 0.5 * LOSSES["forward_kl"](*logits))


def _stage_config(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return load_config(
        ROOT / "configs" / "dd" / "tiny-protocol.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            "data.train=lab:train:40:0:steps=2",
            "select.budget_unit=examples",
            *overrides,
        ],
    )


def load_pool_ids(config) -> list[str]:  # type: ignore[no-untyped-def]
    from lmdistill.dd.stage import Models, load_pool

    return [e.id for e in load_pool(config, Models(config).tokenizer).examples]


def test_a_new_teacher_backend_is_one_function(temporary, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lmdistill.pipeline import teacher_directories
    from lmdistill.teachers.backends import TEACHERS, register_teacher
    from lmdistill.teachers.setup import TEACHERS as SEEN_BY_SETUP
    from lmdistill.teachers.setup import open_teacher

    opened = []

    def refuse_features(config) -> None:  # type: ignore[no-untyped-def]
        if config.loss.hidden_weight:
            raise ConfigError("loss.hidden_weight: not with teacher.kind=local_twin")

    @register_teacher(
        "local_twin",
        generating=TEACHERS["local"].generating,
        check=refuse_features,
        in_process=True,
        caches_signal=True,
        writes_text=True,
        scores_text=True,
    )
    def open_twin(config, write_local_cache: bool):  # type: ignore[no-untyped-def]
        opened.append(config.teacher.kind)
        return TEACHERS["local"].open(config, write_local_cache)

    temporary.append((TEACHERS, "local_twin"))
    assert SEEN_BY_SETUP is TEACHERS
    tiny = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="local_twin"):
        load_config(tiny, ["teacher.kind=local_twin", "loss.hidden_weight=1"])
    config = load_config(tiny, ["teacher.kind=local_twin", f"output_dir={tmp_path}"])
    assert tmp_path / "teacher_cache" in teacher_directories(config)
    setup = open_teacher(config)
    assert opened == ["local_twin"] and set(setup.signal) == {"train", "eval"}


def test_every_teacher_backend_honours_what_it_claims() -> None:
    """A backend is a `Teacher` (scores sequences) and/or a `ResponseWriter` (writes
    responses), with every method of each implemented: none only raises (the served
    teacher's `score` once did; its signal is the cache it writes)."""
    import ast
    import inspect

    from lmdistill.teachers import base

    claims = {
        base.LocalTeacher: (True, True),
        base.CachedTeacher: (True, True),
        base.ServedTeacher: (False, True),
    }
    for cls, (scores, writes) in claims.items():
        assert not inspect.isabstract(cls), cls
        assert issubclass(cls, base.Teacher) == scores, cls
        assert issubclass(cls, base.ResponseWriter) == writes, cls
    tree = ast.parse(Path(base.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in {c.__name__ for c in claims}:
            for method in node.body:
                if isinstance(method, ast.FunctionDef):
                    body = [s for s in method.body if not isinstance(s, ast.Expr)]
                    only_raises = len(body) == 1 and isinstance(body[0], ast.Raise)
                    assert not only_raises, f"{node.name}.{method.name} only raises"
