#!/usr/bin/env bash
# The GPU check (tests/gpu/device_check.py): one line per check, exit 1 when one fails.
#
#   tests/gpu/device_check.sh               # a CUDA host: bf16, the full sizes (a few minutes)
#   tests/gpu/device_check.sh --device cpu  # the dry run of the same checks (seconds)
#
# Needs this checkout, python3 with torch and transformers (plus numpy, pillow, safetensors,
# pyyaml, tqdm, protobuf) and the generated gRPC stubs. It installs nothing from a network:
# wheels found in .whl/ are installed into a temporary directory first on PYTHONPATH, and
# missing stubs are generated only where grpc_tools is installed. `make gpu-check-bundle`
# prepares both (.whl/ holds a protobuf wheel as new as the stubs' generated code).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d -t mmserve-site-XXXXXX)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ ! -f protos/common_pb2.py ]]; then
  if "$PYTHON" -c "import grpc_tools" 2>/dev/null; then
    "$PYTHON" protos/generate.py
  else
    echo "[FAIL] env: the gRPC stubs are not generated and grpc_tools is not installed here;" \
         "run 'make gpu-check-bundle' where it is and bring protos/*_pb2.py along" >&2
    exit 1
  fi
fi
if ! err=$("$PYTHON" -c "import protos.encoder_pb2" 2>&1); then
  echo "[FAIL] env: the generated stubs do not import ($(tail -n1 <<<"$err"));" \
       "bring a protobuf wheel as new as their generated code in .whl/ (make gpu-check-bundle)" >&2
  exit 1
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$PYTHON" tests/gpu/device_check.py "$@"
