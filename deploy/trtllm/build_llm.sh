#!/usr/bin/env bash
# Builds the TensorRT-LLM engine for the LLM half of a supported model family.
#
#   deploy/trtllm/build_llm.sh FAMILY HF_DIR OUT_DIR
#
# FAMILY: internvl2-1b internvl2-2b internvl2-4b internvl2-8b internvl2-26b qwen-vl-chat
#         llava-1.6 internlm2-chat megrez-3b-omni
# Writes OUT_DIR/checkpoint (TensorRT-LLM checkpoint) and OUT_DIR/engine (serve this one:
# engine.engine_dir in the model YAML). Runs inside the GPU image (TensorRT-LLM 1.2.x, the
# last line with trtllm-build and the C++ executor; deploy/trtllm/Dockerfile).
#
# Sizing (environment variables, defaults in brackets):
#   DTYPE [bfloat16]           float16 | bfloat16
#   MAX_BATCH_SIZE [2]         concurrent sequences in the engine
#   MAX_INPUT_LEN [8192]       prompt tokens, embedding rows included
#   MAX_OUTPUT_LEN [2048]      MAX_SEQ_LEN = MAX_INPUT_LEN + MAX_OUTPUT_LEN
#     (neither set and the model's context shorter: MAX_SEQ_LEN = the context, a quarter
#      of it, at most 2048, for the output)
#   MAX_NUM_TOKENS [8192]      tokens per engine step (chunked prefill splits longer prompts)
#   MAX_TILES [26]             InternVL2: 448px tiles per request (2 images x (12 + thumbnail))
#   MAX_IMAGES [4; llava-1.6: 1]  Qwen-VL / LLaVA-1.6: images per request (LLaVA: 2928 rows each)
#   MM_ROWS [per family]       embedding rows per request; overrides the two above
#   WEIGHT_ONLY [none]         int8 | int4: weight-only quantization (converter
#                              --use_weight_only --weight_only_precision)
#   INT8_KV_CACHE [0]          1: int8 KV cache (converter --int8_kv_cache; llama and qwen
#                              converters only; calibrates on CALIB_DATASET)
#   CALIB_DATASET [converter's default, a hub dataset]  a local dataset directory (no network)
#   EXTRACT_LLM [0]            InternVL2: 1 copies the LLM out first (extract_llm.py), for
#                              when its remote code does not load in this image's transformers
#   TP_SIZE [1]                tensor parallelism (the mmserve engine serves tp 1 only)
#   TRTLLM_EXAMPLES [/app/tensorrt_llm/examples]   where the converters live
#   DRY_RUN [0]                1: print the sizes and commands, run nothing
# The prompt table holds MAX_BATCH_SIZE x MM_ROWS rows (--max_multimodal_len, the same
# setting as --max_prompt_embedding_table_size); one request may use MM_ROWS of them.
set -euo pipefail

usage() { sed -n '2,9p' "$0" >&2; exit 2; }
fail() { echo "build_llm.sh: $*" >&2; exit 2; }
[[ $# -eq 3 ]] || usage
FAMILY=$1 HF_DIR=$(realpath "$2") OUT=$3
HERE=$(cd "$(dirname "$0")" && pwd)
DTYPE=${DTYPE:-bfloat16}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-2}
MAX_NUM_TOKENS=${MAX_NUM_TOKENS:-8192}
MAX_TILES=${MAX_TILES:-26}
TP_SIZE=${TP_SIZE:-1}
TRTLLM_EXAMPLES=${TRTLLM_EXAMPLES:-/app/tensorrt_llm/examples}
DRY_RUN=${DRY_RUN:-0}
[[ -f $HF_DIR/config.json ]] || fail "$HF_DIR has no config.json (not a HF checkpoint directory)"

# family -> converter, extraction (prefix:config key, or "-"), rows per image/tile
case $FAMILY in
  internvl2-1b)             CONVERTER=qwen;      EXTRACT=language_model.:llm_config ;;
  internvl2-2b|internvl2-8b|internvl2-26b)
                            CONVERTER=internlm2; EXTRACT=language_model.:llm_config ;;
  internvl2-4b)             CONVERTER=phi;       EXTRACT=language_model.:llm_config ;;
  qwen-vl-chat)             CONVERTER=qwen;      EXTRACT=- ;;
  llava-1.6)                CONVERTER=llama;     EXTRACT=- ;;
  internlm2-chat)           CONVERTER=internlm2; EXTRACT=- ;;
  megrez-3b-omni)           CONVERTER=llama;     EXTRACT=llm.:llm_config ;;
  *) echo "unknown family '$FAMILY'" >&2; usage ;;
esac
# The converters read InternVL2's own layout (its llm_config and language_model. weights);
# Megrez's llm. prefix they do not know.
if [[ $FAMILY == internvl2-* && ${EXTRACT_LLM:-0} != 1 ]]; then EXTRACT=-; fi
case $FAMILY in
  internvl2-*)    ROWS=$((MAX_TILES * 256)) ;;
  qwen-vl-chat)   ROWS=$((${MAX_IMAGES:-4} * 256)) ;;
  llava-1.6)      ROWS=$((${MAX_IMAGES:-1} * 2928)) ;;  # 2928: the largest anyres image
  internlm2-chat) ROWS=0 ;;
  megrez-3b-omni) ROWS=2048 ;;
esac
MM_ROWS=${MM_ROWS:-$ROWS}

