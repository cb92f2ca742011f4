"""The run configuration as a typed dataclass tree: every section, field and default.

Types are checked when a config is built (`config/load.py`), ranges by each section's checks
(`config/checks.py`); names that other packages register (divergences, objectives, scorers,
selectors) are checked where those registries are known, in `lmdistill/validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


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

    kind: str = "local"  # a registered backend (lmdistill/teachers/backends.py)
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
    # In a `teachers:` list (an ensemble): its name (default teacher0, teacher1, ...) and its
    # weight in the combination (normalised over the teachers).
    name: str | None = None
    weight: float = 1.0


@dataclass
class StudentLoraConfig:
    """LoRA adapters on the student (`peft`): with `r` > 0 only the adapters train (and the
    modules named in `trainable`, trained in full); the saved student is merged, the adapter
    is saved beside it. 0: every weight trains."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ]
    )  # fmt: skip
    trainable: list[str] = field(default_factory=list)


@dataclass
class StudentConfig:
    """How the student is built.

    - `layers_from_teacher`: keep `num_layers` of the teacher's layers, evenly spaced, first and
      last included, with the teacher's weights (DistilBERT-style initialisation).
    - `layers_by_importance`: keep the first, the last and the `num_layers - 2` most important
      of the others, scored by block influence (ShortGPT: 1 - the mean cosine between a
      layer's input and output hidden states) on `calibration_examples` training examples.
    - `shrunk_config`: the teacher's architecture with fewer layers / a narrower width, fresh
      random weights.
    - `path`: any model `ModelConfig.path` accepts, given in `path`.
    """

    init: Literal["layers_from_teacher", "layers_by_importance", "shrunk_config", "path"] = (
        "layers_from_teacher"
    )
    num_layers: int = 6
    # layers_by_importance: the training examples whose hidden states score the layers.
    calibration_examples: int = 32
    hidden_size: int | None = None
    intermediate_size: int | None = None
    path: str | None = None
    gguf_file: str | None = None
    freeze_embeddings: bool = False
    init_std: float | None = None  # shrunk_config: the weights' init std (default: teacher's)
    lora: StudentLoraConfig = field(default_factory=StudentLoraConfig)


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
    # Train only on answers the teacher finished: a response cut at max_new_tokens (no
    # end-of-turn token) is dropped and counted, so the student sees every answer end.
    drop_truncated: bool = False


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
class OnPolicyConfig:
    """On-policy distillation (GKD): on a share `fraction` of the optimizer steps (GKD's
    lambda; 0 = off-policy only) the student samples its own responses (`max_new_tokens`,
    `temperature`, `top_p`) and learns the teacher's distribution on them through
    `divergence` alone (`beta` for generalized_jsd: 0 forward KL, 1 reverse KL), at
    `loss.temperature`. The other steps train as configured in `loss`."""

    fraction: float = 0.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    divergence: str = "generalized_jsd"
    beta: float = 0.5


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
    # Groups of the training rows (the data's `group` field) and their losses:
    # `reweight`: each group's tokens weighted so that every group carries the same total
    # weight over the training set; `dro`: group DRO (Sagawa et al. 2020), online
    # exponentiated weights q on the groups' mean losses, `dro_step_size` its step (eta).
    group_objective: Literal["none", "reweight", "dro"] = "none"
    dro_step_size: float = 0.01
    # Experiment tracking through Accelerate's trackers (tensorboard, wandb, mlflow, ...):
    # training records and held-out measures, one tracker run per arm (kd, baseline), under
    # `tracking_dir` (default OUTPUT_DIR/tracking) for trackers that write files. Off: [].
    report_to: list[str] = field(default_factory=list)
    tracking_dir: str | None = None
    # Mixed precision on a GPU (Accelerate's autocast; fp16 with loss scaling): fp32 weights
    # and optimizer, bf16/fp16 matmuls. Refused on the CPU and on GPUs without bf16.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Recompute each layer's activations in the backward pass instead of keeping them: less
    # memory for longer sequences or larger batches, about a third more compute.
    gradient_checkpointing: bool = False
    # Under torchrun / accelerate launch: `fsdp` shards the student's weights, gradients and
    # AdamW moments over the processes (torch's FSDP2; docs/distributed.md), `none` keeps a
    # whole copy in each (DDP). Same update either way; checkpoints are whole tensors.
    sharding: Literal["none", "fsdp"] = "none"


