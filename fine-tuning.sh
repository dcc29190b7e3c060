#!/usr/bin/env bash
# Launch finetune.py with the Platypus recipe, on one process, one node or many nodes.
#
#   bash fine-tuning.sh                         # quick start: SmolLM2-135M-Instruct learns tool calls, then is
#                                               # compared with its base on held-out requests (CPU, offline)
#   TINY=1 bash fine-tuning.sh                  # the tiny random model on the sample data: the pipeline in a minute
#   BASE_MODEL=meta-llama/Llama-2-13b-hf DATA_PATH=garage-bAInd/Open-Platypus \
#     OUTPUT_DIR=./Platypus2-13B-lora bash fine-tuning.sh
#   bash fine-tuning.sh --learning_rate 3e-4 --num_epochs 2      # extra flags go to finetune.py
#   DRY_RUN=1 NPROC=8 NNODES=2 bash fine-tuning.sh               # print the plan for 2 x 8 GPUs, load nothing
#
# Environment:
#   BASE_MODEL, DATA_PATH, OUTPUT_DIR  (without BASE_MODEL: the quick start, with the settings of
#                recipes/demo-settings.sh; a rerun replaces its previous output)
#   TINY=1       without BASE_MODEL: the tiny model's quick start instead of the real model's
#   NPROC        processes per node (default: the number of GPUs, else 1)
#   NNODES       nodes (default: $SLURM_NNODES, else 1)
#   NODE_RANK    this node's rank (default: $SLURM_NODEID, else 0)
#   MASTER_ADDR, MASTER_PORT   address of node 0 (default 127.0.0.1:29500)
#   RDZV_ID      a job id: use c10d rendezvous at RDZV_ENDPOINT (default MASTER_ADDR:MASTER_PORT);
#                nodes then need no NODE_RANK and may start in any order
#   DEEPSPEED    a DeepSpeed JSON config (configs/zero2.json, configs/zero3.json)
#   ACCELERATE_CONFIG  an accelerate config file (configs/fsdp_qlora.yaml): launch with accelerate
#   DRY_RUN=1    validate and print the plan for this many processes and nodes, without launching
# With more than one process in total, the job runs under torchrun (data parallel); with
# DEEPSPEED too, even on one process: DeepSpeed needs the launcher's environment (rank, address).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
case " $* " in *" --help "* | *" -h "*) exec "$PYTHON" "$here/finetune.py" --help ;; esac  # the flags; nothing run
if [ -z "${NPROC:-}" ]; then
  # the GPUs this process may use (CUDA_VISIBLE_DEVICES included), at least 1
  NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)
fi
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

demo=""  # the quick start (recipes/demo-settings.sh): real (SmolLM2 on tool calls) or tiny (TINY=1)
if [ -z "${BASE_MODEL:-}" ]; then
  source "$here/recipes/demo-settings.sh"  # after NPROC and NNODES: its batch is split over them
  if [ -n "${TINY:-}" ] && [ "$TINY" != "0" ]; then
    demo=tiny BASE_MODEL="$demo_base"  # on the sample data, the default below
  else
    demo=real BASE_MODEL="$quickstart_base" DATA_PATH="${DATA_PATH:-$here/$quickstart_data}"
  fi
fi
sample_data="$here/data/sample_platypus.json"
DATA_PATH="${DATA_PATH:-$sample_data}"
OUTPUT_DIR="${OUTPUT_DIR:-./outputs/platypus-qlora}"

# Platypus's published hyperparameters, spelled out so this file documents the recipe; each
# equals finetune.py's default (tests/test_defaults.py checks it).
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
if [ -n "${DEEPSPEED:-}" ]; then
  args+=(--deepspeed "$DEEPSPEED")
