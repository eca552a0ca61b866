# `make demo` and `make test` each create or update .venv idempotently, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saekit-installed

.PHONY: demo test test-slow test-interop interop-env mutation lint format bench gpu-smoke clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[hf,dev]"
	touch $(STAMP)

# --force: a second `make demo` replaces the previous demo run in runs/train (saekit refuses to
# start over an existing run otherwise).
demo: $(STAMP)
	$(VENV)/bin/saekit train --force

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not interop"

# End-to-end, kill -9 and torchrun-launch checks; CI runs them after `make test`.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The other SAE libraries (sae-lens, eai-sparsify, dictionary-learning, circuit-tracer) and
# SAEBench (sae-bench: tests/interop/test_saebench.py) in their own venv, torch
# pinned to the same CPU build; tests/interop load saekit's exports with them and import theirs.
BENCHENV := .benchenv
BENCHSTAMP := $(BENCHENV)/.interop-installed

$(BENCHSTAMP): constraints.txt
	test -x $(BENCHENV)/bin/python || $(PYTHON) -m venv $(BENCHENV)
	$(BENCHENV)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(BENCHENV)/bin/pip install -q -c constraints.txt eai-sparsify sae-lens dictionary-learning
	$(BENCHENV)/bin/pip install -q -c constraints.txt sae-bench
	$(BENCHENV)/bin/pip uninstall -q -y torchvision nvidia-nccl-cu12
	$(BENCHENV)/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(BENCHSTAMP)

# circuit-tracer (tests/interop/test_circuit_tracer_real.py) with --no-deps: 0.5.0 pins
# transformers<=4.57.3 and huggingface-hub<1 for its replacement models, which would downgrade
# transformers, transformer-lens and huggingface-hub under sae-lens and sae-bench; the tests use
# only its transcoder classes and loaders (torch, safetensors, numpy, already here). Its own
# stamp, so a venv built before it gets it too.
CTSTAMP := $(BENCHENV)/.circuit-tracer-installed

$(CTSTAMP): $(BENCHSTAMP)
	$(BENCHENV)/bin/pip install -q -c constraints.txt --no-deps circuit-tracer==0.5.0
	$(BENCHENV)/bin/python -c "import circuit_tracer.transcoder.cross_layer_transcoder, circuit_tracer.transcoder.single_layer_transcoder"
	touch $(CTSTAMP)

interop-env: $(BENCHSTAMP) $(CTSTAMP)

# Round trips with the real libraries (~45 s, most of it importing sae_lens); CI runs them.
test-interop: $(STAMP) $(BENCHSTAMP) $(CTSTAMP)
	$(PY) -m pytest -q -m interop

# Every named deliberate fault must fail the suite (tests/mutation_check.py); CI runs it.
mutation: $(STAMP)
	$(PY) tests/mutation_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_objectives.py

# benchmarks/gpu.sh at tiny sizes on this machine: GPU parts reported as skipped (issue 16).
gpu-smoke: $(STAMP)
	SAEKIT_GPU_SMOKE=1 PYTHON=$(PY) benchmarks/gpu.sh runs/gpu_smoke.md

clean:
	rm -rf $(VENV) runs .pytest_cache
