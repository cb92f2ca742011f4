"""Dataset distillation: score -> select -> materialise, synthesis, and condensation by matching.

- `scores`: per-example scores and features (length, perplexity, IFD, teacher-student
  divergence, sentence embeddings, LESS-style gradient features), saved with a manifest.
- `select`: selectors (random, top/bottom, k-center, herding, DEITA, cluster-balanced) as pure
  functions of scores, features and a budget.
- `stage`: the `lmdistill select` stage that ties them together and writes the subset.
- `synth`: `lmdistill synthesise`, the teacher writes new examples from seeds, filtered.
- `condense`: gradient matching (DC), distribution matching (DM) and trajectory matching
  (MTT with TESLA's constant-memory unrolling) of a small synthetic set.
- `protocol`: the data-efficiency protocol (budgets x methods x KD, against random).
"""