fi
quick_start_run() {  # whether run_config.json $1 is either quick start's: its base model and its data
  { grep -qF "\"base_model\": \"$quickstart_base\"" "$1" && grep -qF "\"data_path\": \"$here/$quickstart_data\"" "$1"; } ||
    { grep -qF "\"base_model\": \"$demo_base\"" "$1" && grep -qF "\"data_path\": \"$sample_data\"" "$1"; }
}
if [ -n "$demo" ]; then
  if [ "$demo" = tiny ]; then
    args+=("${demo_batch[@]}" "${demo_schedule[@]}")  # after Platypus's values: these win
  else
    args+=("${demo_batch[@]}" "${quickstart_settings[@]}")
  fi
  # a rerun replaces the previous quick-start run, of either quick start (TINY=1 after the real one, as
  # docs/preference.md does: its base model and its data), never another run, nor one resumed
  case " $* ${DRY_RUN:-0}" in
    *" --resume_from_checkpoint"* | *" --dry_run"* | *" 1") ;;
    *)
      for record in "$OUTPUT_DIR"/run_config.json "$OUTPUT_DIR"/checkpoint-*/run_config.json; do
        if [ -f "$record" ] && quick_start_run "$record"; then
          echo "Replacing the previous quick-start run in $OUTPUT_DIR"
          args+=(--overwrite True)
          break
        fi
      done
      ;;
  esac
fi

if [ -n "${DRY_RUN:-}" ] && [ "$DRY_RUN" != "0" ]; then
  # one process that plans for the whole job: the world the launcher would start
  export WORLD_SIZE=$((NPROC * NNODES)) LOCAL_WORLD_SIZE="$NPROC" RANK=0 LOCAL_RANK=0
  if [ -n "${ACCELERATE_CONFIG:-}" ] && grep -q "distributed_type: *FSDP" "$ACCELERATE_CONFIG"; then
    export ACCELERATE_USE_FSDP=true
  fi
  exec "$PYTHON" "$here/finetune.py" "${args[@]}" "$@" --dry_run True
fi

if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  # the config holds the strategy (FSDP, ...); the job's size comes from here
  exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
    --num_processes $((NPROC * NNODES)) --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    "$here/finetune.py" "${args[@]}" "$@"
fi

if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ] || [ -n "${DEEPSPEED:-}" ]; then
  if [ -n "${RDZV_ID:-}" ]; then
    rendezvous=(--rdzv_id "$RDZV_ID" --rdzv_backend c10d
                --rdzv_endpoint "${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}")
  else
    rendezvous=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  fi
  # workers get this long after a SIGTERM to finish their step and save a checkpoint before torchrun kills them
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"
  # finetune.py also writes its preemption record here, wherever --output_dir points
  # in a folder of our own (mktemp -d, 0700): a name merely reserved could be taken by another user first
  preempted_dir="$(mktemp -d)"
  export PLATY_PREEMPTED_FILE="$preempted_dir/preempted.json"
  status=0
  "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "$NNODES" "${rendezvous[@]}" \
    "$here/finetune.py" "${args[@]}" "$@" || status=$?
  preempted=0
  [ -f "$PLATY_PREEMPTED_FILE" ] && preempted=1
  rm -rf "$preempted_dir"
  if [ "$status" -ne 0 ] && [ "$preempted" -eq 1 ]; then
    # torchrun reports any worker's non-zero exit as 1: give schedulers the preemption status back
    exit 75
  fi
  exit "$status"
fi
if [ "$demo" != real ]; then
  exec "$PYTHON" "$here/finetune.py" "${args[@]}" "$@"
fi
"$PYTHON" "$here/finetune.py" "${args[@]}" "$@"
# the quick start's proof: the held-out requests answered by the base and by base + adapter
compare=(--models "$BASE_MODEL,$OUTPUT_DIR" --suite toolcalls --show_answers 5)
if ! "$PYTHON" -c "import lm_eval" 2>/dev/null; then
  echo "To compare the base with the fine-tuned model: pip install -r $here/requirements-eval.txt, then:"
  echo "  python $here/evaluate.py ${compare[*]}"
  exit 0
fi
exec "$PYTHON" "$here/evaluate.py" "${compare[@]}" --output_dir "$(dirname "$OUTPUT_DIR")/quickstart-eval"
