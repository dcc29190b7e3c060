#!/usr/bin/env bash
# KoT-platypus2-7B: KO-Platypus2-7B-ex tuned on the Korean chain-of-thought set KoCoT_2000.
# Published values: the KoT-platypus README's table (shared/seeds/002).
#
#   bash recipes/kot-platypus2-7b.sh                         # train on this node's GPUs, then export merged fp16 weights
#   DRY_RUN=1 NPROC=8 NNODES=2 bash recipes/kot-platypus2-7b.sh   # the plan for 2 nodes x 8 GPUs; loads nothing
#   TINY=1 bash recipes/kot-platypus2-7b.sh                  # the embedded tiny model on the sample data (CPU, seconds)
#   LEARNING_RATE=2e-4 bash recipes/kot-platypus2-7b.sh --num_epochs 2   # environment and extra flags override
#
# Every setting below can be overridden by the environment variable of its name in upper
# case; see recipes/common.sh for TINY, DRY_RUN, EXPORT and the launch variables.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

recipe KoT-platypus2-7B "KoT-platypus README"
setting base_model kyujinpy/KO-Platypus2-7B-ex
setting data_path kyujinpy/KoCoT_2000
setting batch_size 64
setting num_epochs 15
setting learning_rate 1e-5
setting lr_scheduler linear
setting finetuning lora
setting quantization none
platypus_defaults
note "LoRA, not full fine-tuning: the README's table uses the flag names of Platypus's LoRA-only finetune.py (batch_size, micro_batch_size, cutoff_len); FINETUNING=full trains every weight instead (fp32 master weights: ~16 bytes per parameter, so shard it with DEEPSPEED=configs/zero3.json or configs/fsdp_qlora.yaml)"
note "unpublished values from Platypus: LoRA r 16 / alpha 16 / dropout 0.05 on gate/up/down, warmup 100, weight decay 0, Alpaca template, 16-bit base"
run_recipe "$@"
