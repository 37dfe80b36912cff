#!/usr/bin/env bash
# Builds the TensorRT-LLM engine for the LLM half of a supported model family.
#
#   deploy/trtllm/build_llm.sh FAMILY HF_DIR OUT_DIR
#
# FAMILY: internvl2-1b internvl2-2b internvl2-4b internvl2-8b internvl2-26b qwen-vl-chat
#         llava-1.6 internlm2-chat megrez-3b-omni
# Writes OUT_DIR/checkpoint (TensorRT-LLM checkpoint) and OUT_DIR/engine (serve this one:
# engine.engine_dir in the model YAML). Runs inside the GPU image (deploy/trtllm/Dockerfile).
#
# Sizing (environment variables, defaults in brackets):
#   DTYPE [bfloat16]           float16 | bfloat16
#   MAX_BATCH_SIZE [2]         concurrent sequences in the engine
#   MAX_INPUT_LEN [8192]       prompt tokens, embedding rows included
#   MAX_OUTPUT_LEN [2048]      MAX_SEQ_LEN = MAX_INPUT_LEN + MAX_OUTPUT_LEN
#   MAX_NUM_TOKENS [8192]      tokens per engine step (chunked prefill splits longer prompts)
#   MAX_TILES [26]             InternVL2: 448px tiles per request (2 images x (12 + thumbnail))
#   MAX_IMAGES [4]             Qwen-VL / LLaVA-1.6: images per request
#   MM_ROWS [per family]       embedding rows per request; overrides the two above
#   TP_SIZE [1]                tensor parallelism (the mmserve engine serves tp 1 only)
#   TRTLLM_EXAMPLES [/app/tensorrt_llm/examples]   where the converters live
# The prompt table holds MAX_BATCH_SIZE x MM_ROWS rows (--max_multimodal_len, the same
# setting as --max_prompt_embedding_table_size); one request may use MM_ROWS of them.
set -euo pipefail

usage() { sed -n '2,9p' "$0" >&2; exit 2; }
[[ $# -eq 3 ]] || usage
FAMILY=$1 HF_DIR=$(realpath "$2") OUT=$3
HERE=$(cd "$(dirname "$0")" && pwd)
DTYPE=${DTYPE:-bfloat16}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-2}
MAX_INPUT_LEN=${MAX_INPUT_LEN:-8192}
MAX_OUTPUT_LEN=${MAX_OUTPUT_LEN:-2048}
MAX_NUM_TOKENS=${MAX_NUM_TOKENS:-8192}
MAX_TILES=${MAX_TILES:-26}
MAX_IMAGES=${MAX_IMAGES:-4}
TP_SIZE=${TP_SIZE:-1}
TRTLLM_EXAMPLES=${TRTLLM_EXAMPLES:-/app/tensorrt_llm/examples}
MAX_SEQ_LEN=$((MAX_INPUT_LEN + MAX_OUTPUT_LEN))

# family -> converter, extraction (prefix:config key, or "-"), rows per request
case $FAMILY in
  internvl2-1b)             CONVERTER=qwen;      EXTRACT=language_model.:llm_config; ROWS=$((MAX_TILES * 256)) ;;
  internvl2-2b|internvl2-8b|internvl2-26b)
                            CONVERTER=internlm2; EXTRACT=language_model.:llm_config; ROWS=$((MAX_TILES * 256)) ;;
  internvl2-4b)             CONVERTER=phi;       EXTRACT=language_model.:llm_config; ROWS=$((MAX_TILES * 256)) ;;
  qwen-vl-chat)             CONVERTER=qwen;      EXTRACT=-;                          ROWS=$((MAX_IMAGES * 256)) ;;
  llava-1.6)                CONVERTER=llama;     EXTRACT=-;                          ROWS=$((MAX_IMAGES * 2928)) ;;
  internlm2-chat)           CONVERTER=internlm2; EXTRACT=-;                          ROWS=0 ;;
  megrez-3b-omni)           CONVERTER=llama;     EXTRACT=llm.:llm_config;            ROWS=2048 ;;
  *) echo "unknown family '$FAMILY'" >&2; usage ;;
esac
MM_ROWS=${MM_ROWS:-$ROWS}
MAX_MULTIMODAL_LEN=$((MAX_BATCH_SIZE * MM_ROWS))
if (( MM_ROWS > MAX_INPUT_LEN )); then
  echo "MM_ROWS=$MM_ROWS embedding rows do not fit MAX_INPUT_LEN=$MAX_INPUT_LEN; raise MAX_INPUT_LEN" >&2
  exit 2
fi

START=$(date +%s)
step() { echo "==> [$(( $(date +%s) - START ))s] $*"; }

find_converter() {
  for dir in "$TRTLLM_EXAMPLES/$1" "$TRTLLM_EXAMPLES/models/core/$1" "$TRTLLM_EXAMPLES/models/contrib/$1"; do
    [[ -f $dir/convert_checkpoint.py ]] && { echo "$dir/convert_checkpoint.py"; return; }
  done
  echo "no $1/convert_checkpoint.py under $TRTLLM_EXAMPLES (set TRTLLM_EXAMPLES)" >&2
  exit 1
}

mkdir -p "$OUT"
SOURCE=$HF_DIR
if [[ $EXTRACT != - ]]; then
  step "1/3 extracting the language model from $HF_DIR (prefix ${EXTRACT%%:*})"
  SOURCE=$OUT/hf_llm
  python3 "$HERE/extract_llm.py" "$HF_DIR" "$SOURCE" --prefix "${EXTRACT%%:*}" --config-key "${EXTRACT#*:}"
else
  step "1/3 $FAMILY is converted from $HF_DIR directly"
fi

step "2/3 converting to a TensorRT-LLM checkpoint with $CONVERTER ($DTYPE, tp $TP_SIZE)"
python3 "$(find_converter "$CONVERTER")" --model_dir "$SOURCE" --output_dir "$OUT/checkpoint" \
  --dtype "$DTYPE" --tp_size "$TP_SIZE"

step "3/3 trtllm-build: batch $MAX_BATCH_SIZE, input $MAX_INPUT_LEN, seq $MAX_SEQ_LEN, prompt table $MAX_MULTIMODAL_LEN rows ($MM_ROWS per request)"
args=(--checkpoint_dir "$OUT/checkpoint" --output_dir "$OUT/engine"
      --gemm_plugin "$DTYPE" --gpt_attention_plugin "$DTYPE"
      --max_batch_size "$MAX_BATCH_SIZE" --max_input_len "$MAX_INPUT_LEN"
      --max_seq_len "$MAX_SEQ_LEN" --max_num_tokens "$MAX_NUM_TOKENS"
      --paged_kv_cache enable --use_paged_context_fmha enable --remove_input_padding enable)
(( MAX_MULTIMODAL_LEN > 0 )) && args+=(--max_multimodal_len "$MAX_MULTIMODAL_LEN")
trtllm-build "${args[@]}"

step "done: engine in $OUT/engine"
python3 - "$OUT/engine/config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
build, pretrained = config["build_config"], config["pretrained_config"]
print(f"    {pretrained['architecture']} {pretrained['dtype']} vocab {pretrained['vocab_size']} "
      f"hidden {pretrained['hidden_size']}; max_batch_size {build['max_batch_size']}, "
      f"max_seq_len {build['max_seq_len']}, prompt table {build.get('max_prompt_embedding_table_size', 0)}")
PY
