#!/usr/bin/env bash
# Platypus2-13B: LoRA on Llama-2-13B with Open-Platypus.
# Published values: the Platypus README's hyperparameter table (shared/seeds/003).
#
#   bash recipes/platypus2-13b.sh                         # train on this node's GPUs, then export merged fp16 weights
#   DRY_RUN=1 NPROC=8 NNODES=2 bash recipes/platypus2-13b.sh   # the plan for 2 nodes x 8 GPUs; loads nothing
#   TINY=1 bash recipes/platypus2-13b.sh                  # the embedded tiny model on the sample data (CPU, seconds)
#   LEARNING_RATE=2e-4 bash recipes/platypus2-13b.sh --num_epochs 2   # environment and extra flags override
#
# Every setting below can be overridden by the environment variable of its name in upper
# case; see recipes/common.sh for TINY, DRY_RUN, EXPORT and the launch variables.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

recipe Platypus2-13B "Platypus README"
setting base_model meta-llama/Llama-2-13b-hf
setting data_path garage-bAInd/Open-Platypus
setting quantization 8bit
platypus_defaults
note "LoRA on the base loaded in 8-bit, as the published finetune.py loads it (load_in_8bit, fp16 compute); QUANTIZATION=none trains on the 16-bit base, QUANTIZATION=4bit makes it QLoRA"
note "1 epoch (the table lists '1,5'; 1 is the Platypus2 models' value)"
run_recipe "$@"
