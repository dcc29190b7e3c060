#!/usr/bin/env bash
# KO-Platypus2-13B: the Platypus recipe on Korean Open-Platypus (KOpen-platypus) from Llama-2-13B.
# Published values: the KO-Platypus README (shared/seeds/004): Platypus's code and hyperparameters (shared/seeds/003) on kyujinpy/KOpen-platypus.
#
#   bash recipes/ko-platypus2-13b.sh                         # train on this node's GPUs, then export merged fp16 weights
#   DRY_RUN=1 NPROC=8 NNODES=2 bash recipes/ko-platypus2-13b.sh   # the plan for 2 nodes x 8 GPUs; loads nothing
#   TINY=1 bash recipes/ko-platypus2-13b.sh                  # the embedded tiny model on the sample data (CPU, seconds)
#   LEARNING_RATE=2e-4 bash recipes/ko-platypus2-13b.sh --num_epochs 2   # environment and extra flags override
#
# Every setting below can be overridden by the environment variable of its name in upper
# case; see recipes/common.sh for TINY, DRY_RUN, EXPORT and the launch variables.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

recipe KO-Platypus2-13B "KO-Platypus README"
setting base_model meta-llama/Llama-2-13b-hf
setting data_path kyujinpy/KOpen-platypus
setting quantization none
platypus_defaults
note "Platypus's hyperparameters and English Alpaca template (the README runs Platypus's scripts and publishes no table of its own)"
note "LoRA on the 16-bit base, as Platypus; QUANTIZATION=4bit makes it QLoRA"
run_recipe "$@"
