# Fixed entry points: make demo | make test | make bench | make model
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REQS := requirements.txt requirements-dev.txt requirements-build.txt pyproject.toml

.PHONY: venv demo test test-slow bench model serve clean

venv: $(STAMP)

# Idempotent: re-runs only when a requirements file changes.
$(STAMP): $(REQS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-build.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

demo: venv
	$(PY) -m streamasr.demo

serve: venv
	$(PY) -m streamasr.server

test: venv
	$(PY) -m pytest -q tests

test-slow: venv
	$(PY) -m pytest -q -m slow tests

bench: venv
	$(PY) -m benchmarks.run

model: venv
	$(PY) -m training.build_model

clean:
	rm -rf build .pytest_cache
