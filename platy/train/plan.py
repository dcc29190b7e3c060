"""The plan of a run before any weight is loaded: the model's shape, processes, batch arithmetic,
optimizer steps and the GPU memory estimate (platy/train/sizing.py), and its printed summary."""

import math
import os

from platy import cli
from platy.base_weights import resolve_base_model
from platy.cli import UserError, say
from platy.modeling import ALL_LINEAR, load_config, meta_model, resolve_target_modules
from platy.train import sizing, speed


def parallel_strategy(deepspeed_stage, world_size):
    """How the processes share the model, from the launcher's environment and --deepspeed."""
    if deepspeed_stage in (2, 3):
        return f"zero{deepspeed_stage}"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):  # set by accelerate launch
        return "fsdp"
    if world_size > 1:
        return "ddp"
    import torch

    return "model_parallel" if torch.cuda.device_count() > 1 else "single"


def with_model_plan(run):
    """run with the base model's path and config, checked LoRA targets and the plan (from a meta model)."""
    base_model_path = resolve_base_model(run.base_model, "--base_model")
    model_config, shape_source = load_model_config(run.base_model, base_model_path, run.trust_remote_code, run.dry_run)
    run = run.replace(base_model_path=base_model_path, model_config=model_config, shape_source=shape_source)
    model = meta_model(model_config, run.trust_remote_code)
    if run.finetuning == "lora":
        targets = resolve_target_modules(run.lora_target_modules, model, run.base_model)
        if run.lora_target_modules == [ALL_LINEAR]:
            say(f"--lora_target_modules {ALL_LINEAR}: {', '.join(targets)} (every Linear layer but the output head)")
        run = run.replace(lora_targets=targets)
    counts = sizing.parameter_counts(model, run.lora_targets or [], run.lora_r)
    run = run.replace(**checkpointing_choice(run, counts))
    return run.replace(plan=plan_run(run, counts))


def load_model_config(base_model, base_model_path, trust_remote_code, dry_run):
    """The base's config and where it came from; a dry run may plan from a published shape."""
    known = sizing.published_config(base_model) if dry_run else None
    try:  # a dry run of a model with a published shape asks no server (offline machines would wait on retries)
        config = load_config(base_model_path, trust_remote_code, flag="--base_model", local_only=known is not None)
        return config, "config.json"
    except UserError:
        if known is None:
            raise
        return known


def checkpointing_choice(run, counts):
    """checkpoint_fraction and why. --gradient_checkpointing auto: on with a GPU (as Platypus: GPU memory is what
    runs out) or for a plan checked against one (--gpu_memory_gb); on a CPU off where the run's memory without
    it, estimated, fits in CPU_MEMORY_SHARE of the memory available to each process, since recomputing every
    layer costs about a third more compute."""
    if run.checkpoint_fraction is not None:
        return {"checkpointing_reason": f"--gradient_checkpointing {run.gradient_checkpointing}"}
    if run.device == "cuda":
        return {"checkpoint_fraction": 1.0, "checkpointing_reason": "auto: on a GPU, where memory runs out first"}
    if run.gpu_memory_gb is not None:  # a plan for GPUs made on this machine
        return {"checkpoint_fraction": 1.0, "checkpointing_reason": "auto: on, as on a GPU (--gpu_memory_gb)"}
    available = speed.available_memory_gib()
    if available is None:
        return {"checkpoint_fraction": 1.0, "checkpointing_reason": "auto: the memory available here is unknown"}
    available /= max(cli.local_world_size(), 1)
    memory = memory_estimate(run, counts, run.precision, 0.0)
    need = memory["total"] - memory["cuda_overhead"]
    fits = need <= speed.CPU_MEMORY_SHARE * available
    return {
        "checkpoint_fraction": 0.0 if fits else 1.0,
        "checkpointing_reason": f"auto: on a CPU, about {need:.1f} GiB without it "
        f"{'fits' if fits else 'does not fit'} in {100 * speed.CPU_MEMORY_SHARE:g}% of the {available:.1f} GiB "
        "available" + ("" if cli.local_world_size() <= 1 else " per process"),
    }


