# The README's commands. `make demo` and `make test` each set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# timm needs torchvision; this pair installs from the local disk on the team's machines.
# Users with their own torch can skip it: TORCH_SPEC= make test
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint bench mutation

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q $(TORCH_SPEC); fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mmpeft demo

test: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_foundation.py

# mutation testing of the four seed methods (see [tool.mutmut] in pyproject.toml); prints the
# surviving mutants and the score
mutation: install
	rm -rf mutants
	PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 || true
	$(PY) benchmarks/mutation_score.py
