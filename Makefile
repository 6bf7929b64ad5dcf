# rayhash — developer entry points. `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DATASET ?= synthetic
DATA    ?=
LIMIT   ?=
PYTEST_ARGS ?=
# pytest-xdist processes, each taking whole test files (PYTEST_WORKERS=0: every test in one process)
PYTEST_WORKERS ?= 2

.PHONY: install lint test demo bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,dev]'
	touch $@

install: $(VENV)/.installed

lint: install  # ruff, configured in pyproject.toml; `make test` runs it first and stops on a lint error
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/rayhash demo --dataset $(DATASET) $(if $(DATA),--data $(DATA),) $(if $(LIMIT),--limit $(LIMIT),) --out runs/demo-$(DATASET)

bench: install
	$(PY) benchmarks/bench_metrics.py

gpu-check: install  # first thing to run on a new GPU node: proves and times the GPU paths (exit 2: no GPU)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf runs .pytest_cache
