#!/usr/bin/env bash
# Launch finetune.py with the Platypus recipe.
#
#   bash fine-tuning.sh                         # tiny embedded model + bundled sample data (CPU, offline)
#   BASE_MODEL=meta-llama/Llama-2-13b-hf DATA_PATH=garage-bAInd/Open-Platypus \
#     OUTPUT_DIR=./Platypus2-13B-lora bash fine-tuning.sh
#   bash fine-tuning.sh --learning_rate 3e-4 --num_epochs 2      # extra flags go to finetune.py
#
# Environment: BASE_MODEL, DATA_PATH, OUTPUT_DIR; NPROC (processes per node, default: the
# number of GPUs, else 1); NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for several nodes.
# With more than one process in total, the job runs under torchrun (data parallel).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE_MODEL="${BASE_MODEL:-builtin:tiny-llama}"
DATA_PATH="${DATA_PATH:-$here/data/sample_platypus.json}"
OUTPUT_DIR="${OUTPUT_DIR:-./outputs/platypus-qlora}"
PYTHON="${PYTHON:-python}"

if [ -z "${NPROC:-}" ]; then
  # the GPUs this process may use (CUDA_VISIBLE_DEVICES included), at least 1
  NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)
fi
NNODES="${NNODES:-1}"

# Platypus's published hyperparameters, spelled out so this file documents the recipe.
args=(
  --base_model "$BASE_MODEL"
  --data_path "$DATA_PATH"
  --output_dir "$OUTPUT_DIR"
  --batch_size 16
  --micro_batch_size 1
  --num_epochs 1
  --learning_rate 4e-4
  --cutoff_len 4096
  --val_set_size 0
  --lora_r 16
  --lora_alpha 16
  --lora_dropout 0.05
  --lora_target_modules '[gate_proj, down_proj, up_proj]'
  --train_on_inputs False
  --add_eos_token False
  --group_by_length False
  --prompt_template_name alpaca
  --lr_scheduler cosine
  --warmup_steps 100
  --weight_decay 0.0
)

if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  exec "$PYTHON" -m torch.distributed.run \
    --nproc_per_node "$NPROC" \
    --nnodes "$NNODES" \
    --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" \
    "$here/finetune.py" "${args[@]}" "$@"
fi
exec "$PYTHON" "$here/finetune.py" "${args[@]}" "$@"
