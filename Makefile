# Fixed entry points: make demo | make test | make bench | make model
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REQS := requirements.txt requirements-dev.txt requirements-build.txt pyproject.toml

.PHONY: venv demo test test-slow bench model whisper lm serve clean

# Whisper tiny.en re-decoder for two-pass finals (final_pass): ~230 MB, built, not in git.
WHISPER := model_repository/final_pass/1/whisper_decoder.onnx

# Word LM the CTC beam search fuses (make lm): ~100 MB ARPA read from the pocketsphinx
# wheel's CMU en-us trigram + <unk>; built in seconds, not in git.
LM := model_repository/ctc_decoder/1/en-us.arpa

venv: $(STAMP)

# Idempotent: re-runs only when a requirements file changes.
$(STAMP): $(REQS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-build.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

whisper: $(WHISPER)

lm: $(LM)

$(LM): $(STAMP) training/build_lm.py training/sphinx_lm.py
	$(PY) -m training.build_lm --out $@

$(WHISPER): $(STAMP) training/export_whisper.py training/whisper.py training/ct2.py
	$(PY) -m training.export_whisper --out $(dir $@)

demo: venv whisper lm
	$(PY) -m streamasr.demo

serve: venv whisper lm
	$(PY) -m streamasr.server

test: venv whisper lm
	$(PY) -m pytest -q tests

test-slow: venv whisper lm
	$(PY) -m pytest -q -m slow tests

bench: venv whisper lm
	$(PY) -m benchmarks.run

model: venv whisper lm
	$(PY) -m training.build_model

clean:
	rm -rf build .pytest_cache
