#!/usr/bin/env bash
# Dolphin_ORCA_PlatyPus_LLaMA_70b: QLoRA (NF4) on Llama-2-70B, DeepSpeed ZeRO-2, Open-Platypus + ~1% Dolphin + ~1% OpenOrca.
# Published values: the model card (shared/seeds/001).
#
#   bash recipes/dolphin-orca-platypus-llama-70b.sh                         # train on this node's GPUs, then export merged fp16 weights
#   DRY_RUN=1 NPROC=8 NNODES=2 bash recipes/dolphin-orca-platypus-llama-70b.sh   # the plan for 2 nodes x 8 GPUs; loads nothing
#   TINY=1 bash recipes/dolphin-orca-platypus-llama-70b.sh                  # the embedded tiny model on the sample data (CPU, seconds)
#   LEARNING_RATE=2e-4 bash recipes/dolphin-orca-platypus-llama-70b.sh --num_epochs 2   # environment and extra flags override
#
# Every setting below can be overridden by the environment variable of its name in upper
# case; see recipes/common.sh for TINY, DRY_RUN, EXPORT and the launch variables.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

recipe Dolphin_ORCA_PlatyPus_LLaMA_70b "model card"
# 100% Open-Platypus + ~1% of Dolphin's and OpenOrca's GPT-4 parts, as a mix spec
# ('path_or_id:fraction,...'). Point DOLPHIN_DATA / OPENORCA_DATA at local copies of the
# GPT-4 files (Dolphin: flan1m-alpaca-uncensored.jsonl; OpenOrca: 1M-GPT4-Augmented.parquet).
setting base_model meta-llama/Llama-2-70b-hf
setting data_path "${PLATYPUS_DATA:-garage-bAInd/Open-Platypus}:1.0,${DOLPHIN_DATA:-cognitivecomputations/dolphin}:0.01,${OPENORCA_DATA:-Open-Orca/OpenOrca}:0.01"
setting quantization 4bit
# batch 14 per GPU (8 x A100 80G in the card): the global batch grows with the GPUs
PER_GPU_BATCH="${PER_GPU_BATCH:-14}"
setting batch_size $((PER_GPU_BATCH * NPROC * NNODES))
setting learning_rate 3e-4
setting deepspeed "$repo/configs/zero2.json"
if ! tiny && "$PYTHON" -c "import flash_attn" 2>/dev/null; then
  setting attn_implementation flash_attention_2
fi
EXPORT_METHODS="${EXPORT_METHODS:-dequant peft}"
platypus_defaults
note "'Batch_Size 14' is per GPU (the card's framework counts per device; 14 does not split over 8 GPUs): global batch = 14 x GPUs, reached by gradient accumulation 14 at micro batch 1"
note "unpublished values from the Platypus recipe its data is built on: dropout 0.05, targets gate/up/down, warmup 100, weight decay 0, cutoff 4096, Alpaca template"
note "FlashAttention 2 when the flash-attn package is installed, else SDPA"
note "export with both merge methods the card compares: dequant and peft (EXPORT_METHODS)"
run_recipe "$@"
