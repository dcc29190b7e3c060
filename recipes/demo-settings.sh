# The quick start's settings, fitted to the embedded tiny model on the bundled sample set (sourced,
# not run): fine-tuning.sh uses them all when no BASE_MODEL is given; recipes/common.sh uses the
# schedule under TINY=1. A user's own base model gets Platypus's values instead. Platypus's 100
# warmup steps over the sample set's 16 optimizer steps would keep the learning rate at 0.
#
# 220 training rows (24 held out for the eval loss), 2 epochs in batches of 8: 56 optimizer steps,
# about 10 s on 2 CPU cores; the eval loss falls from about 7.0 to about 5.8.
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
