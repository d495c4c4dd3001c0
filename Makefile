# Everything a newcomer needs: `make test`, `make lint`, `make demo`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: install test test-fast lint demo bench bench-trainers bench-prefix-sharing bench-judge bench-generation test-vllm clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch first, from the local wheel: anything letting pip pick torch freely downloads a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not multiprocess" tests

lint: $(STAMP)
	$(PY) -m ruff check trl_selfplay tests scripts benchmarks
	$(PY) -m ruff format --check trl_selfplay tests scripts benchmarks

demo: $(STAMP)
	$(PY) scripts/demo.py

# Benchmarks write their tables to stdout and to benchmarks/results/*.json; RESULTS.md records them.
bench: bench-trainers bench-prefix-sharing bench-judge bench-generation

bench-trainers: $(STAMP)
	$(PY) benchmarks/bench_step.py

# Issue 15: prefix sharing off vs on, paired step by step in one process (bench_step.py --prefix-sharing: one
# process per config).
bench-prefix-sharing: $(STAMP)
	$(PY) benchmarks/bench_step.py --prefix-sharing --runs 3 --threads 1
	$(PY) benchmarks/bench_prefix_sharing.py

bench-judge: $(STAMP)
	$(PY) benchmarks/bench_judge.py

bench-generation: $(STAMP)
	$(PY) benchmarks/bench_generation.py

# vLLM pins torch/transformers differently from the core, so it gets its own venv (CPU build of vLLM).
test-vllm:
	bash tests/vllm/run.sh

clean:
	rm -rf $(VENV) .pytest_cache
