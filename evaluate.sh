#!/usr/bin/env bash
# Benchmark a base model and its fine-tune with lm-evaluation-harness, in the published table layout.
#
#   bash evaluate.sh                                # tiny model + adapter of fine-tuning.sh on the openllm suite (its data from the hub)
#   SUITE=my_task INCLUDE_PATH=./my_tasks bash evaluate.sh   # local tasks (CPU, offline)
#   MODELS=meta-llama/Llama-2-13b-hf,./Platypus2-13B SUITE=openllm bash evaluate.sh
#   MODELS=beomi/llama-2-ko-7b,./outputs/ko-qlora SUITE=kobest bash evaluate.sh --limit 100
#
# Environment: MODELS (comma-separated models, adapters or merged folders), SUITE (openllm, kobest
# or task names), OUTPUT_DIR, INCLUDE_PATH (local task folder), LIMIT, NUM_FEWSHOT, BATCH_SIZE.
# Further arguments go to evaluate.py and win over these.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODELS="${MODELS:-builtin:tiny-llama,./outputs/platypus-qlora}"
SUITE="${SUITE:-openllm}"
OUTPUT_DIR="${OUTPUT_DIR:-./outputs/eval}"
PYTHON="${PYTHON:-python}"

args=(--models "$MODELS" --suite "$SUITE" --output_dir "$OUTPUT_DIR" --batch_size "${BATCH_SIZE:-auto}"
      ${INCLUDE_PATH:+--include_path "$INCLUDE_PATH"} ${LIMIT:+--limit "$LIMIT"}
      ${NUM_FEWSHOT:+--num_fewshot "$NUM_FEWSHOT"})
exec "$PYTHON" "$here/evaluate.py" "${args[@]}" "$@"
