#!/usr/bin/env bash
# Platypus2-70B: LoRA on Llama-2-70B with Open-Platypus.
# Published values: the Platypus README's table (shared/seeds/003) with Platypus2-70B's learning rate 3e-4.
#
#   bash recipes/platypus2-70b.sh                         # train on this node's GPUs, then export merged fp16 weights
#   DRY_RUN=1 NPROC=8 NNODES=2 bash recipes/platypus2-70b.sh   # the plan for 2 nodes x 8 GPUs; loads nothing
#   TINY=1 bash recipes/platypus2-70b.sh                  # the embedded tiny model on the sample data (CPU, seconds)
#   LEARNING_RATE=2e-4 bash recipes/platypus2-70b.sh --num_epochs 2   # environment and extra flags override
#
# Every setting below can be overridden by the environment variable of its name in upper
# case; see recipes/common.sh for TINY, DRY_RUN, EXPORT and the launch variables.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if ! tiny; then
  NPROC="${NPROC:-1}"  # one process per node, layers spread over its GPUs (see the note below)
fi
recipe Platypus2-70B "Platypus README, learning rate of the 70B model"
setting base_model meta-llama/Llama-2-70b-hf
setting data_path garage-bAInd/Open-Platypus
setting learning_rate 3e-4
setting quantization 8bit
platypus_defaults
note "LoRA on the base loaded in 8-bit, as the published finetune.py loads it (load_in_8bit, fp16 compute); QUANTIZATION=none trains on the 16-bit base, QUANTIZATION=4bit makes it QLoRA"
note "8-bit 70B weights (~66 GiB) leave an 80 GB GPU little room for activations: by default one process per node spreads the layers over all its GPUs (NPROC=1), as the original scripts did; QUANTIZATION=4bit ACCELERATE_CONFIG=configs/fsdp_qlora.yaml with NPROC=<GPUs> shards them instead"
run_recipe "$@"
