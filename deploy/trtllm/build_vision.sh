#!/usr/bin/env bash
# Builds the vision tower (+ projector) as a TensorRT engine with a dynamic tile profile.
#
#   deploy/trtllm/build_vision.sh OUT_DIR [KEY=VALUE ...]
#
# KEY=VALUE pairs are encoder config fields for the tower to export (tower, hidden_size,
# image_size, dtype, ...), e.g. `tower=demo hidden_size=576`. Steps: export ONNX in float32,
# check it against the torch tower with onnxruntime, export it again computing in DTYPE
# (OUT_DIR/vision.DTYPE.onnx), then build OUT_DIR/vision.plan from that as a strongly typed
# network: the engine's precision is the graph's (no FP16/BF16 builder flags, deprecated in
# TensorRT 10.12 and removed in 11).
#
# Environment (defaults in brackets):
#   DTYPE [bfloat16]               engine precision: float16 | bfloat16 | float32
#   MIN_TILES/OPT_TILES/MAX_TILES [1/13/26]   optimization profile over the tile count
#   IMAGE_SIZE [448]               tile side in pixels
#   USE_TRTEXEC [0]                1: build with trtexec instead of the TensorRT Python API
set -euo pipefail

[[ $# -ge 1 ]] || { sed -n '2,14p' "$0" >&2; exit 2; }
OUT=$1; shift
DTYPE=${DTYPE:-bfloat16}
MIN_TILES=${MIN_TILES:-1} OPT_TILES=${OPT_TILES:-13} MAX_TILES=${MAX_TILES:-26}
IMAGE_SIZE=${IMAGE_SIZE:-448}
START=$(date +%s)
step() { echo "==> [$(( $(date +%s) - START ))s] $*"; }

mkdir -p "$OUT"
sets=(--set "image_size=$IMAGE_SIZE")
for pair in "$@"; do sets+=(--set "$pair"); done

SOURCE=$OUT/vision.onnx
[[ $DTYPE != float32 ]] && SOURCE=$OUT/vision.$DTYPE.onnx
step "1/2 exporting the tower to $OUT/vision.onnx, checking it with onnxruntime, and to $SOURCE"
python3 -m encoder_service.towers.onnx_export --out "$OUT/vision.onnx" --dtype "$DTYPE" "${sets[@]}"

step "2/2 building $OUT/vision.plan from $SOURCE (strongly typed, tiles $MIN_TILES/$OPT_TILES/$MAX_TILES)"
if [[ ${USE_TRTEXEC:-0} == 1 ]]; then
  shape() { echo "pixel_values:${1}x3x${IMAGE_SIZE}x${IMAGE_SIZE}"; }
  trtexec --onnx="$SOURCE" --saveEngine="$OUT/vision.plan" --stronglyTyped \
    --minShapes="$(shape "$MIN_TILES")" --optShapes="$(shape "$OPT_TILES")" \
    --maxShapes="$(shape "$MAX_TILES")"
else
  python3 -m encoder_service.towers.tensorrt "$SOURCE" "$OUT/vision.plan" \
    --min-tiles "$MIN_TILES" --opt-tiles "$OPT_TILES" \
    --max-tiles "$MAX_TILES" --image-size "$IMAGE_SIZE"
fi
step "done: $OUT/vision.plan"
