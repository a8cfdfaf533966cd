# Two commands do all the set-up from a fresh clone: `make demo` and `make test`.
# They create .venv (if missing), install PyTorch and moeformer into it, then run.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch that lies on our machines; override for a CUDA build, e.g.
# make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moeformer-installed

.PHONY: install demo test test-all test-repeat lint gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || (echo "moeformer needs Python >= 3.10" && exit 1)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moeformer demo

test: $(STAMP)
	$(PY) -m pytest

# Also the end-to-end tests marked slow.
test-all: $(STAMP)
	$(PY) -m pytest -m ""

# Every multi-process test file N times in a row (a teardown race fails one run in ten, not every
# run), stopping at the first failure, whose output is shown; prints "k/N passed" per file.
# E.g. make test-repeat N=5, or with the slow modes: make test-repeat N=10 PYTEST_ARGS='-m ""'
N ?= 20
PYTEST_ARGS ?=
MULTIPROCESS_TESTS ?= $(shell grep -lE 'from spawn import|torch.multiprocessing|torchrun' tests/test_*.py)
test-repeat: $(STAMP)
	@log=$$(mktemp); for f in $(MULTIPROCESS_TESTS); do k=0; \
	  for i in $$(seq 1 $(N)); do \
	    $(PY) -m pytest $$f -q -x -p no:cacheprovider $(PYTEST_ARGS) > $$log 2>&1; rc=$$?; \
	    if [ $$rc -eq 0 ]; then k=$$((k + 1)); \
	    elif [ $$rc -eq 5 ]; then echo "$$f: no test selected (all slow? add PYTEST_ARGS='-m \"\"')"; continue 2; \
	    else cat $$log; echo "$$f: $$k/$(N) passed (run $$i failed)"; rm -f $$log; exit 1; fi; \
	  done; echo "$$f: $$k/$(N) passed"; \
	done; rm -f $$log

# On a machine with a CUDA GPU: device tests, MoE layer and training benchmarks, one table.
gpu-check: $(STAMP)
	bash benchmarks/gpu_check.sh

# ruff, then the import contracts in pyproject.toml ([tool.importlinter]: the floors of README's Architecture).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