def memory_estimate(run, counts, compute, fraction):
    """sizing.estimate for this run computing in `compute` with `fraction` of the layers checkpointed."""
    import torch

    return sizing.estimate(
        run.model_config,
        counts,
        finetuning=run.finetuning,
        quantization=run.quantization,
        compute_bytes=2 if compute in ("bf16", "fp16") else 4,
        double_quant=run.double_quant,
        micro_batch_size=run.micro_batch_size,
        cutoff_len=run.pack_budget,
        gradient_checkpointing=fraction,
        strategy=run.strategy,
        world_size=run.world_size,
        gpus_per_process=max(torch.cuda.device_count(), 1),
    )


def plan_run(run, counts):
    """Processes, batch arithmetic, tokens per step, the compute choices and the GPU memory estimate
    (see platy/train/sizing.py)."""
    import torch

    local = cli.local_world_size()
    gpus = torch.cuda.device_count()
    # on a machine without GPUs the plan is for GPUs computing in bf16
    compute = run.precision if run.device == "cuda" else "bf16"
    memory = memory_estimate(run, counts, compute, run.checkpoint_fraction)
    available = run.gpu_memory_gb
    if available is None and gpus:
        available = round(torch.cuda.get_device_properties(0).total_memory / sizing.GIB, 1)
    plan = {
        "processes": run.world_size,
        "nodes": max(1, run.world_size // max(local, 1)),
        "processes_per_node": local,
        "strategy": run.strategy,
        "global_batch": run.batch_size,
        "micro_batch_size": run.micro_batch_size,
        "gradient_accumulation_steps": run.gradient_accumulation_steps,
        "max_tokens_per_optimizer_step": run.batch_size * run.pack_budget,
        "parameters": counts["total"],
        "trainable_parameters": counts["total"] if run.finetuning == "full" else counts["lora"],
        "shape_source": run.shape_source,
        "precision": run.precision,
        "precision_reason": run.precision_reason,
        "activation_checkpointing": run.checkpoint_fraction,
        "checkpointing_reason": run.checkpointing_reason,
        "estimate_precision": compute,
        "gpu_memory_gib": memory,
        "gpu_memory_available_gib": available,
    }
    if run.train_rows is not None:
        plan["train_rows"] = len(run.train_rows)
    if run.train_rows is not None and not run.packing:  # packed rows are counted after tokenization
        plan["optimizer_steps"] = optimizer_steps(run, len(run.train_rows))
    return plan


def optimizer_steps(run, n_train):
    """Optimizer steps the run will take (as the Trainer counts them)."""
    if run.max_steps > 0:
        return run.max_steps
    micro_batches = math.ceil(n_train / (run.micro_batch_size * run.world_size))
    return math.ceil(run.num_epochs * math.ceil(micro_batches / run.gradient_accumulation_steps))


def describe_plan(run):
    """The plan as printed at start: model, training, processes, batch, tokens, data, memory and fit."""
    plan, config = run.plan, run.model_config
    what = (
        f"full fine-tuning, {plan['trainable_parameters']:,} trainable"
        if run.finetuning == "full"
        else f"{lora_words(run)} on {', '.join(run.lora_targets)}: "
        f"{plan['trainable_parameters']:,} trainable ({lora_share(plan['trainable_parameters'], plan['parameters'])})"
    )
    lines = [
        f"Plan ({'dry run, ' if run.dry_run else ''}estimates; no weights loaded yet):",
        f"  model: {run.base_model} ({config.model_type}, shape from {plan['shape_source']}): "
        f"{sizing.human(plan['parameters'])} parameters, hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, vocab {config.vocab_size}",
        f"  training: {what}; base weights {base_weights(run)}",
        f"  processes: {plan['processes']} = {plan['nodes']} node(s) x {plan['processes_per_node']} per node; "
        f"{sizing.STRATEGY_WORDS[plan['strategy']]}",
        f"  batch: global {plan['global_batch']} = micro batch {plan['micro_batch_size']} x gradient accumulation "
        f"{plan['gradient_accumulation_steps']} x {plan['processes']} process(es)",
        f"  tokens per optimizer step: up to {plan['max_tokens_per_optimizer_step']:,} ({plan['global_batch']} "
        + (
            f"packed rows x {run.pack_budget} tokens)"
            if run.packing
            else f"sequences x cutoff_len {run.cutoff_len}; shorter examples use fewer)"
        ),
        describe_compute(run),
        describe_data(run),
        describe_memory(run),
    ]
    available = plan["gpu_memory_available_gib"]
    total = plan["gpu_memory_gib"]["total"]
    if available is None:
        lines.append("  fit: no GPU here; pass --gpu_memory_gb (e.g. 80) to check the estimate against a GPU")
    else:
        verdict = "fits" if total <= available else "does NOT fit"
        lines.append(f"  fit: {total:.1f} GiB estimated {verdict} in {available:g} GiB per GPU")
    return "\n".join(lines)


def lora_words(run):
    """'LoRA r=16' with the variant and initialisation where they are not the plain ones."""
    words = ["DoRA" if run.use_dora else "LoRA", f"r={run.lora_r}"]
    if run.use_rslora:
        words.append(f"rsLoRA (scale alpha/sqrt(r) = {run.lora_alpha / run.lora_r**0.5:g})")
    if run.init_lora_weights != "default":
        words.append(
            f"init {run.init_lora_weights}" + (f" ({run.loftq_iter} iterations)" if run.loftq_iter > 1 else "")
        )
    if run.loraplus_lr_ratio is not None:
        words.append(f"LoRA+ (B at {run.loraplus_lr_ratio:g} x the learning rate)")
    return " ".join(words)


def lora_share(trainable, base):
    """The adapter's share of all parameters, base and adapter together (as peft counts it)."""
    return f"{100 * trainable / (base + trainable):.2f}%"


def base_weights(run, precision=None):
    """How the base weights are held: '4-bit NF4', '8-bit', or 'not quantized (bf16)'."""
    if run.finetuning == "full":
        return "fp32 (full fine-tuning)"
    if run.quantization == "none":
        return f"not quantized ({precision or run.precision})"
    return {"4bit": "4-bit NF4", "8bit": "8-bit"}[run.quantization]


def describe_compute(run):
    """What the run computes in and what it recomputes, each with why (the flag, or what auto found)."""
    plan = run.plan
    return (
        f"  precision: {plan['precision']} ({plan['precision_reason']})\n"
        f"  activation checkpointing: {describe_checkpointing(plan['activation_checkpointing'])} "
        f"({plan['checkpointing_reason']})"
    )


def describe_data(run):
    plan = run.plan
    if "train_rows" in plan and run.packing:
        return (
            f"  data: {plan['train_rows']:,} training rows, packed after tokenization: the optimizer steps "
            "are counted then"
        )
    if "train_rows" in plan:
        line = f"  data: {plan['train_rows']:,} training rows: {plan['optimizer_steps']:,} optimizer steps"
        note = warmup_note(run, plan["optimizer_steps"])
        return line + (f"\n{note}" if note else "")
    return f"  data: {run.data_path} is not a local file: rows are counted when the run starts"


def warmup_note(run, steps):
    """A note when the warmup covers the whole run (the learning rate never reaches its value), else None."""
    if run.warmup_steps < steps:
        return None
    return (
        f"Note: --warmup_steps {run.warmup_steps} covers the whole run ({steps} optimizer steps): the learning "
        f"rate never reaches --learning_rate {run.learning_rate}"
    )


def describe_memory(run):
    plan, memory = run.plan, run.plan["gpu_memory_gib"]
    where = (
        f"{plan['estimate_precision']} compute"
        if run.device == "cuda"
        else f"on GPUs computing in {plan['estimate_precision']}; this machine has no GPU, so precision is "
        f"{run.precision} here"
    )
    return (
        f"  GPU memory per process ({where}): weights {memory['weights']:.1f} GiB"
        f" + trainable weights, gradients and AdamW states {memory['trainable_and_optimizer']:.1f} GiB"
        f" + activations {memory['activations']:.1f} GiB (micro batch {run.micro_batch_size} x {run.pack_budget}"
        f" tokens, checkpointing {describe_checkpointing(run.checkpoint_fraction)}) + CUDA overhead"
        f" {memory['cuda_overhead']:.1f} GiB = {memory['total']:.1f} GiB"
    )


def describe_checkpointing(fraction):
    return {0: "off", 1: "on"}.get(fraction, f"on the first {100 * fraction:g}% of layers")
