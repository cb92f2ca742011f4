# Two ways in: `make demo` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject) so a CPU machine takes the local CPU build
# instead of downloading a multi-GB CUDA wheel; the package itself declares a range.
TORCH_PIN ?= torch==2.13.0
# The served-teacher tests run a real OpenAI-compatible server (llama.cpp's); its wheel is built
# from source the first time (a few minutes), then pip's cache has it.
LLAMA_PIN ?= llama-cpp-python[server]==0.3.36

.PHONY: demo test lint typecheck clean

$(VENV)/.base: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[dev]' '$(LLAMA_PIN)'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/lmdistill demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check lmdistill tests $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check lmdistill tests $(wildcard benchmarks)

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy lmdistill

test: lint typecheck
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) lmdistill-demo .pytest_cache .mypy_cache .ruff_cache