@dataclass
class EnsembleConfig:
    """How the signals of several teachers (`teachers:`) are combined, per token.

    `strategy`: a registered one (lmdistill/teachers/ensemble.py): mean, product, confidence,
    vote, route. `k`: the top-k a local teacher's logits are cut to before combining
    (default: cache.k; the vocabulary size makes it exact). `answers`: each teacher writes its
    own greedy answer to every training prompt once, for `vote`, `route` and the report's
    "answers differ" (None: when the strategy needs them)."""

    strategy: str = "mean"
    k: int | None = None
    confidence_temperature: float = 1.0  # confidence: weight ~ exp(-entropy / this), in nats
    answers: bool | None = None
    answer_max_new_tokens: int = 256
    answers_dir: str | None = None  # default OUTPUT_DIR/ensemble/answers (runs may share one)
    shown: int = 5  # the most conflicting examples shown side by side in the report


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
    # Each model answers the first `answers` held-out prompts greedily (up to
    # `answer_max_new_tokens`): repeated 4-grams, answers that end by themselves, the
    # teacher's NLL of them and KL(model || teacher) on them (lmdistill/eval/answers.py).
    answers: int = 0
    answer_max_new_tokens: int = 128
    # lm-evaluation-harness on every model the run evaluates (lmdistill/eval/harness.py):
    # lm-eval task names or task YAML files; documents per task (null: all); few-shot
    # examples (null: the task's own); the chat template (lm-eval's --apply_chat_template).
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    lm_eval_num_fewshot: int | None = None
    lm_eval_chat_template: bool = False


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
    of data.train), random subsets over `seeds`, each method in `methods` (name -> a partial
    `select` section), each again with the `kd` settings, random with the same KD, and the
    condensation methods at budgets up to `condense_max_budget`; every student trained with
    the same `train` settings; plus the full data. Task accuracy on eval.tasks[0]."""

    budgets: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25])
    seeds: int = 3
    # name -> a partial `select` section: {scorer: ifd, features: embedding, selector: deita}
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The KD arms' settings: partial sections, {loss: {alpha: 0.5}, teacher: {kind: cache}}.
    kd: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"loss": {"alpha": 0.5}, "teacher": {"kind": "cache"}}
    )
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
class MemoryConfig:
    """What a run leaves, beside its student, for runs that continue it without its data
    (`memory/` with a manifest): a replay memory of `fraction` of its training examples
    (at most 1%), chosen by dataset distillation (`selector` over the finished student's
    `features`, as `lmdistill select` does), and with `fisher` the diagonal Fisher estimate
    of the student on `fisher_examples` of its training examples (for anchor=ewc)."""

    fraction: float = 0.0
    selector: str = "kcenter"
    features: Literal["hidden", "none"] = "hidden"
    seed: int = 0
    fisher: bool = False
    fisher_examples: int = 256


@dataclass
class IncrementalConfig:
    """Continue a finished student (`student.init: path`) on new data only, keeping what it
    knew: `retention_weight` > 0 makes the previous student a retention teacher on the new
    prompts (its own divergence term, weighted); `memory` is the directory an earlier run
    left (`OUTPUT/memory`, checked to belong to `student.path`): `replay` mixes its examples
    into the training data; `anchor` pulls the weights toward the previous ones (`l2`, or
    `ewc` with the memory's Fisher estimate), `anchor_weight` its strength."""

    retention_weight: float = 0.0
    memory: str | None = None
    replay: bool = True
    anchor: Literal["none", "l2", "ewc"] = "none"
    anchor_weight: float = 0.0

    def used(self) -> bool:
        """Whether the run continues a student with this section (a plain `student.init:
        path` run, e.g. from a Hub model, does not)."""
        return self.retention_weight > 0 or self.anchor != "none" or self.memory is not None


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Several teachers (an ensemble), any mix of kinds; `teacher` is then the first of them
    # (it builds the student, writes the responses, and fidelity is measured against it).
    teachers: list[TeacherConfig] = field(default_factory=list)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    synthesise: SynthesiseConfig = field(default_factory=SynthesiseConfig)
    condense: CondenseConfig = field(default_factory=CondenseConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    # Also train a CE-only student on the same data for the same steps, to compare against.
    baseline: bool = False


# ---------------------------------------------------------------------------------------------
# Loading and validation
