"""The data-efficiency protocol: how much of the data does the student need, and is the gain
over a random subset due to the data chosen or to KD? `plan` says which arms, `run` trains
each, `table` says what they show.

For each budget b (a fraction of data.train) it trains, with the same `train` settings:
- `random`: `protocol.seeds` random subsets of size b (the control every method must beat);
- each method in `protocol.methods` (a selection: scorer / features / selector), seed 0, and
  seeds up to `protocol.method_seeds` at `protocol.method_seed_budgets`;
- `random+KD` and `<method>+KD`: the same subsets with the `protocol.kd` settings (the
  teacher's soft labels), so the table separates the effect of the data from that of KD;
- `condensed-<dc|dm|mtt>` (and `+KD`, soft labels from the teacher) at budgets up to
  `protocol.condense_max_budget`: a synthetic set of that many sequences (lmdistill/dd/condense.py);
- and `full`: all the data.
Every arm keeps its artifacts under OUT/<budget>/<arm>/seed-<s>/ and a finished arm is read
back, not redone: a killed protocol resumes. Costs are counted per arm: selection (scoring
once, shared by the budgets), condensation and training seconds.

Writes OUT/protocol.md, protocol.json and protocol.png (budget vs score).
"""

from lmdistill.protocol.plan import (
    Arm,
    arm_config,
    arm_group_gap,
    arm_metric,
    matched_tokens,
    metric_title,
    plan,
)
from lmdistill.protocol.run import arm_hash, run_arm, run_condensed, run_protocol
from lmdistill.protocol.table import summarise, verdicts

__all__ = [
    "Arm",
    "arm_config",
    "arm_group_gap",
    "arm_hash",
    "arm_metric",
    "matched_tokens",
    "metric_title",
    "plan",
    "run_arm",
    "run_condensed",
    "run_protocol",
    "summarise",
    "verdicts",
]
