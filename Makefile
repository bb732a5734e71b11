# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint bench cohorts clean-outputs

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (torch 2.14.1 is installed from local files for Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mil_experiments method=abmil_acc alpha=25

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check mil_experiments tests scripts

bench: $(STAMP)
	$(PY) scripts/bench_acc.py

# The benchmark cohorts (c16_like, tcga_like, bright_like, crc_like): slides, masks, LeNet features -> data/cohorts/
cohorts: $(STAMP)
	$(PY) scripts/make_cohorts.py
