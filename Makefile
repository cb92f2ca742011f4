# Two ways in: `make demo` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject) so a CPU machine takes the local CPU build
# instead of downloading a multi-GB CUDA wheel; the package itself declares a range.
TORCH_PIN ?= torch==2.13.0
# The served-teacher tests run a real OpenAI-compatible server (llama.cpp's); its wheel is built
# from source the first time (a few minutes). llama.cpp compiles for the building CPU by
# default (GGML_NATIVE), and pip's wheel cache hands that build to every later venv: on a
# machine or VM without one of those instructions (AMX, AVX-512) the server dies with
# "Illegal instruction" at its first request. So it is built for any x86-64 with AVX2 and the
# wheel kept in lmdistill's own cache, apart from pip's.
LLAMA_VERSION ?= 0.3.36
LLAMA_PIN ?= llama-cpp-python[server]==$(LLAMA_VERSION)
LLAMA_WHEELS ?= $(HOME)/.cache/lmdistill/wheels/llama-cpp-python-$(LLAMA_VERSION)-portable

.PHONY: demo demo-results test lint typecheck clean lab lab-e1 lab-e2 lab-dd e1-demo demo-dd lab-on-policy demo-on-policy lab-multi demo-multi lab-incremental lab-fair

$(VENV)/.base: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[dev]'
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip wheel --quiet --no-cache-dir --no-deps \
	    -w $(LLAMA_WHEELS) 'llama-cpp-python==$(LLAMA_VERSION)'
	$(PY) -m pip install --quiet --find-links $(LLAMA_WHEELS) \
	  --only-binary llama-cpp-python '$(LLAMA_PIN)'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/lmdistill demo

# The demo, then its figures (with commit, command, machine) into docs/results/demo.json,
# which the README's table is checked against (tests/test_docs.py).
demo-results: demo
	$(PY) benchmarks/lab_results.py demo

# The reasoning lab (docs/reasoning.md): each artifact is made once and reused;
# make remakes it only when its config changes.
LAB := outputs/lab
LAB_TEACHER := $(LAB)/teacher/student/config.json
LAB_RATIONALES := $(LAB)/rationales/generate/teacher_responses.kept.jsonl
LMDISTILL := $(VENV)/bin/lmdistill

$(LAB_TEACHER): configs/lab/teacher.yaml | $(VENV)/.base
	$(LMDISTILL) run configs/lab/teacher.yaml

$(LAB_RATIONALES): configs/lab/rationales.yaml $(LAB_TEACHER)
	$(LMDISTILL) generate configs/lab/rationales.yaml

lab: $(LAB_RATIONALES)
	$(LMDISTILL) run configs/lab/student.yaml

lab-e2: $(LAB_RATIONALES)
	$(LMDISTILL) sweep configs/lab/student.yaml \
	  objective.kind=cot,step_by_step,step_by_step_kpod \
	  --seeds 3 --out $(LAB)/e2 --reference objective.kind=label_only
	$(PY) benchmarks/lab_results.py e2

lab-e1: $(LAB_RATIONALES)
	$(LMDISTILL) sweep configs/lab/student.yaml loss.temperature=1,2,4,8 loss.alpha=0.5 \
	  train.max_steps=300 --out $(LAB)/e1 --reference loss.alpha=1.0
	$(PY) benchmarks/lab_results.py e1

# E3: on-policy against off-policy distillation at equal training wall time, 3 seeds
# (configs/lab/on-policy.yaml; ~1 h on 2 cores; finished runs are kept).
lab-on-policy: $(LAB_RATIONALES)
	$(PY) benchmarks/on_policy_lab.py --out $(LAB)/on-policy --seeds 3 --budget-s 150

# On-policy against off-policy with the real SmolLM2 teacher, equal training time, 3 seeds
# (configs/experiments/on-policy-demo.yaml; ~45 min on 2 cores; finished runs are kept).
demo-on-policy: $(VENV)/.base
	$(PY) benchmarks/on_policy_demo.py --out outputs/on-policy-demo --seeds 3 --budget-s 200

# Many teachers on the lab (docs/reasoning.md, configs/lab/multi-teacher.yaml): a second and
# a contradicting teacher (r = 0.25) are trained, then the conflict audit and students per
# strategy, 3 seeds (~2 h on 2 cores; finished runs are kept; --rates 0.25 0.125 0.5 adds r).
lab-multi: $(LAB_TEACHER)
	$(PY) benchmarks/multi_teacher_lab.py --out $(LAB)/multi --seeds 3 --rates 0.25

# Incremental distillation on the lab (docs/incremental.md, configs/lab/incremental.yaml):
# capability A, then B without A's data, six arms against a full re-run, 3 seeds.
lab-incremental: $(LAB_TEACHER)
	$(PY) benchmarks/incremental_lab.py --out $(LAB)/incremental --seeds 3

# Fairness-aware distillation on the lab (docs/groups.md, configs/lab/fair.yaml): a fair
# teacher, imbalanced data with a majority-only shortcut; plain KD, CE, reweight, dro, 3 seeds.
FAIR_TEACHER := $(LAB)/fair-teacher/student/config.json

$(FAIR_TEACHER): configs/lab/fair-teacher.yaml | $(VENV)/.base
	$(LMDISTILL) run configs/lab/fair-teacher.yaml

lab-fair: $(FAIR_TEACHER)
	$(PY) benchmarks/fairness_lab.py --out $(LAB)/fair --seeds 3

# Two teachers of different quality with a real LLM (SmolLM2 and its 15-layer copy):
# a student per strategy against the single better teacher (configs/experiments/).
demo-multi: $(VENV)/.base
	$(PY) benchmarks/multi_teacher_demo.py --out outputs/multi-teacher-demo --seeds 3

# Dataset distillation on the lab (docs/dataset-distillation.md): the data-efficiency
# protocol over the teacher's rationales (58 arms, ~4 h on 2 cores; finished arms are kept).
lab-dd: $(LAB_RATIONALES)
	$(LMDISTILL) protocol configs/lab/protocol.yaml --out $(LAB)/dd
	$(PY) benchmarks/lab_results.py lab-dd

# The same protocol on the demo data (builtin GSM8K, SmolLM2-135M-Instruct and its 6-layer
# student; ~2 h on 2 cores).
demo-dd: $(VENV)/.base
	$(LMDISTILL) protocol configs/dd/protocol-demo.yaml --out outputs/dd/protocol-demo
	$(PY) benchmarks/lab_results.py demo-dd

e1-demo: $(VENV)/.base
	$(LMDISTILL) sweep configs/experiments/e1-demo.yaml loss.temperature=1,2,4,8 \
	  --reference loss.alpha=1.0 --out outputs/e1-demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check lmdistill tests $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check lmdistill tests $(wildcard benchmarks)

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy lmdistill

test: lint typecheck
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) lmdistill-demo .pytest_cache .mypy_cache .ruff_cache
