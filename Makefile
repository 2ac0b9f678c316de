# Fixed entry points: make demo | make test | make bench | make model
# The image: make image | make test-image (CI runs test-image after test)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REQS := requirements.txt requirements-dev.txt requirements-build.txt pyproject.toml

.PHONY: venv venv-http2 venv-deepgram node-deepgram demo test test-unit test-slow lint bench bench-gpu model whisper lm serve clean \
	image test-image repository

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

# The bidirectional-stream client (InvokeEndpointWithBidirectionalStream): AWS's HTTP/2 SDK
# needs Python >= 3.12, so it gets a venv of its own.  Interpreter: PYTHON_HTTP2 if set,
# else the first of python3.12 / python3.13 / pyenv's 3.12-3.13 installs that runs.  With
# none on the machine nothing is built and the test that needs it skips, saying so.
VENV_HTTP2 ?= .venv-http2
HTTP2_STAMP := $(VENV_HTTP2)/.installed
HTTP2_REQS := client/requirements-http2.txt pyproject.toml
PY312_CANDIDATES = $(PYTHON_HTTP2) python3.12 python3.13 \
	$(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12 $(HOME)/.pyenv/versions/3.13*/bin/python3.13)

venv-http2: $(HTTP2_STAMP)

$(HTTP2_STAMP): $(HTTP2_REQS)
	@py=""; for c in $(PY312_CANDIDATES); do \
		if $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py=$$c; break; fi; \
	done; \
	if [ -z "$$py" ]; then \
		echo "venv-http2: no Python >= 3.12 found; $(VENV_HTTP2) not built (its test will skip)"; \
		exit 0; \
	fi; \
	set -e; \
	test -x $(VENV_HTTP2)/bin/python || $$py -m venv $(VENV_HTTP2); \
	$(VENV_HTTP2)/bin/python -m pip install -q --upgrade pip; \
	$(VENV_HTTP2)/bin/python -m pip install -q -r client/requirements-http2.txt; \
	$(VENV_HTTP2)/bin/python -m pip install -q --no-deps -e .; \
	touch $@

# Deepgram's own SDKs (deepgram-sdk, deepgram-sagemaker, deepgram-captions) for the
# /v1/listen tests: Python >= 3.12 like venv-http2, but a venv of their own (they pin an
# older AWS HTTP/2 SDK).  Without such a Python nothing is built and those tests skip.
VENV_DEEPGRAM ?= .venv-deepgram
DEEPGRAM_STAMP := $(VENV_DEEPGRAM)/.installed

venv-deepgram: $(DEEPGRAM_STAMP)

$(DEEPGRAM_STAMP): tests/requirements-deepgram.txt
	@py=""; for c in $(PY312_CANDIDATES); do \
		if $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py=$$c; break; fi; \
	done; \
	if [ -z "$$py" ]; then \
		echo "venv-deepgram: no Python >= 3.12 found; $(VENV_DEEPGRAM) not built (its tests will skip)"; \
		exit 0; \
	fi; \
	set -e; \
	test -x $(VENV_DEEPGRAM)/bin/python || $$py -m venv $(VENV_DEEPGRAM); \
	$(VENV_DEEPGRAM)/bin/python -m pip install -q --upgrade pip; \
	$(VENV_DEEPGRAM)/bin/python -m pip install -q -r tests/requirements-deepgram.txt; \
	touch $@

# Deepgram's Node SDK (@deepgram/sdk, @deepgram/captions) for the same tests, from
# tests/deepgram_node/package-lock.json; without npm nothing is installed and they skip.
NODE_DEEPGRAM_STAMP := tests/deepgram_node/node_modules/.installed

node-deepgram: $(NODE_DEEPGRAM_STAMP)

$(NODE_DEEPGRAM_STAMP): tests/deepgram_node/package-lock.json
	@if ! command -v npm >/dev/null; then \
		echo "node-deepgram: npm not found; the Node SDK tests will skip"; exit 0; \
	fi; \
	set -e; cd tests/deepgram_node && npm ci --no-audit --no-fund --silent && touch node_modules/.installed

whisper: $(WHISPER)

lm: $(LM)

$(LM): $(STAMP) streamasr/artifacts/build_lm.py streamasr/artifacts/sphinx_lm.py
	$(PY) -m streamasr.artifacts.build_lm --out $@

# plus int8 copies for interim refreshes (streamasr/artifacts/quantize_whisper.py): half the
# CPU, WER no worse on assets/eval (benchmarks/results/interims/README.md)
$(WHISPER): $(STAMP) streamasr/artifacts/export_whisper.py streamasr/artifacts/whisper.py streamasr/artifacts/ct2.py streamasr/artifacts/quantize_whisper.py
	$(PY) -m streamasr.artifacts.export_whisper --out $(dir $@)
	$(PY) -m streamasr.artifacts.quantize_whisper --dir $(dir $@)

# model_repository/*/config.pbtxt are generated from one typed spec (streamasr/triton/spec.py,
# which cross-checks the values between models): edit the spec, then regenerate them here.
# tests/unit/test_repository.py fails while a committed file differs from the spec.
repository: venv
	$(PY) -m streamasr.triton.spec --write model_repository

demo: venv whisper lm
	$(PY) -m streamasr.tools.demo

serve: venv whisper lm
	$(PY) -m streamasr.triton.server

# Lint, format and import order, type check (configured in pyproject.toml); CI runs it
# before the tests.  To fix what it reports: ruff check --fix . && ruff format .
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: venv venv-http2 venv-deepgram node-deepgram whisper lm
	$(PY) -m pytest -q tests

# The tests that start no server (tests/unit: a few minutes): for work on the logic
# between full runs.  tests/integration and tests/e2e start real servers.
test-unit: venv
	$(PY) -m pytest -q tests/unit

test-slow: venv venv-http2 venv-deepgram node-deepgram whisper lm
	$(PY) -m pytest -q -m slow tests

# The SageMaker image, built without a Docker daemon or registry access: podman + a local
# stand-in for AWS's base image (docker/local-image says how; as root, installs podman when
# missing; layers cached in /var/tmp/streamasr-podman).  The Whisper graphs and the LM are
# this checkout's (make whisper lm).  On a machine that can pull the real base, build
# with docker as the Dockerfile's header says.
IMAGE ?= localhost/streamasr:standin

image: venv whisper lm
	STREAMASR_IMAGE=$(IMAGE) docker/local-image

# The container contract against the running image (tests/e2e/test_image.py): /ping, /invocations,
# the WebSocket route, SIGTERM, 64 MB of /dev/shm.
test-image: image
	eval "$$(docker/local-image env)" && STREAMASR_IMAGE=$(IMAGE) \
		$(PY) -m pytest -q -rP -m image tests/e2e/test_image.py

bench: venv whisper lm
	$(PY) -m benchmarks.run

# The GPU run (< 8 min): needs an NVIDIA GPU and onnxruntime-gpu in the venv; without
# them it stops at once saying what is missing.  Writes benchmarks/results/gpu/.
bench-gpu: venv whisper lm
	$(PY) -m benchmarks.gpu $(BENCH_GPU_ARGS)

model: venv whisper lm
	$(PY) -m training.build_model

clean:
	rm -rf build .pytest_cache
