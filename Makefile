# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-accuracy clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# make demo ARGS='schedule.budget=1.0': Hydra overrides for the demo
demo: $(STAMP)
	$(PY) -m lightning_d2ft $(ARGS)

# the linters first (seconds), then the suite
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/speed/ops_cost.py

# Fashion-MNIST accuracy sweep (resumable; appends to benchmarks/results/accuracy/fashion/runs.jsonl), then tables
bench-accuracy: $(STAMP)
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	    else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'"; exit 1; fi; }
	nice -n 10 $(PY) benchmarks/accuracy/fashion.py
	$(PY) benchmarks/accuracy/fashion_tables.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
