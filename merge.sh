#!/usr/bin/env bash
# Fuse the adapter written by fine-tuning.sh into standalone fp16 weights.
#
#   bash merge.sh                                   # ./outputs/platypus-qlora -> ./outputs/platypus-merged, float16
#                                                   # (the quick start's adapter; a rerun replaces it)
#   PEFT_MODEL_PATH=./Platypus2-13B-lora OUTPUT_DIR=./Platypus2-13B bash merge.sh --verify
#   GGUF=f16,q8_0 bash merge.sh --verify                # also platypus-merged-f16.gguf and -q8_0.gguf
#
# Environment: PEFT_MODEL_PATH (the adapter), OUTPUT_DIR, BASE_MODEL (default: the base the
# adapter's run_config.json records), METHOD (auto, dequant, peft), DTYPE (float16, bfloat16,
# float32), GGUF (GGUF files to write as well, e.g. q8_0 or f16,q8_0). Further arguments go to merge.py.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
case " $* " in *" --help "* | *" -h "*) exec "$PYTHON" "$here/merge.py" --help ;; esac  # the flags; nothing run
demo=""
if [ -z "${PEFT_MODEL_PATH:-}" ] && [ -z "${OUTPUT_DIR:-}" ]; then
  demo=1  # the quick start's adapter
fi
PEFT_MODEL_PATH="${PEFT_MODEL_PATH:-./outputs/platypus-qlora}"
OUTPUT_DIR="${OUTPUT_DIR:-./outputs/platypus-merged}"

args=(--peft_model_path "$PEFT_MODEL_PATH" --output_dir "$OUTPUT_DIR" --method "${METHOD:-auto}"
      --dtype "${DTYPE:-float16}")
if [ -n "${GGUF:-}" ]; then
  args+=(--gguf "$GGUF")
fi
# a rerun of the quick start replaces its previous merged model (never a merge of another base model)
if [ -n "$demo" ]; then
  source "$here/recipes/demo-settings.sh"  # the quick starts' base models: $quickstart_base, $demo_base
  if [ -f "$OUTPUT_DIR/merge_config.json" ] && grep -qF -e "\"base_model\": \"$quickstart_base\"" \
      -e "\"base_model\": \"$demo_base\"" "$OUTPUT_DIR/merge_config.json"; then
    echo "Replacing the previous quick-start merge in $OUTPUT_DIR"
    args+=(--overwrite True)
  fi
fi
if [ -n "${BASE_MODEL:-}" ]; then
  args+=(--base_model_name_or_path "$BASE_MODEL")
fi
exec "$PYTHON" "$here/merge.py" "${args[@]}" "$@"
