"""finetune.py's flags, each declared once (platy/flags.py): finetune.py's command line and --help, the
run record's flags, the resume check (resume=True: what decides which example lands in which step, and
what each step computes) and the LoRA-only refusals (lora_only=True: the LoRA knobs that are not
Platypus's) all read them from here.

Platypus's own flags keep their names, defaults and meaning; the groups are --help's headings.
"""

from platy.flags import Flag, Flags, grouped

# --stage: supervised fine-tuning, or a preference objective (platy/train/preference.py)
STAGES = ("sft", "dpo", "ipo", "simpo", "orpo")

TRAIN_FLAGS = Flags(
    *grouped(
        "model and data",
        Flag(
            "base_model",
            "",
            str,
            "Hub id or local folder of a causal LM (Llama, Mistral, Yi, Qwen, ...); builtin:tiny-llama is the "
            "embedded tiny model for CPU try-outs.",
            resume=True,
        ),
        Flag(
            "data_path",
            "",
            str,
            "JSON, JSONL, CSV or Parquet file of rows with instruction, input (optional) and output, or "
            "conversations (messages with role/content, or ShareGPT conversations; several exchanges are trained "
            "turn by turn, in the chat template or the prompt template: docs/conversations.md; OpenOrca rows are "
            "converted), a data set id (needs network), or a mix spec "
            "'a.json:1.0,b.jsonl:0.01' (each source sampled to its fraction with --seed, as refine.py --mix "
            "does).",
        ),
        Flag(
            "output_dir",
            "./lora-out",
            str,
            "Where the adapter, tokenizer, run_config.json, log_history.json, training_curves.png and checkpoints go.",
        ),
    ),
    *grouped(
        "training hyperparameters (Platypus defaults)",
        Flag(
            "batch_size",
            16,
            int,
            "Global batch size; gradient accumulation = batch_size / (micro_batch_size x number of processes), "
            "which must divide evenly.",
            resume=True,
        ),
        Flag(
            "micro_batch_size",
            1,
            int,
            "Examples per device per forward pass.",
            resume=True,
        ),
        Flag(
            "num_epochs",
            1,
            float,
            "Passes over the training rows (fractions allowed).",
        ),
        Flag(
            "learning_rate",
            0.0004,
            float,
            "Peak learning rate.",
            resume=True,
        ),
        Flag(
            "cutoff_len",
            4096,
            int,
            "Longest example in tokens; longer ones are cut.",
            resume=True,
        ),
        Flag(
            "val_set_size",
            0,
            float,
            "Rows held out for eval loss: a count (>= 1) or a fraction (< 1); 0: none.",
            resume=True,
        ),
        Flag(
            "lr_scheduler",
            "cosine",
            str,
            "Learning-rate schedule (cosine, linear, constant, ...).",
            resume=True,
        ),
        Flag(
            "warmup_steps",
            100,
            int,
            "Optimizer steps of linear warmup.",
            resume=True,
        ),
        Flag(
            "weight_decay",
            0.0,
            float,
            "AdamW weight decay.",
            resume=True,
        ),
    ),
    *grouped(
        "LoRA",
        Flag(
            "lora_r",
            16,
            int,
            "LoRA rank.",
            resume=True,
        ),
        Flag(
            "lora_alpha",
            16,
            int,
            "LoRA scaling numerator (scale = alpha / r).",
            resume=True,
        ),
        Flag(
            "lora_dropout",
            0.05,
            float,
            "Dropout on the LoRA input.",
            resume=True,
        ),
        Flag(
            "lora_target_modules",
            ("gate_proj", "down_proj", "up_proj"),
            None,
            "Linear layers to adapt, e.g. '[gate_proj, down_proj, up_proj]', or all-linear (every Linear layer of "
            "the decoder, attention and MLP, but not the output head; the names are printed and recorded).",
            resume=True,
        ),
    ),
    *grouped(
        "data formatting",
        Flag(
            "train_on_inputs",
            False,
            bool,
            "Also train on the prompt tokens (False: only the response and EOS are labels).",
            resume=True,
        ),
        Flag(
            "add_eos_token",
            False,
            bool,
            "False: EOS ends every response that fits in cutoff_len, and a response cut by cutoff_len ends "
            "without EOS. True: EOS always ends the example, even a cut one.",
            resume=True,
        ),
        Flag(
            "group_by_length",
            False,
            bool,
            "Batch examples of similar length together (less padding).",
            resume=True,
        ),
        Flag(
            "prompt_template_name",
            "alpaca",
            str,
            "Template in templates/ (alpaca, alpaca_short, alpaca_ko) or a path to a template .json.",
            resume=True,
        ),
        Flag(
            "chat_template",
            "none",
            str,
            "How conversations (and, with a template, every row) are rendered: none (the Alpaca template above, "
            "turn by turn), auto (the base tokenizer's own), chatml, llama3, or a path to a .jinja file. Labels "
            "are the assistant turns and their end-of-turn tokens; see docs/conversations.md.",
            resume=True,
        ),
    ),
    *grouped(
        "resume and logging",
        Flag(
            "resume_from_checkpoint",
            None,
            str,
            "A checkpoint folder (continues step, schedule, optimizer, RNG and data order), 'auto' (the latest "
            "complete checkpoint in output_dir), or an adapter folder (loads its weights; optimizer and schedule "
            "restart).",
        ),
        Flag(
            "trust_checkpoint",
            False,
            bool,
            "Resume from a checkpoint that is not a checkpoint-N folder of output_dir: its pickled optimizer, RNG "
            "and DeepSpeed states can run code, so only one you trust.",
        ),
        Flag(
            "wandb_project",
            "",
            str,
            "Weights & Biases project; setting it turns wandb reporting on.",
        ),
        Flag(
            "wandb_run_name",
            "",
            str,
            "Weights & Biases run name.",
        ),
        Flag(
            "wandb_watch",
            "",
            str,
            "'gradients', 'all' or 'false': what wandb watches.",
        ),
        Flag(
            "wandb_log_model",
            "",
            str,
            "'true' or 'checkpoint' to upload the model to wandb.",
        ),
    ),
    *grouped(
        "added by this toolkit",
        Flag(
            "finetuning",
            "lora",
            str,
            "lora (train an adapter; the lora_* flags apply) or full (train every weight, held in fp32 with "
            "bf16/fp16 compute; needs --quantization none).",
        ),
        Flag(
            "quantization",
            "4bit",
            str,
            "4bit (NF4, QLoRA), 8bit, or none (LoRA on 16/32-bit weights).",
            resume=True,
        ),
        Flag(
            "double_quant",
            False,
            bool,
            "Quantize the 4-bit quantization constants too (saves ~0.4 bit/weight).",
        ),
        Flag(
            "precision",
            "auto",
            str,
            "auto (bf16 on GPUs that have it, else fp16; on a CPU bf16 where it computes bf16 natively, AMX or "
            "AVX512-BF16, measured faster than fp32, else fp32), bf16, fp16, fp32.",
        ),
        Flag(
            "max_steps",
            -1,
            int,
            "Stop after this many optimizer steps (-1: run num_epochs).",
        ),
        Flag(
            "seed",
            42,
            int,
            "Seed for weights of LoRA, data order and the validation split.",
            resume=True,
        ),
        Flag(
            "logging_steps",
            None,
            int,
            "Log loss every this many optimizer steps; default: every 10, or often enough for about 10 points in "
            "a shorter run. The last step is always logged.",
        ),
        Flag(
            "eval_steps",
            None,
            int,
            "Evaluate every this many steps (default: save_steps); needs val_set_size.",
        ),
        Flag(
            "save_steps",
            200,
            int,
            "Write a checkpoint every this many optimizer steps.",
        ),
        Flag(
            "save_total_limit",
            3,
            int,
            "Checkpoints kept in output_dir (oldest deleted first); 0 keeps all.",
        ),
        Flag(
            "gradient_checkpointing",
            "auto",
            None,
            "Recompute activations in backward to save memory: auto (on with a GPU; on a CPU off where the "
            "estimated memory fits in half of what is available), true, false, or the fraction of decoder layers "
            "to checkpoint (0.5: the first half). Off is fastest when memory allows; each checkpointed layer "
            "costs its forward again.",
        ),
        Flag(
            "report_to",
            "auto",
            str,
            "auto (wandb when wandb_project is set, else none), none, wandb, tensorboard, or a comma-separated list.",
        ),
        Flag(
            "trust_remote_code",
            False,
            bool,
            "Allow model code from the hub (some Yi/Qwen variants need it).",
        ),
        Flag(
            "ddp_timeout",
            600,
            int,
            "Seconds a torchrun process waits in a collective for the others (NCCL, DeepSpeed) before it gives up: "
            "a dead peer frees the other GPUs after this long. 600 covers rank 0 writing a checkpoint while the "
            "others wait; raise it for full fine-tuning checkpoints on slow disks. (torch's default: 1800.)",
        ),
        Flag(
            "deepspeed",
            None,
            str,
            "Path to a DeepSpeed JSON config, passed to the Trainer (configs/ has ZeRO-2 and ZeRO-3 ones).",
        ),
        Flag(
            "attn_implementation",
            "auto",
            str,
            "auto (the library's choice, SDPA for most models), sdpa, eager, flash_attention_2 (needs the flash-"
            "attn package and a CUDA GPU), flex_attention.",
        ),
        Flag(
            "overwrite",
            False,
            bool,
            "Replace the earlier run an output_dir holds (its record and its own checkpoints; nothing else).",
        ),
        Flag(
            "skip_nonfinite_steps",
            False,
            bool,
            "On a non-finite loss or gradient, drop that step's update and go on (counted in the log as "
            "nonfinite_steps_skipped); default: stop the run there.",
        ),
        Flag(
            "dry_run",
            False,
            bool,
            "Validate, print the configuration and the plan (accumulation, tokens per step, GPU memory estimate) "
            "and stop: no weights loaded, nothing written. A base model whose config is not available locally is "
            "planned from its published shape when known.",
        ),
        Flag(
            "gpu_memory_gb",
            None,
            float,
            "GPU memory to check the estimate against (default: the detected GPU's).",
        ),
    ),
    *grouped(
        "speed",
        Flag(
            "packing",
            False,
            bool,
            "Padding-free packing: whole examples share rows of up to cutoff_len tokens (or micro_batch_tokens), "
            "attention never crosses an example, the loss is the unpacked one without pad tokens. batch_size and "
            "micro_batch_size then count packed rows.",
            resume=True,
        ),
        Flag(
            "micro_batch_tokens",
            None,
            int,
            "Token budget of a micro-step instead of a count of examples (needs --packing; micro_batch_size stays "
            "1: each micro-step is one row of up to this many tokens).",
            resume=True,
        ),
        Flag(
            "liger",
            False,
            bool,
            "Fused Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); needs the liger-kernel "
            "package and a CUDA GPU, and is off (with a note) where either is missing.",
        ),
        Flag(
            "torch_compile",
            False,
            bool,
            "Compile the model with torch.compile (the first steps are slow while it compiles).",
        ),
        Flag(
            "cache_tokens",
            True,
            bool,
            "Keep the tokenized data under $PLATY_CACHE/tokenized, so the next run with the same data, tokenizer "
            "and settings (and every other torchrun rank) loads it instead of tokenizing; false tokenizes in "
            "memory and writes nothing.",
        ),
    ),
    *grouped(
        "preference tuning (docs/preference.md)",
        Flag(
            "stage",
            "sft",
            str,
            "sft (instruction rows: prompt and response) or a preference objective on pairs of a prompt with a "
            "chosen and a rejected answer: dpo (sigmoid DPO), ipo, simpo or orpo.",
            resume=True,
        ),
        Flag(
            "beta",
            0.1,
            float,
            "The preference strength: DPO's beta, IPO's tau, SimPO's beta, ORPO's lambda (TRL's beta for all four).",
            resume=True,
        ),
        Flag(
            "simpo_gamma",
            0.5,
            float,
            "SimPO's target reward margin gamma (--stage simpo only).",
            resume=True,
        ),
        Flag(
            "init_adapter",
            None,
            str,
            "An SFT adapter folder (finetune.py's output_dir) to start from: a trainable copy of it is the policy and "
            "the frozen SFT model the reference (dpo, ipo); its LoRA settings replace the lora_* flags. Default: a "
            "new adapter on the base, whose reference is the base.",
            resume=True,
        ),
    ),
    *grouped(
        "LoRA variants and training knobs (docs/lora.md)",
        Flag(
            "use_rslora",
            False,
            bool,
            "Rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r (merge.py uses the recorded scale).",
            resume=True,
            lora_only=True,
        ),
        Flag(
            "use_dora",
            False,
            bool,
            "DoRA: each adapted weight is split into a magnitude vector and a direction that LoRA updates (4-bit, "
            "8-bit and unquantized bases; merge.py fuses it with both methods). Slower steps, a little more "
            "memory.",
            resume=True,
            lora_only=True,
        ),
        Flag(
            "init_lora_weights",
            "default",
            str,
            "How the adapter starts: default (B = 0), gaussian, pissa or pissa_niter_N (the top r singular "
            "vectors of each weight, exact or with N fast-SVD iterations), olora (QR), both on a --quantization "
            "none base and saved converted so they apply to the unchanged base; loftq (4-bit bases: the adapter "
            "starts as the SVD of each layer's quantization error, reported in the log).",
            resume=True,
            lora_only=True,
        ),
        Flag(
            "loftq_iter",
            1,
            int,
            "LoftQ's alternating steps (with --init_lora_weights loftq): 1 keeps the base as loaded; N > 1 "
            "requantizes each adapted weight N - 1 times around the adapter for a smaller error, and saves the "
            "rank-r offsets that rebuild that base (loftq_offset.safetensors, for merge.py and inference.py).",
            resume=True,
            lora_only=True,
        ),
        Flag(
            "loraplus_lr_ratio",
            None,
            float,
            "LoRA+: the B matrices (and DoRA magnitudes) learn at this many times --learning_rate (peft's LoRA+ "
            "optimizer, e.g. 16); default: one learning rate.",
            resume=True,
            lora_only=True,
        ),
        Flag(
            "neftune_noise_alpha",
            None,
            float,
            "NEFTune: uniform noise of this scale (e.g. 5) on the input embeddings while training; evaluation, "
            "--verify and generation see none.",
            resume=True,
        ),
        Flag(
            "optim",
            "adamw_torch_fused",
            str,
            "Optimizer (the Trainer's names): adamw_torch_fused, adamw_torch, paged_adamw_8bit, adamw_bnb_8bit, "
            "paged_adamw_32bit (the last three need bitsandbytes; 8-bit states save memory).",
            resume=True,
        ),
    ),
)
