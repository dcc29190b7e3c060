#!/usr/bin/env bash
# PlatYi-34B-Q: 4-bit LoRA (QLoRA) on Yi-34B with Open-Platypus.
# Published values: the PlatYi-34B README's table for PlatYi-34B-Q (shared/seeds/000).
#
#   bash recipes/platyi-34b-q.sh                         # train on this node's GPUs, then export merged fp16 weights
#   DRY_RUN=1 NPROC=8 NNODES=2 bash recipes/platyi-34b-q.sh   # the plan for 2 nodes x 8 GPUs; loads nothing
#   TINY=1 bash recipes/platyi-34b-q.sh                  # the embedded tiny model on the sample data (CPU, seconds)
#   LEARNING_RATE=2e-4 bash recipes/platyi-34b-q.sh --num_epochs 2   # environment and extra flags override
#
# Every setting below can be overridden by the environment variable of its name in upper
# case; see recipes/common.sh for TINY, DRY_RUN, EXPORT and the launch variables.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

recipe PlatYi-34B-Q "PlatYi-34B README"
setting base_model 01-ai/Yi-34B
setting data_path garage-bAInd/Open-Platypus
setting quantization 4bit
setting warmup_steps 0
platypus_defaults
note "data: Open-Platypus (the README names the Platypus recipe and the Alpaca template, not the data set)"
run_recipe "$@"
