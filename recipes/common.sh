# Shared by the recipes (sourced, not run): published defaults that the environment
# overrides, TINY=1 and DRY_RUN=1, the launch through fine-tuning.sh, and the export.
#
# A recipe calls `recipe NAME SOURCE`, then `setting FLAG VALUE` for each published value
# (the environment variable FLAG, upper case, wins; the first setting of a flag wins over
# later ones), `platypus_defaults` for Platypus's table where the system published no
# value of its own, `note TEXT` for each assumption, and finally `run_recipe "$@"`
# (further arguments go to finetune.py and win over everything).
# Environment: TINY=1 (tiny embedded model, sample data, the quick start's schedule of
# recipes/demo-settings.sh with the recipe's batch, LoRA and quantization, no DeepSpeed, no export), DRY_RUN=1 (print the plan, load nothing), EXPORT=0/1 (merge after training;
# default 1, 0 under TINY), EXPORT_METHODS (merge methods, default auto), every variable
# of fine-tuning.sh (NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID,
# DEEPSPEED, ACCELERATE_CONFIG, BASE_MODEL, DATA_PATH, OUTPUT_DIR).

recipes_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$recipes_dir")"
PYTHON="${PYTHON:-python}"
flags=()
notes=()
declare -A given=()

tiny() { [ -n "${TINY:-}" ] && [ "$TINY" != "0" ]; }
dry_run() { [ -n "${DRY_RUN:-}" ] && [ "$DRY_RUN" != "0" ]; }

recipe() {  # NAME SOURCE
  RECIPE="$1"
  RECIPE_SOURCE="$2"
  if tiny; then
    NPROC="${NPROC:-1}"  # a CPU try-out: no GPUs to count
  fi
  if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)
  fi
  NNODES="${NNODES:-${SLURM_NNODES:-1}}"
  export NPROC NNODES
  if tiny; then
    BASE_MODEL="${BASE_MODEL:-builtin:tiny-llama}"
    DATA_PATH="${DATA_PATH:-$repo/data/sample_platypus.json}"
    OUTPUT_DIR="${OUTPUT_DIR:-./outputs/tiny/$RECIPE}"
    EXPORT="${EXPORT:-0}"
    DEEPSPEED="" ACCELERATE_CONFIG=""  # neither runs on a CPU
    export DEEPSPEED ACCELERATE_CONFIG
    # the quick start's schedule comes first, so it wins over the recipe's (the environment still wins)
    source "$recipes_dir/demo-settings.sh"
    local i
    for ((i = 0; i < ${#demo_schedule[@]}; i += 2)); do
      setting "${demo_schedule[i]#--}" "${demo_schedule[i + 1]}"
    done
  fi
  OUTPUT_DIR="${OUTPUT_DIR:-./outputs/$RECIPE}"
  EXPORT="${EXPORT:-1}"
}

setting() {  # FLAG VALUE: the published value of finetune.py's --FLAG, unless $FLAG (upper case) is set
  [ -n "${given[$1]:-}" ] && return 0  # the recipe's own value came first
  given[$1]=1
  local var="${1^^}"
  if tiny && [ "$var" = DEEPSPEED ]; then
    return 0  # DeepSpeed needs GPUs
  fi
  if [ -z "${!var:-}" ]; then
    printf -v "$var" '%s' "$2"
  fi
  case "$var" in
    BASE_MODEL|DATA_PATH|DEEPSPEED) export "$var" ;;  # read by fine-tuning.sh
    *) flags+=("--$1" "${!var}") ;;
  esac
}

platypus_defaults() {  # Platypus's hyperparameter table (shared/seeds/003), for every flag not set yet;
  # each value equals finetune.py's default (tests/test_defaults.py checks it)
  setting learning_rate 4e-4
  setting warmup_steps 100
  setting batch_size 16
  setting micro_batch_size 1
  setting num_epochs 1
  setting lr_scheduler cosine
  setting weight_decay 0
  setting lora_r 16
  setting lora_alpha 16
  setting lora_dropout 0.05
  setting lora_target_modules '[gate_proj, down_proj, up_proj]'
  setting cutoff_len 4096
  setting train_on_inputs False
  setting group_by_length False
  setting add_eos_token False
  setting prompt_template_name alpaca
}

note() { notes+=("$1"); }

run_recipe() {
  if [ -n "${MAX_STEPS:-}" ]; then
    flags+=(--max_steps "$MAX_STEPS")
  fi
  export OUTPUT_DIR
  echo "Recipe $RECIPE ($RECIPE_SOURCE): base model $BASE_MODEL, data $DATA_PATH"
  local line
  for line in "${notes[@]}"; do
    echo "  assumes: $line"
  done
  if tiny; then
    echo "  TINY=1: the embedded tiny model on the sample data with the quick start's schedule (learning rate, warmup, epochs, held-out rows; recipes/demo-settings.sh)${MAX_STEPS:+, at most $MAX_STEPS optimizer steps}; the recipe's hyperparameters otherwise"
  fi
  bash "$repo/fine-tuning.sh" "${flags[@]}" "$@"
  if dry_run || [ "$EXPORT" = "0" ] || [ "${NODE_RANK:-${SLURM_NODEID:-0}}" != "0" ]; then
    return 0
  fi
  if [ "${FINETUNING:-lora}" = "full" ]; then
    echo "Export: full fine-tuning wrote a whole model to $OUTPUT_DIR; nothing to merge"
    return 0
  fi
  local method target
  for method in ${EXPORT_METHODS:-auto}; do
    target="$OUTPUT_DIR-merged"
    if [ "${EXPORT_METHODS:-auto}" != "auto" ] && [ "$(echo $EXPORT_METHODS | wc -w)" -gt 1 ]; then
      target="$OUTPUT_DIR-merged-$method"
    fi
    PEFT_MODEL_PATH="$OUTPUT_DIR" OUTPUT_DIR="$target" METHOD="$method" bash "$repo/merge.sh"
  done
}
