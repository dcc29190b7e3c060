# The quick starts' settings (sourced, not run). fine-tuning.sh uses them when no BASE_MODEL is given;
# recipes/common.sh uses the tiny model's schedule under TINY=1. A user's own base model gets
# Platypus's values instead.
#
# The quick start: builtin:smollm2-135m (SmolLM2-135M-Instruct, a real instruct model) learns to answer
# requests with a tool call as JSON (data/toolcalls: 120 training rows, 30 held out). 3 epochs in
# batches of 8: 45 optimizer steps.
quickstart_base=builtin:smollm2-135m
quickstart_data=data/toolcalls/train.json  # relative to the repository
quickstart_settings=(
  --quantization none     # 135M parameters fit anywhere; on a CPU 4-bit layers are slower than 16-bit ones
  --lora_target_modules all-linear  # MLP-only (Platypus's targets) does not learn the format in 3 epochs
  --learning_rate 2e-3
  --warmup_steps 3        # Platypus's 100 would keep the learning rate near 0 over the 45 steps
  --num_epochs 3
  --val_set_size 0        # the held-out rows are scored by evaluate.py after training
  --cutoff_len 128        # the rows are short
  --add_eos_token True    # the answer ends: inference stops after the JSON
)

# TINY=1: the embedded tiny random model on the bundled sample set, a one-minute check of the pipeline.
# 220 training rows (24 held out for the eval loss), 2 epochs in batches of 8: 56 optimizer steps,
# about 10 s on 2 CPU cores; the eval loss falls from about 7.0 to about 5.8. Platypus's 100 warmup
# steps over the sample set's 16 optimizer steps would keep the learning rate at 0.
demo_base=builtin:tiny-llama
demo_schedule=(
  --learning_rate 1e-2    # a random tiny model needs a large step to move within a minute
  --warmup_steps 5        # about a tenth of the run
  --num_epochs 2
  --val_set_size 24       # held-out rows: the eval loss shows what was learned
  --eval_steps 7
)
# 8 rows per optimizer step, split over the processes fine-tuning.sh starts (NPROC x NNODES)
demo_world=$(( ${NPROC:-1} * ${NNODES:-1} ))
demo_micro=$(( demo_world < 8 ? 8 / demo_world : 1 ))
demo_batch=(
  --batch_size $(( demo_micro * demo_world ))
  --micro_batch_size "$demo_micro"
  --cutoff_len 512        # the sample rows are short
)
