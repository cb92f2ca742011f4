"""The data-efficiency protocol: its plan, a whole run on tiny models, and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lmdistill import protocol
from lmdistill.config import ConfigError, changed_settings, config_hash
from lmdistill.metrics import EvalMetrics, FidelityMetrics, TaskMetrics
from lmdistill.protocol import run as running
from lmdistill.report.protocol import render_protocol
from lmdistill.validate import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dd" / "tiny-protocol.yaml"
# One budget, one random seed, no methods: the full arms, random and random+KD.
SMALL = [
    "protocol.budgets=[0.1]",
    "protocol.seeds=1",
    "protocol.methods={}",
    "protocol.kd_methods=false",
    "protocol.condense=[]",
    "protocol.token_matched_budgets=[]",
]


def test_plan_covers_every_arm_once() -> None:
    config = load_config(CONFIG, ["protocol.full_steps=12"])
    arms = protocol.plan(config)
    names = [(a.name, a.budget, a.seed) for a in arms]
    assert len(names) == len(set(names))
    assert names[:2] == [("full", None, 0), ("full@12", None, 0)]
    for budget in (0.1, 0.25):
        assert {s for n, b, s in names if n == "random" and b == budget} == {0, 1}
        for name in ("longest", "kcenter-hidden", "random+KD", "longest+KD"):
            assert (name, budget, 0) in names
    assert ("random~longest", 0.1, 0) in names and ("random~longest", 0.25, 0) not in names
    assert names.index(("random~longest", 0.1, 0)) > names.index(("longest", 0.1, 0))
    # Condensation only at the small budget.
    assert ("condensed-dm", 0.1, 0) in names and ("condensed-dm", 0.25, 0) not in names
    kd = protocol.arm_config(config, protocol.Arm("method", 0.1, 0, True, "longest"), Path("/o"))
    assert kd.loss.alpha == 0.5 and kd.teacher.kind == "cache"
    assert (kd.select.scorer, kd.select.selector, kd.select.budget) == ("length", "top", 0.1)
    plain = protocol.arm_config(config, protocol.Arm("random", 0.1, 1, False), Path("/o"))
    assert plain.loss.alpha == 1.0 and plain.select.seed == 1 and plain.train.seed == 1
    assert plain.select.selector == "random" and plain.select.scorer is None


def test_methods_run_more_seeds_where_asked_before_the_kd_arms() -> None:
    config = load_config(CONFIG, ["protocol.method_seeds=3", "protocol.method_seed_budgets=[0.25]"])
    names = [(a.name, a.budget, a.seed) for a in protocol.plan(config)]
    assert len(names) == len(set(names))
    for method in ("longest", "kcenter-hidden"):
        assert {s for n, b, s in names if n == method and b == 0.25} == {0, 1, 2}
        assert {s for n, b, s in names if n == method and b == 0.1} == {0}
    assert max(names.index(("longest", 0.25, s)) for s in (1, 2)) < min(
        i for i, (n, _, _) in enumerate(names) if n in ("random+KD", "longest+KD")
    )
    everywhere = load_config(CONFIG, ["protocol.method_seeds=2"])
    seeded = {(a.name, a.budget) for a in protocol.plan(everywhere) if a.seed == 1}
    assert ("longest", 0.1) in seeded and ("longest", 0.25) in seeded
    assert ("random~longest", 0.1) not in seeded and ("longest+KD", 0.1) not in seeded


def _record(name: str, budget: float | None, seed: int, accuracy: float) -> dict[str, Any]:
    return {
        "name": name,
        "method": name.removesuffix("+KD"),
        "kd": name.endswith("+KD"),
        "budget": budget,
        "seed": seed,
        "accuracy": accuracy,
        "train_seconds": 1.0,
        "condense_seconds": 0.0,
    }


def test_verdicts_pick_the_best_method_and_judge_both_bars() -> None:
    config = load_config(CONFIG, ["protocol.budgets=[0.1]", "protocol.method_seeds=2"])
    records = [_record("full", None, 0, 0.80)]
    records += [_record("random", 0.1, s, a) for s, a in enumerate((0.50, 0.60))]  # 0.55 ± 0.071
    records += [_record("longest", 0.1, s, a) for s, a in enumerate((0.76, 0.80))]  # 0.78
    records += [_record("kcenter-hidden", 0.1, s, a) for s, a in enumerate((0.70, 0.74))]  # 0.72
    records += [_record("condensed-dm", 0.1, 0, 0.40)]
    summary = protocol.summarise(config, records, protocol.plan(config))
    best, condensed = summary["verdicts"]
    assert (best["kind"], best["method"], best["n"]) == ("selection", "longest", 2)
    assert best["of_full"] == pytest.approx(0.78 / 0.80)
    assert best["reaches_95_of_full"] is True  # 0.78 >= 0.76
    assert best["beats_random_by_1_std"] is True  # 0.78 - 0.55 > 0.0707
    assert (condensed["method"], condensed["reaches_95_of_full"]) == ("condensed-dm", False)
    assert condensed["beats_random_by_1_std"] is False
    # One lucky run does not compete with methods that ran every seed (the best of several
    # single runs is biased upwards): longest's second seed missing, k-center (0.72) is best.
    del records[4]
    again = protocol.summarise(config, records, protocol.plan(config))["verdicts"][0]
    assert (again["method"], again["n"], again["reaches_95_of_full"]) == (
        "kcenter-hidden",
        2,
        False,
    )
    assert again["mean"] == pytest.approx(0.72) and again["beats_random_by_1_std"] is True
    md = render_protocol(protocol.summarise(config, records, protocol.plan(config)))
    assert (
        "| 10% | selection | kcenter-hidden | 0.720 ± 0.028 (n=2) | 90% | 0.550 ± 0.071 "
        "| no | yes |" in md
    )


def test_kd_for_all_none_or_the_listed_methods() -> None:
    def kd_arms(value: str) -> set[str]:
        config = load_config(CONFIG, [f"protocol.kd_methods={value}"])
        return {a.name for a in protocol.plan(config) if a.kd and a.kind != "random"}

    assert kd_arms("true") == {"longest+KD", "kcenter-hidden+KD", "condensed-dm+KD"}
    assert kd_arms("false") == {"condensed-dm+KD"}
    assert kd_arms("[longest]") == {"longest+KD", "condensed-dm+KD"}


def test_protocol_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"protocol\.budgets"):
        load_config(CONFIG, ["protocol.budgets=[0.1,1.5]"])
    with pytest.raises(ConfigError, match=r"protocol\.methods\.random-ish"):
        load_config(CONFIG, ["protocol.methods={random-ish: {selector: top}}"])
    with pytest.raises(ConfigError, match=r"protocol\.methods\.top: 'loss.alpha=1' is not"):
        load_config(CONFIG, ["protocol.methods={top: [select.selector=top, loss.alpha=1]}"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) protocol\.methods\.top\.scorr"):
        load_config(CONFIG, ["protocol.methods={top: {scorr: ifd}}"])
    with pytest.raises(ConfigError, match=r"protocol\.kd\.loss\.alpha: expected a number"):
        load_config(CONFIG, ["protocol.kd={loss: {alpha: high}}"])
    with pytest.raises(ConfigError, match=r"protocol\.condense"):
        load_config(CONFIG, ["protocol.condense=[gm]"])
    with pytest.raises(
        ConfigError, match=r"protocol\.kd_methods: 'longest' .* expected bool or list"
    ):
        load_config(CONFIG, ["protocol.kd_methods=longest"])
    with pytest.raises(ConfigError, match=r"protocol\.method_seed_budgets"):
        load_config(CONFIG, ["protocol.method_seeds=3", "protocol.method_seed_budgets=[]"])
    with pytest.raises(ConfigError, match=r"protocol\.kd_methods.*names among"):
        load_config(CONFIG, ["protocol.kd_methods=[shortest]"])
    with pytest.raises(ConfigError, match=r"protocol\.metric.*eval\.fidelity"):
        load_config(CONFIG, ["protocol.metric=agreement", "eval.fidelity=false"])
    with pytest.raises(ConfigError, match=r"protocol\.metric.*condense"):
        load_config(CONFIG, ["protocol.metric=agreement", "eval.fidelity=true"])
    with pytest.raises(ConfigError, match=r"protocol\.metric"):
        load_config(CONFIG, ["protocol.metric=loss"])
    with pytest.raises(ConfigError, match=r"protocol\.method_seed_budgets"):
        load_config(CONFIG, ["protocol.method_seed_budgets=[0.5]"])


@pytest.mark.slow
def test_tiny_protocol_runs_reports_and_resumes(tmp_path: Path, monkeypatch: Any) -> None:
    out = tmp_path / "protocol"
    summary = protocol.run_protocol(CONFIG, [f"output_dir={tmp_path}"], out=out)
    assert summary["missing"] == []
    rows = {row["arm"]: row["cells"] for row in summary["table"]}
    assert set(rows) == {
        "random",
        "longest",
        "kcenter-hidden",
        "random+KD",
        "longest+KD",
        "kcenter-hidden+KD",
        "condensed-dm",
        "condensed-dm+KD",
        "random~longest",
        "random~kcenter-hidden",
    }
    # The token-matched control holds as many tokens as the method's subset, not more.
    by_name = {(r["name"], r["budget"]): r for r in summary["runs"]}
    method_tokens = by_name[("longest", 0.1)]["selection"]["selected_tokens"]
    matched = by_name[("random~longest", 0.1)]["selection"]
    assert matched["budget_unit"] == "tokens" and matched["selected_tokens"] <= method_tokens
    assert rows["random"]["0.1"]["n"] == 2 and rows["random"]["0.1"]["examples"] == 20
    assert set(rows["condensed-dm"]) == {"0.1"}
    for runs in summary["runs"]:
        assert 0.0 <= runs["accuracy"] <= 1.0 and runs["train_seconds"] > 0
    # A recorded arm keeps its student and drops its checkpoints (protocol.keep_checkpoints).
    assert (out / "b0.1" / "random" / "seed-0" / "student" / "model.safetensors").is_file()
    assert not list(out.rglob("step-*"))
    # The KD arms trained from a teacher cache over their subset.
    cache = out / "b0.1" / "random+KD" / "seed-0" / "teacher_cache"
    assert cache.is_dir()
    # The condensed set is on disk and has the budget's size.
    import torch

    syn = torch.load(out / "b0.1" / "condensed-dm" / "seed-0" / "synthetic.pt")
    assert syn["x"].shape[0] == 20
    md = (out / "protocol.md").read_text()
    assert "| random |" in md and "Gain over random" in md and (out / "protocol.png").is_file()
    saved = json.loads((out / "protocol.json").read_text())
    assert saved["table"] == summary["table"]

    # Started again, every arm is read back: nothing is trained.
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished arm was run again")

    monkeypatch.setattr(running, "run_arm", refuse)  # where run_protocol calls it
    again = protocol.run_protocol(CONFIG, [f"output_dir={tmp_path}"], out=out)
    assert again["table"] == summary["table"]


def test_protocol_checks_its_score_before_any_arm_trains(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"eval\.tasks is empty"):
        protocol.run_protocol(CONFIG, [f"output_dir={tmp_path}", "eval.tasks=[]"])
    with pytest.raises(ValueError, match=r"eval\.enabled is false"):
        protocol.run_protocol(CONFIG, [f"output_dir={tmp_path}", "eval.enabled=false"])
    assert not any(tmp_path.iterdir())


def test_protocol_needs_held_out_data_and_coherent_spans(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"set data\.eval"):
        protocol.run_protocol(CONFIG, [f"output_dir={tmp_path}", "data.eval=null"])
    with pytest.raises(ConfigError, match=r"condense\.match_span"):
        load_config(CONFIG, ["condense.expert_every=3", "condense.match_span=4"])


def test_a_finished_arm_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "p"
    one_arm = [*SMALL, f"output_dir={tmp_path}"]
    config = load_config(CONFIG, one_arm)
    arms = protocol.plan(config)
    for arm in arms:  # pretend every arm finished, with this config's settings
        record = {
            "name": arm.name,
            "budget": arm.budget,
            "seed": arm.seed,
            "method": arm.label,
            "kd": arm.kd,
            "accuracy": 0.5,
            "train_seconds": 1.0,
            "condense_seconds": 0.0,
        }
        arm_config = protocol.arm_config(config, arm, out)
        record["settings_hash"] = protocol.arm_hash(arm_config)
        arm.directory(out).mkdir(parents=True)
        (arm.directory(out) / "arm.json").write_text(json.dumps(record))
    summary = protocol.run_protocol(CONFIG, one_arm, out=out)  # all read back
    assert summary["missing"] == []
    moved = tmp_path / "moved"  # where the files are is not a setting
    out.rename(moved)
    assert protocol.run_protocol(CONFIG, one_arm, out=moved)["missing"] == []
    out = moved
    with pytest.raises(ValueError, match="finished with other settings"):
        protocol.run_protocol(CONFIG, [*one_arm, "train.lr=0.01"], out=out)


def test_a_failing_arm_is_reported_and_the_others_still_run(
    tmp_path: Path, monkeypatch: Any
) -> None:
    one_budget = [*SMALL, f"output_dir={tmp_path}"]
    real = running.run_arm

    def flaky(config: Any, arm: protocol.Arm) -> dict[str, Any]:
        if arm.name == "random+KD":
            raise RuntimeError("the teacher cache is on fire")
        return real(config, arm)

    monkeypatch.setattr(running, "run_arm", flaky)
    with pytest.raises(RuntimeError, match="1 arm"):
        protocol.run_protocol(CONFIG, one_budget, out=tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "protocol.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["full", "random"]
    assert "on fire" in saved["failed"][0]
    assert "Failed (1)" in (tmp_path / "p" / "protocol.md").read_text()


def test_arm_settings_hash_keeps_only_what_differs_from_the_defaults() -> None:
    settings = {"a": 1, "b": {"c": 2, "d": 3}, "new": 7}
    defaults = {"a": 1, "b": {"c": 2, "d": 4}}
    assert changed_settings(settings, defaults) == {"b": {"d": 3}, "new": 7}
    config = load_config(CONFIG, [])
    same = protocol.arm_hash(config)
    # An option set to its default, the protocol section and the output place change nothing.
    assert protocol.arm_hash(load_config(CONFIG, ["train.max_grad_norm=1.0"])) == same
    assert protocol.arm_hash(load_config(CONFIG, ["protocol.seeds=5", "output_dir=/x"])) == same
    assert protocol.arm_hash(load_config(CONFIG, ["train.lr=0.01"])) != same
    # The metric is what an arm's number means: the same student scored otherwise is another arm.
    scored = ["protocol.metric=agreement", "eval.fidelity=true", "protocol.condense=[]"]
    assert protocol.arm_hash(load_config(CONFIG, scored)) != same


def test_the_score_is_the_metric_asked_for() -> None:
    task = load_config(CONFIG, [])
    after = EvalMetrics(
        FidelityMetrics(1.0, 0.4, 2.0, None, 0.1, None, tokens=10, signal_tokens=10),
        {task.eval.tasks[0]: TaskMetrics(4, 0.25, 0.0, None, None, None)},
    )
    assert protocol.arm_metric(task, after) == 0.25
    agreement = load_config(
        CONFIG, ["protocol.metric=agreement", "eval.fidelity=true", "protocol.condense=[]"]
    )
    assert protocol.arm_metric(agreement, after) == 0.4
    assert "agreement" in protocol.metric_title(agreement)


def test_checkpoints_are_kept_when_asked_and_dropped_on_read_back(tmp_path: Path) -> None:
    out = tmp_path / "protocol"
    args = [f"output_dir={tmp_path}", *SMALL, "protocol.condense=[]"]
    protocol.run_protocol(CONFIG, [*args, "protocol.keep_checkpoints=true"], out=out)
    kept = sorted(p.relative_to(out).parts[:3] for p in out.rglob("step-*"))
    assert ("b0.1", "random", "seed-0") in kept and ("full", "full", "seed-0") in kept
    # Read back without the setting (e.g. arms recorded before it existed): dropped.
    protocol.run_protocol(CONFIG, args, out=out)
    assert not list(out.rglob("step-*"))
    assert (out / "b0.1" / "random" / "seed-0" / "student" / "model.safetensors").is_file()


def test_the_older_list_form_reads_as_the_sections_it_stands_for(tmp_path: Path) -> None:
    """Every config.yaml saved before protocol sections were typed holds protocol.kd (and
    a protocol's methods) as lists of key=value overrides: it still loads, to the same
    config."""
    listed = tmp_path / "old.yaml"
    listed.write_text(
        "protocol:\n"
        "  methods:\n"
        "    ifd-deita: [select.scorer=ifd, select.features=embedding, select.selector=deita]\n"
        "  kd: [loss.alpha=0.5, teacher.kind=cache, cache.k=32]\n"
    )
    typed = tmp_path / "new.yaml"
    typed.write_text(
        "protocol:\n"
        "  methods:\n"
        "    ifd-deita: {scorer: ifd, features: embedding, selector: deita}\n"
        "  kd: {loss: {alpha: 0.5}, teacher: {kind: cache}, cache: {k: 32}}\n"
    )
    assert load_config(listed) == load_config(typed)
    default = tmp_path / "default.yaml"  # what every run saved: the default protocol section
    default.write_text("protocol:\n  kd: [loss.alpha=0.5, teacher.kind=cache]\n")
    assert config_hash(load_config(default)) == config_hash(load_config(None))


def test_kd_settings_merge_sections_and_replace_values() -> None:
    """A partial section merges into its section; a mapping-valued field is replaced."""
    config = load_config(
        CONFIG,
        [
            "teacher.extra_body={b: 2}",
            "protocol.kd={loss: {alpha: 0.5}, teacher: {extra_body: {a: 1}}}",
        ],
    )
    arm = protocol.arm_config(config, protocol.Arm("random", 0.1, 0, True), Path("/o"))
    assert arm.teacher.extra_body == {"a": 1} and arm.loss.alpha == 0.5
    assert arm.loss.divergence == config.loss.divergence  # the rest of the section kept


def test_the_worst_group_is_recorded_tabled_and_shown_where_rows_carry_groups() -> None:
    task = load_config(CONFIG, [])
    source = task.eval.tasks[0]
    groups = {"a": {"examples": 3, "exact_match": 1 / 3}, "b": {"examples": 1, "exact_match": 0.0}}
    after = EvalMetrics(tasks={source: TaskMetrics(4, 0.25, 0.0, None, None, None, groups=groups)})
    gap = protocol.arm_group_gap(task, after)
    assert gap is not None and (gap["worst_group"], gap["best_group"]) == ("b", "a")
    assert gap["gap"] == pytest.approx(1 / 3)
    # Without groups (today's data) there is nothing to record.
    plain = EvalMetrics(tasks={source: TaskMetrics(4, 0.25, 0.0, None, None, None)})
    assert protocol.arm_group_gap(task, plain) is None

    config = load_config(CONFIG, ["protocol.budgets=[0.1]"])
    records = [_record("full", None, 0, 0.80)] + [
        _record("random", 0.1, s, a) for s, a in enumerate((0.50, 0.60))
    ]
    for record, worst in zip(records, (0.7, 0.2, 0.4), strict=True):
        record["groups"] = {"worst": worst, "gap": 0.9 - worst}
    summary = protocol.summarise(config, records, protocol.plan(config))
    cell = summary["table"][0]["cells"]["0.1"]
    assert cell["worst_group"]["mean"] == pytest.approx(0.3)
    assert cell["group_gap"]["mean"] == pytest.approx(0.6)
    assert summary["full_worst_group"]["mean"] == pytest.approx(0.7)
    md = render_protocol(summary)
    assert "full data: worst group 0.700" in md and "| random | 0.300 (gap 0.600) |" in md
    # A seed scored without groups: no mean over a part of the seeds.
    del records[2]["groups"]
    summary = protocol.summarise(config, records, protocol.plan(config))
    assert "worst_group" not in summary["table"][0]["cells"]["0.1"]
    assert "Worst group" not in render_protocol(summary)
