"""The run configuration: a typed dataclass tree, loaded from YAML with `a.b=value` overrides.

Validation happens once, in `load_config`; every error names the field (`train.lr`) and what is
allowed. The user's config is never mutated: derived values live in the code that needs them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmdistill.io import atomic_write_text, read_utf8


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type, or outside what is allowed."""


@dataclass
class ModelConfig:
    """Where a model comes from.

    `path` is a local Hugging Face directory, a Hub id, a `.gguf` file, the alias
    `smollm2-135m-instruct`, or `tiny-llama` (random weights, local tokenizer; for tests).
    """

    path: str = "smollm2-135m-instruct"
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Only for `tiny-llama`: the shape of the random model.
    tiny_layers: int = 4
    tiny_hidden: int = 64
    tiny_seed: int = 0


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: a model in this process, a server, or a signal cache on disk.

    - `local`: `path` is loaded here (any `ModelConfig.path`).
    - `served`: an OpenAI-compatible server at `base_url` serving `model` writes the responses
      and returns `top_logprobs` per generated token; `path` still names the tokenizer (and,
      for the conformance probe, a local copy of the weights when `probe: true`). The API key
      is read from the environment variable named by `api_key_env`; it is never logged or saved.
    - `cache`: the signal `lmdistill cache` wrote to `cache.dir`; no teacher in memory while
      training (`path` names the tokenizer; its weights are read only to initialise a
      `layers_from_teacher` student).
    """

    kind: Literal["local", "served", "cache"] = "local"
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # the model name the server serves
    api_key_env: str | None = None  # name of the environment variable holding the key
    max_concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 5
    top_logprobs: int = 20
    # A token string the tokenizer cannot map back to exactly one id: stop (`error`), or
    # train on the text alone (`text_only`: sequence-level KD, no token-level signal).
    on_unmappable: Literal["error", "text_only"] = "error"
    probe: bool = True  # compare the server's log-probs with a local copy before a long run
    probe_tolerance: float = 0.25  # max mean |log p| difference on the probe's tokens (nats)
    # Extra fields for every chat request, e.g. {repeat_penalty: 1.0} for llama.cpp, whose
    # default penalty makes its samples differ from the distribution its log-probs report.
    extra_body: dict[str, Any] | None = None


@dataclass
class StudentConfig:
    """How the student is built.

    - `layers_from_teacher`: keep `num_layers` of the teacher's layers, evenly spaced, first and
      last included, with the teacher's weights (DistilBERT-style initialisation).
    - `shrunk_config`: the teacher's architecture with fewer layers / a narrower width, fresh
      random weights.
    - `path`: any model `ModelConfig.path` accepts, given in `path`.
    """

    init: Literal["layers_from_teacher", "shrunk_config", "path"] = "layers_from_teacher"
    num_layers: int = 6
    hidden_size: int | None = None
    intermediate_size: int | None = None
    path: str | None = None
    gguf_file: str | None = None
    freeze_embeddings: bool = False
    init_std: float | None = None  # shrunk_config: the weights' init std (default: teacher's)


@dataclass
class DataConfig:
    """Training data: a `.jsonl`/`.json` file, `hf:NAME[:CONFIG][@SPLIT]`, `builtin:gsm8k-demo`, or
    `lab:SPLIT:N[:SEED][:key=value]...` (generated reasoning problems with exact rationales).

    Rows hold `prompt`/`response`, chat `messages`, or GSM8K's `question`/`answer`.
    """

    train: str = "builtin:gsm8k-demo"
    split: str = "train"
    format: Literal["auto", "prompt_response", "messages", "gsm8k"] = "auto"
    eval: str | None = None
    eval_size: int = 32
    max_train_examples: int | None = None
    max_length: int = 256
    on_truncation: Literal["warn", "error"] = "warn"
    # An empty (or whitespace) response would train on the end-of-turn token alone.
    on_empty: Literal["drop", "error"] = "drop"


@dataclass
class GenerateConfig:
    """Sequence-level KD: the teacher writes the responses the student trains on."""

    enabled: bool = False
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0
    # Rationale data (lmdistill/teachers/consistency.py): `samples` responses per training
    # question (> 1 needs do_sample), then keep `all`, the `majority` answer's
    # (self-consistency) or the `gold` answer's, at most `keep_per_prompt` per question,
    # after format filters on length and on a `#### answer` line. Every drop is counted.
    # A rationale prompt (e.g. "Solve step by step; end with '#### <answer>'") given to the
    # teacher as a system message while it writes; the student trains on the question alone.
    rationale_prompt: str | None = None
    samples: int = 1
    keep: Literal["all", "majority", "gold"] = "all"
    keep_per_prompt: int | None = None  # None: every sample that is kept
    min_chars: int = 0
    max_chars: int | None = None
    require_answer: bool = False


@dataclass
class LossConfig:
    """loss = alpha * CE + (1 - alpha) * temperature^2 * D(teacher || student)
    + hidden_weight * hidden-state matching + attention_weight * attention-map KL.

    `beta` parameterises `generalized_jsd` (TRL's convention: 0 forward KL, 1 reverse KL);
    `skew_alpha` the DistiLLM skew KLs. Feature losses pair student layer i with teacher
    layer `layer_map[i - 1]` (default: uniform, the last layers paired).
    """

    divergence: str = "forward_kl"
    alpha: float = 0.0
    temperature: float = 1.0
    beta: float = 0.5
    skew_alpha: float = 0.1
    hidden_weight: float = 0.0
    hidden_kind: Literal["mse", "cosine"] = "mse"
    attention_weight: float = 0.0
    layer_map: list[int] | None = None
    chunk_size: int = 256  # rows per chunk of the fused loss: memory ~ chunk_size x vocab


@dataclass
class ObjectiveConfig:
    """What a reasoning student trains on (see `lmdistill/kd/rationale.py`): `cot` (rationale
    then answer), `label_only`, `step_by_step` (multitask, L_label + rationale_weight *
    L_rationale, answers without a rationale at inference), `kpod` (calculations weighted
    `keypoint_weight`) or `step_by_step_kpod` (both). Responses must be GSM8K-formatted
    (`... #### answer`) unless `cot`."""

    kind: str = "cot"
    rationale_weight: float = 1.0
    keypoint_weight: float = 2.0
    label_prefix: str = "[label] "
    rationale_prefix: str = "[rationale] "


@dataclass
class TrainConfig:
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Under torchrun, how long the other processes wait in a collective for the main one,
    # which generates and caches the teacher's signal alone (hours for a large dataset).
    process_group_timeout_minutes: int = 1440
    # Easy-to-hard curriculum over examples (difficulty = response length, i.e. rationale
    # steps in the lab): step t draws from the easiest share of the data, growing linearly
    # from `curriculum_start` to all of it at `curriculum_steps` (0: half of max_steps).
    # `progressive_steps` (KPOD's schedule, objectives kpod / step_by_step_kpod): within each
    # rationale only the last line trains at first; the earlier lines join, last to first,
    # until all train at `curriculum_steps` (0: half of max_steps).
    curriculum: Literal["none", "easy_to_hard", "progressive_steps"] = "none"
    curriculum_start: float = 0.25
    curriculum_steps: int = 0


@dataclass
class CacheConfig:
    """`lmdistill cache`: the teacher's top-k log-probs on every training response token."""

    k: int = 32
    shard_size: int = 256
    dir: str | None = None  # default: OUTPUT_DIR/teacher_cache


@dataclass
class EvalConfig:
    """Held-out fidelity to the teacher, before and after training."""

    enabled: bool = True
    batch_size: int = 8
    num_samples: int = 3
    sample_max_new_tokens: int = 48
    fidelity: bool = True  # KL / agreement / perplexity against the teacher's signal
    # Task sets (data sources, e.g. lab:test:200) scored by exact match of the final answer
    # (GSM8K format) on greedy answers, with rationale checks; `mc:FILE.jsonl` is multiple
    # choice by log-likelihood (question, choices, answer).
    tasks: list[str] = field(default_factory=list)
    before: bool = True  # also evaluate the untrained student
    task_max_new_tokens: int = 256
    task_batch_size: int = 32
    # The teacher answers the task sets too (its accuracy, and the student's agreement with
    # its answers and calculations); and `task_samples` sampled answers per question measure
    # agreement across sampled rationales and majority-vote accuracy (0: off).
    task_teacher: bool = True
    task_samples: int = 0
    # Where the teacher's task answers are kept (default OUTPUT_DIR/teacher_answers); point
    # the runs of a sweep at one directory and the teacher answers once.
    teacher_answers_dir: str | None = None


@dataclass
class SelectConfig:
    """`lmdistill select` (lmdistill/dd): score -> select -> materialise a subset of data.train.

    `scorer` gives each example a number (length | perplexity | ifd | divergence | gradient),
    `features` a vector (embedding | hidden | gradient); `selector` (random | top | bottom |
    kcenter | herding | deita | cluster) picks within `budget` (a fraction of the examples,
    a number of examples, or of tokens). `model` scores perplexity / IFD / hidden states /
    gradients (the student as built, the teacher, or a model path: a small proxy), and is the
    student side of `divergence`. `gradient` (LESS) needs `target`: the data the selection
    should help (a data source, e.g. a held-out split).
    """

    scorer: str | None = None
    features: str | None = None
    model: str = "student"
    embedding_model: str = "all-minilm-l6-v2"  # alias, or a sentence-embedding model dir
    selector: str = "random"
    budget: float = 0.1
    budget_unit: Literal["fraction", "examples", "tokens"] = "fraction"
    stratify: Literal["none", "length", "lines"] = "none"  # random: strata to keep in proportion
    strata: int = 4  # stratify=length: quantile bins of response length
    seed: int = 0
    target: str | None = None
    target_size: int = 64
    lora_rank: int = 8
    lora_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    grad_dim: int = 2048
    threshold: float = 0.9  # deita: most cosine similarity to an example already picked
    clusters: int = 10  # cluster: k-means clusters
    batch_size: int = 8
    out: str | None = None  # default OUTPUT_DIR/select
    scores_dir: str | None = None  # score artifacts (default OUT/scores); shared across budgets


@dataclass
class SynthesiseConfig:
    """`lmdistill synthesise` (lmdistill/dd/synth.py): the teacher writes new examples from
    `seeds` (a data source), `shots` seeds per request, `attempts` requests (sampled); kept
    when well-formed, with a `#### answer`, with right calculations, verified (`lab`: the
    exact answer of a lab problem; `calculations`: the answer is the last calculation's
    result), and not a near-copy (word-trigram Jaccard >= dedup_threshold) of a seed or
    of a kept example; at most `count` kept."""

    seeds: str = "lab:train:16:0"
    seed_count: int | None = None
    shots: int = 3
    attempts: int = 64
    count: int = 64
    verify: Literal["none", "lab", "calculations"] = "none"
    dedup_threshold: float = 0.8
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 200
    batch_size: int = 16
    seed: int = 0
    out: str | None = None  # default OUTPUT_DIR/synthesise


@dataclass
class CondenseConfig:
    """Condensation by matching (lmdistill/dd/condense.py): learn a small synthetic set of soft
    token sequences (distributions over the vocabulary, fed to the student as
    `inputs_embeds`) with soft labels, so that a student trained on it behaves like one trained
    on the real data. `method`: `dc` (layer-wise gradient matching), `dm` (distribution
    matching of mean hidden states) or `mtt` (trajectory matching with TESLA's
    constant-memory unrolling). The set starts from real examples chosen at random; its soft
    labels start from the real next tokens, or (the protocol's +KD arms) from the teacher's
    distributions."""

    method: Literal["dc", "dm", "mtt"] = "dm"
    iterations: int = 200  # updates of the synthetic set
    lr: float = 0.05  # Adam on the synthetic logits
    real_batch: int = 32
    inner_steps: int = 5  # dc: student updates on the synthetic set between matches
    init_students: int = 4  # dc / dm: fresh random students the matching cycles through
    inner_lr: float = 1e-3  # dc: SGD step of those updates
    input_temperature: float = 1.0
    # mtt: expert trajectories on real data, then unrolled student steps on the synthetic set
    expert_steps: int = 60
    expert_every: int = 10
    unroll_steps: int = 10
    match_span: int = 20  # expert steps the unroll should cover
    student_lr: float = 1e-3  # the unrolled SGD's learning rate (learned, log-parametrised)


@dataclass
class ProtocolConfig:
    """The data-efficiency protocol (`lmdistill protocol CONFIG`): for each budget (a fraction
    of data.train), random subsets over `seeds`, each method in `methods` (name -> select.*
    overrides), each again with the `kd` overrides, random with the same KD, and the
    condensation methods at budgets up to `condense_max_budget`; every student trained with
    the same `train` settings; plus the full data. Task accuracy on eval.tasks[0]."""

    budgets: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25])
    seeds: int = 3
    methods: dict[str, list[str]] = field(default_factory=dict)
    kd: list[str] = field(default_factory=lambda: ["loss.alpha=0.5", "teacher.kind=cache"])
    # Also train every method (true), or the methods listed, with KD; random + KD always.
    kd_methods: bool | list[str] = True
    condense: list[str] = field(default_factory=list)  # dc | dm | mtt
    condense_max_budget: float = 0.05
    # At these budgets, also a random subset with as many tokens as each method's subset
    # (`random~<method>`): a method that picks long examples is compared at equal tokens.
    token_matched_budgets: list[float] = field(default_factory=list)
    # Seeds per method (selection and training seed; a deterministic selector repeats its
    # subset and varies only the student's) at `method_seed_budgets` (null: every budget);
    # one seed elsewhere. The extra seeds run after the first seed's arms, before the KD arms.
    method_seeds: int = 1
    method_seed_budgets: list[float] | None = None
    # What the table scores: `task` (exact match on eval.tasks[0]) or `agreement` (the
    # student's top-1 agreement with the teacher on data.eval, for data whose task a small
    # student cannot yet solve; needs eval.fidelity).
    metric: Literal["task", "agreement"] = "task"
    full_seeds: int = 1
    # Also train a full-data student for this many steps (e.g. to convergence): the reference
    # for "% of full" when set; the same-steps full-data student is reported beside it.
    full_steps: int | None = None
    # Keep a finished arm's training checkpoints (false: they are deleted once its record is
    # written; its student stays. A protocol has dozens of arms: about 1.1 GB each with a
    # 6-layer SmolLM2 student).
    keep_checkpoints: bool = False


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    synthesise: SynthesiseConfig = field(default_factory=SynthesiseConfig)
    condense: CondenseConfig = field(default_factory=CondenseConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    # Also train a CE-only student on the same data for the same steps, to compare against.
    baseline: bool = False


# ---------------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (or the defaults when `path` is None), apply `a.b=value` overrides, validate."""
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
    config = _build(RunConfig, raw, prefix="")
    validate(config)
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


def validate(config: RunConfig) -> None:
    """Range checks that types alone cannot express."""
    from lmdistill.losses import LOSSES

    loss, train = config.loss, config.train
    _check(
        loss.divergence in LOSSES, "loss.divergence", loss.divergence, f"one of {sorted(LOSSES)}"
    )
    _check(0.0 <= loss.alpha <= 1.0, "loss.alpha", loss.alpha, "a number in [0, 1]")
    _check(0.0 <= loss.beta <= 1.0, "loss.beta", loss.beta, "a number in [0, 1]")
    _check(loss.temperature > 0, "loss.temperature", loss.temperature, "a number > 0")
    _check(loss.chunk_size >= 1, "loss.chunk_size", loss.chunk_size, "an integer >= 1")
    _check(0.0 <= loss.skew_alpha < 1.0, "loss.skew_alpha", loss.skew_alpha, "in [0, 1)")
    for weight in ("hidden_weight", "attention_weight"):
        value = getattr(loss, weight)
        _check(value >= 0, f"loss.{weight}", value, "a number >= 0")
    for name in (
        "max_steps",
        "batch_size",
        "grad_accum",
        "log_every",
        "keep_checkpoints",
        "process_group_timeout_minutes",
    ):
        value = getattr(train, name)
        _check(value >= 1, f"train.{name}", value, "an integer >= 1")
    _check(train.lr > 0, "train.lr", train.lr, "a number > 0")
    _check(train.warmup_steps >= 0, "train.warmup_steps", train.warmup_steps, "an integer >= 0")
    _check(0 <= train.min_lr_ratio <= 1, "train.min_lr_ratio", train.min_lr_ratio, "in [0, 1]")
    _check(train.max_grad_norm > 0, "train.max_grad_norm", train.max_grad_norm, "a number > 0")
    _check(train.checkpoint_every >= 0, "train.checkpoint_every", train.checkpoint_every, ">= 0")
    _check(
        0 < train.curriculum_start <= 1,
        "train.curriculum_start",
        train.curriculum_start,
        "a fraction in (0, 1]",
    )
    _check(train.curriculum_steps >= 0, "train.curriculum_steps", train.curriculum_steps, ">= 0")
    _check(config.data.max_length >= 8, "data.max_length", config.data.max_length, "an int >= 8")
    _check(config.eval.task_samples >= 0, "eval.task_samples", config.eval.task_samples, ">= 0")
    _check(config.data.eval_size >= 0, "data.eval_size", config.data.eval_size, "an int >= 0")
    student = config.student
    _check(student.num_layers >= 1, "student.num_layers", student.num_layers, "an integer >= 1")
    if student.init == "path":
        _check(bool(student.path), "student.path", student.path, "a model path when init=path")
    _check(config.cache.k >= 1, "cache.k", config.cache.k, "an integer >= 1")
    _check(config.cache.shard_size >= 1, "cache.shard_size", config.cache.shard_size, ">= 1")
    _validate_teacher(config)
    _validate_objective(config)
    _validate_select(config.select)
    _validate_protocol(config)
    _validate_synthesise(config.synthesise)
    gen = config.generate
    _check(gen.max_new_tokens >= 1, "generate.max_new_tokens", gen.max_new_tokens, ">= 1")
    _check(gen.temperature > 0, "generate.temperature", gen.temperature, "a number > 0")
    _check(0 < gen.top_p <= 1, "generate.top_p", gen.top_p, "a number in (0, 1]")
    _check(gen.batch_size >= 1, "generate.batch_size", gen.batch_size, "an integer >= 1")
    _check(gen.samples >= 1, "generate.samples", gen.samples, "an integer >= 1")
    if gen.samples > 1:
        _check(gen.do_sample, "generate.do_sample", gen.do_sample, "true when generate.samples > 1")
    if gen.keep_per_prompt is not None:
        _check(
            1 <= gen.keep_per_prompt <= gen.samples,
            "generate.keep_per_prompt",
            gen.keep_per_prompt,
            f"null or an integer in [1, generate.samples={gen.samples}]",
        )
    if gen.keep == "majority":
        _check(
            gen.samples > 1,
            "generate.samples",
            gen.samples,
            "> 1 with generate.keep=majority (one sample is its own majority)",
        )
    _check(gen.min_chars >= 0, "generate.min_chars", gen.min_chars, "an integer >= 0")
    if gen.max_chars is not None:
        _check(
            gen.max_chars > gen.min_chars,
            "generate.max_chars",
            gen.max_chars,
            f"null or an integer > generate.min_chars={gen.min_chars}",
        )


def _validate_select(select: SelectConfig) -> None:
    from lmdistill.dd.scores import FEATURES, SCORERS
    from lmdistill.dd.select import NEEDS_FEATURES, NEEDS_SCORES, SELECTORS

    if select.scorer is not None:
        _check(select.scorer in SCORERS, "select.scorer", select.scorer, f"one of {SCORERS}")
    if select.features is not None:
        allowed = f"one of {FEATURES}"
        _check(select.features in FEATURES, "select.features", select.features, allowed)
    _check(select.selector in SELECTORS, "select.selector", select.selector, f"one of {SELECTORS}")
    if select.selector in NEEDS_SCORES:
        _check(
            select.scorer is not None,
            "select.scorer",
            select.scorer,
            f"a scorer with select.selector={select.selector}",
        )
    if select.selector in NEEDS_FEATURES:
        _check(
            select.features is not None,
            "select.features",
            select.features,
            f"a feature kind with select.selector={select.selector}",
        )
    if select.scorer == "divergence":
        _check(
            select.model != "teacher",
            "select.model",
            select.model,
            "the student side of scorer=divergence: 'student' or a model path, not 'teacher' "
            "(the teacher's divergence from itself is 0)",
        )
    if select.scorer == "gradient":
        _check(
            bool(select.target), "select.target", select.target, "a data source (scorer=gradient)"
        )
    _check(select.budget > 0, "select.budget", select.budget, "a number > 0")
    if select.budget_unit == "fraction":
        _check(select.budget <= 1, "select.budget", select.budget, "a fraction in (0, 1]")
    for name in ("strata", "lora_rank", "grad_dim", "clusters", "batch_size", "target_size"):
        value = getattr(select, name)
        _check(value >= 1, f"select.{name}", value, "an integer >= 1")
    _check(-1 <= select.threshold <= 1, "select.threshold", select.threshold, "in [-1, 1]")
    _check(bool(select.lora_modules), "select.lora_modules", select.lora_modules, "module names")


def _validate_synthesise(spec: SynthesiseConfig) -> None:
    for name in ("shots", "attempts", "count", "max_new_tokens", "batch_size"):
        value = getattr(spec, name)
        _check(value >= 1, f"synthesise.{name}", value, "an integer >= 1")
    if spec.seed_count is not None:
        _check(spec.seed_count >= 1, "synthesise.seed_count", spec.seed_count, "null or >= 1")
    _check(
        0 < spec.dedup_threshold <= 1,
        "synthesise.dedup_threshold",
        spec.dedup_threshold,
        "in (0, 1] (1: drop exact copies only)",
    )
    _check(spec.temperature > 0, "synthesise.temperature", spec.temperature, "a number > 0")
    _check(0 < spec.top_p <= 1, "synthesise.top_p", spec.top_p, "a number in (0, 1]")


def _validate_protocol(config: RunConfig) -> None:
    protocol, condense = config.protocol, config.condense
    for budget in protocol.budgets:
        _check(0 < budget < 1, "protocol.budgets", protocol.budgets, "fractions in (0, 1)")
    _check(protocol.seeds >= 1, "protocol.seeds", protocol.seeds, "an integer >= 1")
    _check(protocol.full_seeds >= 1, "protocol.full_seeds", protocol.full_seeds, ">= 1")
    if isinstance(protocol.kd_methods, list):
        for method in protocol.kd_methods:
            _check(
                method in protocol.methods,
                "protocol.kd_methods",
                protocol.kd_methods,
                f"true, false or names among protocol.methods={sorted(protocol.methods)}",
            )
    if protocol.metric == "agreement":
        _check(
            config.eval.fidelity,
            "protocol.metric",
            protocol.metric,
            "'task', or 'agreement' with eval.fidelity: true (it is the fidelity evaluation)",
        )
        _check(
            not protocol.condense,
            "protocol.metric",
            protocol.metric,
            "'task' when protocol.condense is set (condensed arms score task accuracy only)",
        )
    _check(protocol.method_seeds >= 1, "protocol.method_seeds", protocol.method_seeds, ">= 1")
    if protocol.method_seeds > 1:
        _check(
            protocol.method_seed_budgets != [],
            "protocol.method_seed_budgets",
            protocol.method_seed_budgets,
            "null (every budget) or some budgets when protocol.method_seeds > 1",
        )
    if protocol.full_steps is not None:
        _check(protocol.full_steps >= 1, "protocol.full_steps", protocol.full_steps, "null or >= 1")
    for name, overrides in protocol.methods.items():
        reserved = ("full", "random", "condensed")
        _check(
            isinstance(overrides, list) and not name.startswith(reserved) and "+" not in name,
            f"protocol.methods.{name}",
            overrides,
            "a list of select.* overrides under a name not starting with full / random / "
            "condensed and without '+'",
        )
        for item in overrides:
            _check(
                isinstance(item, str) and item.startswith("select."),
                f"protocol.methods.{name}",
                item,
                "select.key=value overrides",
            )
    among = f"budgets among protocol.budgets={protocol.budgets}"
    for field_name in ("token_matched_budgets", "method_seed_budgets"):
        chosen = getattr(protocol, field_name) or []
        for budget in chosen:
            _check(budget in protocol.budgets, f"protocol.{field_name}", chosen, among)
    for method in protocol.condense:
        allowed = "a list of dc / dm / mtt"
        _check(method in ("dc", "dm", "mtt"), "protocol.condense", protocol.condense, allowed)
    for name in ("iterations", "real_batch", "init_students", "expert_steps", "unroll_steps"):
        value = getattr(condense, name)
        _check(value >= 1, f"condense.{name}", value, "an integer >= 1")
    _check(condense.lr > 0, "condense.lr", condense.lr, "a number > 0")
    _check(condense.inner_lr > 0, "condense.inner_lr", condense.inner_lr, "a number > 0")
    _check(condense.student_lr > 0, "condense.student_lr", condense.student_lr, "a number > 0")
    _check(condense.expert_every >= 1, "condense.expert_every", condense.expert_every, ">= 1")
    _check(
        condense.match_span % condense.expert_every == 0,
        "condense.match_span",
        condense.match_span,
        f"a multiple of condense.expert_every={condense.expert_every} (experts are kept every "
        "expert_every steps)",
    )
    _check(
        1 <= condense.match_span <= condense.expert_steps,
        "condense.match_span",
        condense.match_span,
        f"an integer in [1, condense.expert_steps={condense.expert_steps}]",
    )


def _validate_objective(config: RunConfig) -> None:
    from lmdistill.kd.rationale import OBJECTIVES

    objective = config.objective
    _check(
        objective.kind in OBJECTIVES,
        "objective.kind",
        objective.kind,
        f"one of {sorted(OBJECTIVES)}",
    )
    for name in ("rationale_weight", "keypoint_weight"):
        value = getattr(objective, name)
        _check(value >= 0, f"objective.{name}", value, "a number >= 0")
    if config.train.curriculum == "progressive_steps":
        _check(
            objective.kind in ("kpod", "step_by_step_kpod"),
            "train.curriculum",
            config.train.curriculum,
            "'progressive_steps' only with objective.kind kpod or step_by_step_kpod (they mark "
            "the rationale's steps)",
        )
    if objective.kind != "cot":
        _check(
            config.teacher.kind == "local",
            "teacher.kind",
            config.teacher.kind,
            f"'local' with objective.kind={objective.kind} (a cached or served signal belongs "
            "to the responses as the teacher wrote them)",
        )


def _validate_teacher(config: RunConfig) -> None:
    teacher, loss = config.teacher, config.loss
    _check(teacher.max_concurrency >= 1, "teacher.max_concurrency", teacher.max_concurrency, ">= 1")
    _check(teacher.timeout_s > 0, "teacher.timeout_s", teacher.timeout_s, "a number > 0")
    _check(teacher.max_retries >= 0, "teacher.max_retries", teacher.max_retries, ">= 0")
    _check(teacher.top_logprobs >= 1, "teacher.top_logprobs", teacher.top_logprobs, ">= 1")
    _check(teacher.probe_tolerance > 0, "teacher.probe_tolerance", teacher.probe_tolerance, "> 0")
    if teacher.kind == "local":
        return
    features = loss.hidden_weight > 0 or loss.attention_weight > 0
    _check(
        not features,
        "loss.hidden_weight/attention_weight",
        [loss.hidden_weight, loss.attention_weight],
        f"0 with teacher.kind={teacher.kind} (feature losses need the teacher in memory)",
    )
    if teacher.kind == "served" and config.cache.k != teacher.top_logprobs:
        warnings.warn(
            f"cache.k={config.cache.k} is not used with teacher.kind=served: its cache holds the "
            f"teacher.top_logprobs={teacher.top_logprobs} log-probs the server returns per token "
            f"(set cache.k={teacher.top_logprobs} to say so)",
            stacklevel=2,
        )
    if teacher.kind == "served":
        for name in ("base_url", "model"):
            value = getattr(teacher, name)
            _check(bool(value), f"teacher.{name}", value, "a value when teacher.kind=served")
        _check(
            config.generate.enabled,
            "generate.enabled",
            config.generate.enabled,
            "true with teacher.kind=served (a server returns log-probs only for text it writes)",
        )
        _check(
            loss.temperature == 1.0,
            "loss.temperature",
            loss.temperature,
            "1.0 with teacher.kind=served (servers report log-probs at temperature 1, and the "
            "tail mass outside their top-k cannot be re-tempered)",
        )


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {value!r} is not allowed; expected {allowed}")


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