# The model's context (max_position_embeddings of the LLM config), when it says.
CONTEXT=$(python3 - "$HF_DIR/config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
for key in ("llm_config", "text_config"):
    config = config.get(key) or config
print(config.get("max_position_embeddings") or config.get("seq_length") or 0)
PY
)
if [[ -z ${MAX_INPUT_LEN:-} && -z ${MAX_OUTPUT_LEN:-} ]] && (( CONTEXT > 0 && CONTEXT < 8192 + 2048 )); then
  MAX_OUTPUT_LEN=$(( CONTEXT / 4 < 2048 ? CONTEXT / 4 : 2048 ))
  MAX_INPUT_LEN=$(( CONTEXT - MAX_OUTPUT_LEN ))
fi
MAX_INPUT_LEN=${MAX_INPUT_LEN:-8192}
MAX_OUTPUT_LEN=${MAX_OUTPUT_LEN:-2048}
MAX_SEQ_LEN=$((MAX_INPUT_LEN + MAX_OUTPUT_LEN))
MAX_MULTIMODAL_LEN=$((MAX_BATCH_SIZE * MM_ROWS))
if (( MM_ROWS > MAX_INPUT_LEN )); then
  hint="raise MAX_INPUT_LEN"
  [[ $FAMILY == llava-1.6 ]] && hint="lower MAX_IMAGES (each llava-1.6 image takes up to 2928 rows) or $hint"
  [[ $FAMILY == qwen-vl-chat ]] && hint="lower MAX_IMAGES (256 rows each) or $hint"
  [[ $FAMILY == internvl2-* ]] && hint="lower MAX_TILES (256 rows each) or $hint"
  fail "MM_ROWS=$MM_ROWS embedding rows per request do not fit MAX_INPUT_LEN=$MAX_INPUT_LEN; $hint"
fi

find_converter() {
  for dir in "$TRTLLM_EXAMPLES/$1" "$TRTLLM_EXAMPLES/models/core/$1" "$TRTLLM_EXAMPLES/models/contrib/$1"; do
    [[ -f $dir/convert_checkpoint.py ]] && { echo "$dir/convert_checkpoint.py"; return; }
  done
  fail "no $1/convert_checkpoint.py under $TRTLLM_EXAMPLES (set TRTLLM_EXAMPLES)"
}
CONVERT=$(find_converter "$CONVERTER")

SOURCE=$HF_DIR
[[ $EXTRACT != - ]] && SOURCE=$OUT/hf_llm
convert=(--model_dir "$SOURCE" --output_dir "$OUT/checkpoint" --dtype "$DTYPE" --tp_size "$TP_SIZE")
case ${WEIGHT_ONLY:-} in
  "") ;;
  int8|int4) convert+=(--use_weight_only --weight_only_precision "$WEIGHT_ONLY") ;;
  *) fail "WEIGHT_ONLY must be int8 or int4, got '$WEIGHT_ONLY'" ;;
esac
if [[ ${INT8_KV_CACHE:-0} == 1 ]]; then
  python3 "$CONVERT" --help 2>/dev/null | grep -q -- --int8_kv_cache \
    || fail "the $CONVERTER converter has no --int8_kv_cache; build $FAMILY without INT8_KV_CACHE"
  convert+=(--int8_kv_cache)
  [[ -n ${CALIB_DATASET:-} ]] && convert+=(--calib_dataset "$CALIB_DATASET")
fi
build=(--checkpoint_dir "$OUT/checkpoint" --output_dir "$OUT/engine"
       --gemm_plugin "$DTYPE" --gpt_attention_plugin "$DTYPE"
       --max_batch_size "$MAX_BATCH_SIZE" --max_input_len "$MAX_INPUT_LEN"
       --max_seq_len "$MAX_SEQ_LEN" --max_num_tokens "$MAX_NUM_TOKENS"
       --kv_cache_type paged --use_paged_context_fmha enable --remove_input_padding enable)
(( MAX_MULTIMODAL_LEN > 0 )) && build+=(--max_multimodal_len "$MAX_MULTIMODAL_LEN")

START=$(date +%s)
step() { echo "==> [$(( $(date +%s) - START ))s] $*"; }
run() { if [[ $DRY_RUN == 1 ]]; then echo "+ $*"; else "$@"; fi; }

step "$FAMILY: context ${CONTEXT:-?}, batch $MAX_BATCH_SIZE, input $MAX_INPUT_LEN, seq $MAX_SEQ_LEN, prompt table $MAX_MULTIMODAL_LEN rows ($MM_ROWS per request)"
run mkdir -p "$OUT"
if [[ $EXTRACT != - ]]; then
  step "1/3 extracting the language model from $HF_DIR (prefix ${EXTRACT%%:*})"
  run python3 "$HERE/extract_llm.py" "$HF_DIR" "$SOURCE" --prefix "${EXTRACT%%:*}" --config-key "${EXTRACT#*:}"
else
  step "1/3 $FAMILY is converted from $HF_DIR directly"
fi
step "2/3 converting to a TensorRT-LLM checkpoint with $CONVERTER ($DTYPE, tp $TP_SIZE${WEIGHT_ONLY:+, weight-only $WEIGHT_ONLY})"
run python3 "$CONVERT" "${convert[@]}"
step "3/3 trtllm-build"
run trtllm-build "${build[@]}"
[[ $DRY_RUN == 1 ]] && exit 0

step "done: engine in $OUT/engine"
python3 - "$OUT/engine/config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
build, pretrained = config["build_config"], config["pretrained_config"]
print(f"    {pretrained['architecture']} {pretrained['dtype']} vocab {pretrained['vocab_size']} "
      f"hidden {pretrained['hidden_size']}; max_batch_size {build['max_batch_size']}, "
      f"max_seq_len {build['max_seq_len']}, prompt table {build.get('max_prompt_embedding_table_size', 0)}")
PY
