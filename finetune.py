r"""Fine-tune a causal LM with LoRA / QLoRA on Alpaca-format instruction data (Platypus recipe).

    # the embedded tiny model on the bundled sample data (CPU, offline, about a minute)
    python finetune.py --base_model builtin:tiny-llama --data_path data/sample_platypus.json

    # Platypus2-13B on 4 GPUs, data parallel; batch_size is global
    torchrun --nproc_per_node=4 finetune.py --base_model meta-llama/Llama-2-13b-hf \
        --data_path garage-bAInd/Open-Platypus --output_dir ./Platypus2-13B-lora

    python finetune.py --help      # every flag, with its default

Defaults are Platypus's published hyperparameters; the base model is loaded in 4-bit NF4
(QLoRA) unless --quantization says otherwise.
"""

from platy import cli
from platy.cli import say
from platy.train import config, stages


def train(
    # model and data
    base_model: str = "",
    data_path: str = "",
    output_dir: str = "./lora-out",
    # training hyperparameters (Platypus defaults)
    batch_size: int = 16,
    micro_batch_size: int = 1,
    num_epochs: float = 1,
    learning_rate: float = 4e-4,
    cutoff_len: int = 4096,
    val_set_size: float = 0,
    lr_scheduler: str = "cosine",
    warmup_steps: int = 100,
    weight_decay: float = 0.0,
    # LoRA
    lora_r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules=("gate_proj", "down_proj", "up_proj"),
    # data formatting
    train_on_inputs: bool = False,
    add_eos_token: bool = False,
    group_by_length: bool = False,
    prompt_template_name: str = "alpaca",
    chat_template: str = "none",
    # resume and logging
    resume_from_checkpoint: str = None,
    wandb_project: str = "",
    wandb_run_name: str = "",
    wandb_watch: str = "",
    wandb_log_model: str = "",
    # added by this toolkit
    finetuning: str = "lora",
    quantization: str = "4bit",
    double_quant: bool = False,
    precision: str = "auto",
    max_steps: int = -1,
    seed: int = 42,
    logging_steps: int = None,
    eval_steps: int = None,
    save_steps: int = 200,
    save_total_limit: int = 3,
    gradient_checkpointing=True,
    report_to: str = "auto",
    trust_remote_code: bool = False,
    deepspeed: str = None,
    attn_implementation: str = "auto",
    overwrite: bool = False,
    skip_nonfinite_steps: bool = False,
    dry_run: bool = False,
    gpu_memory_gb: float = None,
    # speed
    packing: bool = False,
    micro_batch_tokens: int = None,
    liger: bool = False,
    torch_compile: bool = False,
    cache_tokens: bool = True,
    # LoRA variants and training knobs (docs/lora.md)
    use_rslora: bool = False,
    use_dora: bool = False,
    init_lora_weights: str = "default",
    loftq_iter: int = 1,
    loraplus_lr_ratio: float = None,
    neftune_noise_alpha: float = None,
    optim: str = "adamw_torch_fused",
):
    """Train a LoRA adapter; output_dir then holds everything merge.py and inference.py need.

    Args:
        base_model: Hub id or local folder of a causal LM (Llama, Mistral, Yi, Qwen, ...);
            builtin:tiny-llama is the embedded tiny model for CPU try-outs.
        data_path: JSON, JSONL, CSV or Parquet file of rows with instruction, input
            (optional) and output (OpenOrca and one-exchange conversation rows are converted),
            a data set id (needs network), or a mix spec 'a.json:1.0,b.jsonl:0.01' (each
            source sampled to its fraction with --seed, as refine.py --mix does).
        output_dir: Where the adapter, tokenizer, run_config.json, log_history.json,
            training_curves.png and checkpoints go.
        batch_size: Global batch size; gradient accumulation = batch_size /
            (micro_batch_size x number of processes), which must divide evenly.
        micro_batch_size: Examples per device per forward pass.
        num_epochs: Passes over the training rows (fractions allowed).
        learning_rate: Peak learning rate.
        cutoff_len: Longest example in tokens; longer ones are cut.
        val_set_size: Rows held out for eval loss: a count (>= 1) or a fraction (< 1); 0: none.
        lr_scheduler: Learning-rate schedule (cosine, linear, constant, ...).
        warmup_steps: Optimizer steps of linear warmup.
        weight_decay: AdamW weight decay.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Linear layers to adapt, e.g. '[gate_proj, down_proj, up_proj]', or all-linear
            (every Linear layer of the decoder, attention and MLP, but not the output head; the names are
            printed and recorded).
        train_on_inputs: Also train on the prompt tokens (False: only the response and EOS
            are labels).
        add_eos_token: False: EOS ends every response that fits in cutoff_len, and a
            response cut by cutoff_len ends without EOS. True: EOS always ends the example,
            even a cut one.
        group_by_length: Batch examples of similar length together (less padding).
        prompt_template_name: Template in templates/ (alpaca, alpaca_short, alpaca_ko) or a
            path to a template .json.
        chat_template: How conversations (and, with a template, every row) are rendered: none
            (the Alpaca template above, turn by turn), auto (the base tokenizer's own), chatml,
            llama3, or a path to a .jinja file. Labels are the assistant turns and their
            end-of-turn tokens; see docs/conversations.md.
        resume_from_checkpoint: A checkpoint folder (continues step, schedule, optimizer, RNG
            and data order), 'auto' (the latest complete checkpoint in output_dir), or an
            adapter folder (loads its weights; optimizer and schedule restart).
        wandb_project: Weights & Biases project; setting it turns wandb reporting on.
        wandb_run_name: Weights & Biases run name.
        wandb_watch: 'gradients', 'all' or 'false': what wandb watches.
        wandb_log_model: 'true' or 'checkpoint' to upload the model to wandb.
        finetuning: lora (train an adapter; the lora_* flags apply) or full (train every
            weight, held in fp32 with bf16/fp16 compute; needs --quantization none).
        quantization: 4bit (NF4, QLoRA), 8bit, or none (LoRA on 16/32-bit weights).
        double_quant: Quantize the 4-bit quantization constants too (saves ~0.4 bit/weight).
        precision: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), bf16, fp16, fp32.
        max_steps: Stop after this many optimizer steps (-1: run num_epochs).
        seed: Seed for weights of LoRA, data order and the validation split.
        logging_steps: Log loss every this many optimizer steps; default: every 10, or often enough for
            about 10 points in a shorter run. The last step is always logged.
        eval_steps: Evaluate every this many steps (default: save_steps); needs val_set_size.
        save_steps: Write a checkpoint every this many optimizer steps.
        save_total_limit: Checkpoints kept in output_dir (oldest deleted first); 0 keeps all.
        gradient_checkpointing: Recompute activations in backward to save memory: true, false, or
            the fraction of decoder layers to checkpoint (0.5: the first half). Off is fastest when
            memory allows; each checkpointed layer costs its forward again.
        report_to: auto (wandb when wandb_project is set, else none), none, wandb,
            tensorboard, or a comma-separated list.
        trust_remote_code: Allow model code from the hub (some Yi/Qwen variants need it).
        deepspeed: Path to a DeepSpeed JSON config, passed to the Trainer (configs/ has ZeRO-2
            and ZeRO-3 ones).
        attn_implementation: auto (the library's choice, SDPA for most models), sdpa, eager,
            flash_attention_2 (needs the flash-attn package and a CUDA GPU), flex_attention.
        overwrite: Allow writing into an output_dir that already holds a run.
        skip_nonfinite_steps: On a non-finite loss or gradient, drop that step's update and
            go on (counted in the log as nonfinite_steps_skipped); default: stop the run there.
        dry_run: Validate, print the configuration and the plan (accumulation, tokens per step,
            GPU memory estimate) and stop: no weights loaded, nothing written. A base model whose
            config is not available locally is planned from its published shape when known.
        gpu_memory_gb: GPU memory to check the estimate against (default: the detected GPU's).
        packing: Padding-free packing: whole examples share rows of up to cutoff_len tokens
            (or micro_batch_tokens), attention never crosses an example, the loss is the
            unpacked one without pad tokens. batch_size and micro_batch_size then count packed rows.
        micro_batch_tokens: Token budget of a micro-step instead of a count of examples (needs
            --packing; micro_batch_size stays 1: each micro-step is one row of up to this many tokens).
        liger: Fused Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); needs the
            liger-kernel package and a CUDA GPU, and is off (with a note) where either is missing.
        torch_compile: Compile the model with torch.compile (the first steps are slow while it compiles).
        cache_tokens: Keep the tokenized data under $PLATY_CACHE/tokenized, so the next run with the
            same data, tokenizer and settings (and every other torchrun rank) loads it instead of
            tokenizing; false tokenizes in memory and writes nothing.
        use_rslora: Rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r (merge.py uses the recorded scale).
        use_dora: DoRA: each adapted weight is split into a magnitude vector and a direction that LoRA updates
            (4-bit, 8-bit and unquantized bases; merge.py fuses it with both methods). Slower steps, a little
            more memory.
        init_lora_weights: How the adapter starts: default (B = 0), gaussian, pissa or pissa_niter_N (the top r
            singular vectors of each weight, exact or with N fast-SVD iterations), olora (QR), both on a
            --quantization none base and saved converted so they apply to the unchanged base; loftq (4-bit
            bases: the adapter starts as the SVD of each layer's quantization error, reported in the log).
        loftq_iter: LoftQ's alternating steps (with --init_lora_weights loftq): 1 keeps the base as loaded;
            N > 1 requantizes each adapted weight N - 1 times around the adapter for a smaller error, and saves
            the rank-r offsets that rebuild that base (loftq_offset.safetensors, for merge.py and inference.py).
        loraplus_lr_ratio: LoRA+: the B matrices (and DoRA magnitudes) learn at this many times --learning_rate
            (peft's LoRA+ optimizer, e.g. 16); default: one learning rate.
        neftune_noise_alpha: NEFTune: uniform noise of this scale (e.g. 5) on the input embeddings while
            training; evaluation, --verify and generation see none.
        optim: Optimizer (the Trainer's names): adamw_torch_fused, adamw_torch, paged_adamw_8bit, adamw_bnb_8bit,
            paged_adamw_32bit (the last three need bitsandbytes; 8-bit states save memory).
    """
    flags = dict(locals())  # first: every flag by name, nothing else
    cli.fail_on(config.check_flags(flags))  # every flag problem at once, before any I/O
    run = config.resolve(flags)
    if run.already_finished:  # a requeued job of a run that ended: success, nothing changes
        say(run.already_finished)
        return
    run_config = stages.describe_run(run)
    if run.dry_run:
        say("Dry run: nothing was loaded or written; drop --dry_run to train.")
        return
    tokenizer, prompter = stages.load_tokenizer_and_prompter(run)
    train_set, val_set, run_config["data"] = stages.build_datasets(run, tokenizer, prompter)
    if stages.finished_checkpoint(run, train_set):  # the run ended but its final save was cut short
        return stages.export_finished_checkpoint(run, tokenizer, run_config)
    model, run_config["resolved"]["quantization_layout"] = stages.load_model_with_lora(run, tokenizer)
    trainer = stages.build_trainer(run, model, tokenizer, train_set, val_set, run_config)
    result = stages.run_training(run, trainer)
    stages.save(run, trainer, run_config, result)


if __name__ == "__main__":
    cli.run(train)
