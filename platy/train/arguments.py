"""The one place finetune.py's flags map onto transformers.TrainingArguments."""


def logging_interval(run, steps):
    """--logging_steps, or by default every 10 steps, often enough for about 10 points in a shorter run."""
    return run.logging_steps or max(1, min(10, steps // 10))


def training_arguments(run, has_val, steps):
    """The one place the flags map onto transformers.TrainingArguments (steps: the run's optimizer steps)."""
    import transformers

    return transformers.TrainingArguments(
        output_dir=run.output_dir,
        per_device_train_batch_size=run.micro_batch_size,
        per_device_eval_batch_size=run.micro_batch_size,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        num_train_epochs=run.num_epochs,
        max_steps=run.max_steps,
        learning_rate=run.learning_rate,
        lr_scheduler_type=run.lr_scheduler,
        warmup_steps=run.warmup_steps,
        weight_decay=run.weight_decay,
        optim=run.optim,
        neftune_noise_alpha=run.neftune_noise_alpha,  # the Trainer adds it in training only, never in evaluation
        bf16=run.precision == "bf16",
        fp16=run.precision == "fp16",
        activation_checkpointing=False,  # set on the model (lora.attach): it may cover some layers only
        use_liger_kernel=run.liger,
        torch_compile=run.torch_compile,
        logging_steps=logging_interval(run, steps),
        logging_first_step=True,  # the starting loss, and a point on the curves of short runs
        eval_strategy="steps" if has_val else "no",
        eval_steps=(run.eval_steps or run.save_steps) if has_val else None,
        eval_on_start=has_val,
        save_strategy="steps",
        save_steps=run.save_steps,
        save_total_limit=None,  # the Trainer subclass deletes old checkpoints, after the new one is complete
        train_sampling_strategy="group_by_length" if run.group_by_length else "random",
        report_to=run.report_to,
        run_name=run.wandb_run_name or None,
        seed=run.seed,
        data_seed=run.seed,
        # a PeftModel is no PreTrainedModel, so the Trainer would search for unused parameters
        ddp_find_unused_parameters=False if run.world_size > 1 else None,
        ddp_backend="gloo" if run.world_size > 1 and run.device == "cpu" else None,
        ddp_timeout=run.ddp_timeout,
        deepspeed=run.deepspeed,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        remove_unused_columns=False,
        dataloader_pin_memory=run.device == "cuda",
        # without use_cpu, accelerate runs CPU ranks as independent jobs: no gradient sync
        use_cpu=run.device == "cpu",
    )
