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

import inspect
import math
import os
import shutil
import time
from pathlib import Path

from platy import cli
from platy.cli import UserError, say
from platy.data.cache import tokenized_splits
from platy.data.examples import ExampleTokenizer, prepare_tokenizer
from platy.data.packing import PackedCollator, pack_dataset
from platy.data.rows import load_rows, split_rows
from platy.files import ADAPTER_FILES, CURVES, LOG_HISTORY, RUN_CONFIG, read_run_config, write_json
from platy.modeling import (
    SHARDED,
    check_target_modules,
    linear_module_names,
    load_config,
    load_model,
    load_tokenizer,
    meta_model,
    parse_target_modules,
    quantization_config,
    quantization_layout,
    resolve_base_model,
    resolve_precision,
)
from platy.prompts import Prompter
from platy.reporting import library_versions, loss_progress_callback, plot_curves, say_configuration
from platy.train import sizing
from platy.train.checkpoints import PREEMPTED, STAGING, checkpoint_step, remove_leftovers, resolve_resume, retire
from platy.train.speed import checkpoint_fraction, checkpoint_layers, liger_unavailable

REPORT_TO = ("auto", "none", "wandb", "tensorboard")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
OWN_OUTPUTS = (*ADAPTER_FILES, "adapter_config.json", RUN_CONFIG)
FINETUNING = ("lora", "full")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


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
    logging_steps: int = 10,
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
        lora_target_modules: Linear layers to adapt, e.g. '[gate_proj, down_proj, up_proj]'.
        train_on_inputs: Also train on the prompt tokens (False: only the response and EOS
            are labels).
        add_eos_token: False: EOS ends every response that fits in cutoff_len, and a
            response cut by cutoff_len ends without EOS. True: EOS always ends the example,
            even a cut one.
        group_by_length: Batch examples of similar length together (less padding).
        prompt_template_name: Template in templates/ (alpaca, alpaca_short, alpaca_ko) or a
            path to a template .json.
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
        logging_steps: Log loss every this many optimizer steps.
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
    """
    setup = validate(dict(locals()))
    run_config = describe_run(setup)
    if setup.dry_run:
        say("Dry run: nothing was loaded or written; drop --dry_run to train.")
        return
    tokenizer, prompter = load_tokenizer_and_prompter(setup)
    train_set, val_set, run_config["data"] = build_datasets(setup, tokenizer, prompter)
    if setup.finished_checkpoint:  # the run ended but its final save was cut short
        return export_finished_checkpoint(setup, tokenizer, run_config)
    model, run_config["resolved"]["quantization_layout"] = load_model_with_lora(setup)
    trainer = build_trainer(setup, model, tokenizer, train_set, val_set, run_config)
    result = run_training(setup, trainer, run_config)
    save(setup, trainer, run_config, result)


class Setup(dict):
    """Validated flags plus what was derived from them; attribute access for readability."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def validate(flags):
    """Check every flag before any weight is loaded; fail once, naming the flag and the fix."""
    problems = []
    f = Setup(cli.coerce_bools(train, flags))
    if not f.base_model:
        problems.append("--base_model is required (a hub id, a local folder, or builtin:tiny-llama)")
    if not f.data_path:
        problems.append("--data_path is required (a JSON, JSONL, CSV or Parquet file, or a data set id)")
    for name in ("batch_size", "micro_batch_size", "cutoff_len", "lora_r", "save_steps", "logging_steps"):
        if not isinstance(f[name], int) or isinstance(f[name], bool) or f[name] < 1:
            problems.append(f"--{name} must be a positive integer, got {f[name]!r}")
    for name in ("warmup_steps", "save_total_limit"):
        if not isinstance(f[name], int) or f[name] < 0:
            problems.append(f"--{name} must be a non-negative integer, got {f[name]!r}")
    if not isinstance(f.max_steps, int) or f.max_steps == 0 or f.max_steps < -1:
        problems.append(f"--max_steps must be a positive integer or -1 (run num_epochs), got {f.max_steps!r}")
    if f.eval_steps is not None and (not isinstance(f.eval_steps, int) or f.eval_steps < 1):
        problems.append(f"--eval_steps must be a positive integer, got {f.eval_steps!r}")
    if not isinstance(f.num_epochs, (int, float)) or f.num_epochs <= 0:
        problems.append(f"--num_epochs must be positive, got {f.num_epochs!r}")
    if not isinstance(f.learning_rate, (int, float)) or f.learning_rate <= 0:
        problems.append(f"--learning_rate must be positive, got {f.learning_rate!r}")
    for name in ("weight_decay", "lora_alpha"):
        if not isinstance(f[name], (int, float)) or isinstance(f[name], bool) or f[name] < 0:
            problems.append(f"--{name} must be a non-negative number, got {f[name]!r}")
    if not isinstance(f.lora_dropout, (int, float)) or not 0 <= f.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {f.lora_dropout!r}")
    if not isinstance(f.val_set_size, (int, float)) or f.val_set_size < 0:
        problems.append(f"--val_set_size must be a row count or a fraction, got {f.val_set_size!r}")
    if f.lr_scheduler not in LR_SCHEDULERS:
        problems.append(f"--lr_scheduler {f.lr_scheduler}: choose one of {', '.join(LR_SCHEDULERS)}")
    if f.eval_steps is not None and not f.val_set_size:
        problems.append("--eval_steps needs held-out rows: set --val_set_size too")
    if f.finetuning not in FINETUNING:
        problems.append(f"--finetuning {f.finetuning}: choose one of {', '.join(FINETUNING)}")
    elif f.finetuning == "full" and f.quantization != "none":
        problems.append(
            f"--finetuning full trains every weight, which a {f.quantization} base cannot hold; add --quantization none"
        )
    if f.attn_implementation not in ATTENTION:
        problems.append(f"--attn_implementation {f.attn_implementation}: choose one of {', '.join(ATTENTION)}")
    if f.gpu_memory_gb is not None and (not isinstance(f.gpu_memory_gb, (int, float)) or f.gpu_memory_gb <= 0):
        problems.append(f"--gpu_memory_gb must be a positive number, got {f.gpu_memory_gb!r}")
    problems += speed_problems(f)
    try:
        f["checkpoint_fraction"] = checkpoint_fraction(f.gradient_checkpointing)
    except UserError as err:
        problems.append(str(err))
    if problems:
        raise UserError("; ".join(problems))
    if f.liger and (why := liger_unavailable()):
        say(f"Note: --liger is off: {why}; training with the model's own layers")
        f["liger"] = False

    # batch_size is global: it must split evenly over micro batches and processes
    world = cli.world_size()
    per_step = f.micro_batch_size * world
    if f.batch_size % per_step:
        raise UserError(
            f"--batch_size {f.batch_size} is not a multiple of --micro_batch_size {f.micro_batch_size} x "
            f"{world} process(es) = {per_step}; choose a batch_size such as "
            f"{per_step * max(1, round(f.batch_size / per_step))}"
        )
    f["world_size"] = world
    # the token budget of one packed row: a micro-step's worth of tokens
    # tokens of one row at most: a packed row's budget, or cutoff_len (--micro_batch_tokens needs --packing)
    f["pack_budget"] = f.micro_batch_tokens or f.cutoff_len
    f["gradient_accumulation_steps"] = f.batch_size // per_step
    f["lora_target_modules"] = parse_target_modules(f.lora_target_modules)
    f["prompter"] = Prompter(f.prompt_template_name)
    f["output_dir"] = str(Path(f.output_dir).expanduser().resolve())
    f["resume"] = resolve_resume(f.resume_from_checkpoint, f.output_dir)
    if f.finetuning == "full" and f.resume and f.resume[0] == "adapter":
        raise UserError(
            f"--resume_from_checkpoint {f.resume[1]} is an adapter folder, which cannot start "
            "--finetuning full; give a checkpoint-N folder of a full run, or drop the flag"
        )
    check_output_dir(f.output_dir, f.overwrite, f.resume)
    f["rows"] = f["data_fingerprint"] = f["train_rows"] = f["val_rows"] = None
    if not f.dry_run or Path(f.data_path).expanduser().is_file():  # a dry run fetches nothing
        f["rows"], f["data_fingerprint"] = load_rows(f.data_path, f.seed)
        f["train_rows"], f["val_rows"] = split_rows(f.rows, f.val_set_size, f.seed)
    if f.resume and f.resume[0] == "checkpoint" and f.rows is not None:
        note_changed_settings(f)

    import torch

    f["precision"] = resolve_precision(f.precision)
    quantization_config(f.quantization, f.precision, f.double_quant)  # validates the quantization flags
    f["report_to"] = resolve_report_to(f)
    f["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    f["deepspeed_stage"] = check_deepspeed(f.deepspeed, f.quantization, f.dry_run) if f.deepspeed else None
    f["strategy"] = parallel_strategy(f)
    check_attention(f)

    f["base_model_path"] = resolve_base_model(f.base_model)
    f["model_config"], f["shape_source"] = load_model_config(f)
    model = meta_model(f.model_config, f.trust_remote_code)
    if f.finetuning == "lora":
        check_target_modules(f.lora_target_modules, linear_module_names(model), f.base_model)
    f["plan"] = plan_run(f, model)
    if not f.dry_run:
        check_writable(f.output_dir)
    return f


def speed_problems(f):
    """Problems with the speed flags (packing, token budgets), to be reported with all others."""
    problems = []  # --packing is a bool flag: cli.coerce_bools has checked its word
    if f.micro_batch_tokens is not None:
        if (
            not isinstance(f.micro_batch_tokens, int)
            or isinstance(f.micro_batch_tokens, bool)
            or f.micro_batch_tokens < 1
        ):
            problems.append(f"--micro_batch_tokens must be a positive integer, got {f.micro_batch_tokens!r}")
        elif not f.packing:
            problems.append("--micro_batch_tokens fills each micro-step with packed examples: add --packing true")
        elif isinstance(f.cutoff_len, int) and f.micro_batch_tokens < f.cutoff_len:
            problems.append(
                f"--micro_batch_tokens {f.micro_batch_tokens} is below --cutoff_len {f.cutoff_len}, "
                "so the longest examples would not fit; raise it or lower --cutoff_len"
            )
        if f.micro_batch_size != 1:
            problems.append(
                f"--micro_batch_tokens replaces --micro_batch_size (got {f.micro_batch_size!r}); "
                "drop --micro_batch_size"
            )
    if f.packing and f.group_by_length:
        problems.append(
            "--group_by_length has nothing to do with --packing (packed rows hold no padding); drop one of them"
        )
    return problems


def parallel_strategy(f):
    """How the processes share the model, from the launcher's environment and --deepspeed."""
    if f.deepspeed_stage in (2, 3):
        return f"zero{f.deepspeed_stage}"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):  # set by accelerate launch
        return "fsdp"
    if f.world_size > 1:
        return "ddp"
    import torch

    return "model_parallel" if torch.cuda.device_count() > 1 else "single"


def check_attention(f):
    if f.attn_implementation != "flash_attention_2":
        return
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            "--attn_implementation flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn --no-build-isolation); or use sdpa"
        )
    if f.device != "cuda" and not f.dry_run:
        raise UserError("--attn_implementation flash_attention_2 runs on CUDA GPUs only; use sdpa here")


def load_model_config(f):
    """The base's config and where it came from; a dry run may plan from a published shape."""
    known = sizing.published_config(f.base_model) if f.dry_run else None
    try:  # a dry run of a model with a published shape asks no server (offline machines would wait on retries)
        return load_config(f.base_model_path, f.trust_remote_code, local_only=known is not None), "config.json"
    except UserError:
        if known is None:
            raise
        return known


def plan_run(f, model):
    """Processes, batch arithmetic, tokens per step and the GPU memory estimate (see platy/sizing.py)."""
    import torch

    counts = sizing.parameter_counts(model, f.lora_target_modules, f.lora_r)
    local = cli.local_world_size()
    gpus = torch.cuda.device_count()
    # on a machine without GPUs the plan is for GPUs computing in bf16
    compute = f.precision if f.device == "cuda" else "bf16"
    memory = sizing.estimate(
        f.model_config,
        counts,
        finetuning=f.finetuning,
        quantization=f.quantization,
        compute_bytes=2 if compute in ("bf16", "fp16") else 4,
        double_quant=f.double_quant,
        micro_batch_size=f.micro_batch_size,
        cutoff_len=f.pack_budget,
        gradient_checkpointing=f.checkpoint_fraction,
        strategy=f.strategy,
        world_size=f.world_size,
        gpus_per_process=max(gpus, 1),
    )
    available = f.gpu_memory_gb
    if available is None and gpus:
        available = round(torch.cuda.get_device_properties(0).total_memory / sizing.GIB, 1)
    plan = {
        "processes": f.world_size,
        "nodes": max(1, f.world_size // max(local, 1)),
        "processes_per_node": local,
        "strategy": f.strategy,
        "global_batch": f.batch_size,
        "micro_batch_size": f.micro_batch_size,
        "gradient_accumulation_steps": f.gradient_accumulation_steps,
        "max_tokens_per_optimizer_step": f.batch_size * f.pack_budget,
        "parameters": counts["total"],
        "trainable_parameters": counts["total"] if f.finetuning == "full" else counts["lora"],
        "shape_source": f.shape_source,
        "estimate_precision": compute,
        "gpu_memory_gib": memory,
        "gpu_memory_available_gib": available,
    }
    if f.train_rows is not None:
        plan["train_rows"] = len(f.train_rows)
    if f.train_rows is not None and not f.packing:  # packed rows are counted after tokenization
        plan["optimizer_steps"] = optimizer_steps(f, len(f.train_rows))
    return plan


def resolve_report_to(f):
    wanted = [r.strip() for r in str(f.report_to).split(",") if r.strip()]
    unknown = [r for r in wanted if r not in REPORT_TO]
    if unknown or not wanted:
        raise UserError(f"--report_to {f.report_to}: choose from {', '.join(REPORT_TO)}")
    if wanted == ["auto"]:
        wanted = ["wandb"] if f.wandb_project else ["none"]
    wandb_flags = [n for n in ("wandb_project", "wandb_run_name", "wandb_watch", "wandb_log_model") if f[n]]
    if wandb_flags and "wandb" not in wanted:
        raise UserError(
            f"--{wandb_flags[0]} is set but --report_to {f.report_to} does not include wandb; "
            "add wandb to --report_to or drop the wandb flags"
        )
    if "none" in wanted and len(wanted) > 1:
        raise UserError(f"--report_to {f.report_to}: 'none' cannot be combined with other reporters")
    for reporter, module in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if reporter in wanted:
            try:
                __import__(module)
            except ImportError:
                raise UserError(
                    f"--report_to {reporter}: the {module} package is not installed; "
                    f"pip install {module}, or use --report_to none"
                ) from None
    return wanted


def check_deepspeed(path, quantization, dry_run=False):
    """The config's ZeRO stage; a dry run only notes a missing deepspeed package."""
    import json

    if not Path(path).is_file():
        raise UserError(f"--deepspeed {path}: file not found; give a DeepSpeed JSON config")
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--deepspeed {path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    stage = (config.get("zero_optimization") or {}).get("stage")
    if stage == 3 and quantization != "none":
        # the model is loaded (and quantized) whole on every rank before the Trainer starts DeepSpeed
        raise UserError(
            f"--deepspeed {path}: ZeRO-3 cannot shard a {quantization} base loaded by this script; "
            "use ZeRO-2 (the Dolphin-ORCA-Platypus setup) or --quantization none"
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        if not dry_run:
            raise UserError("--deepspeed needs the deepspeed package: pip install deepspeed") from None
        say("Note: the deepspeed package is not installed here; the training machines need it")
    return stage


def check_output_dir(output_dir, overwrite, resume):
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file; give a folder")
    resuming_here = resume and resume[0] == "checkpoint" and Path(resume[1]).resolve().parent == path.resolve()
    if resuming_here or overwrite or not path.is_dir():
        return
    if (path / RUN_CONFIG).exists():
        raise UserError(
            f"--output_dir {output_dir} already holds a finished run; choose another folder or pass "
            "--overwrite (to train that adapter further: --resume_from_checkpoint "
            f"{output_dir} with a new --output_dir)"
        )
    ours = [name for name in OWN_OUTPUTS if (path / name).exists()] + [p.name for p in path.glob("checkpoint-*")]
    if ours:
        raise UserError(
            f"--output_dir {output_dir} holds an unfinished run ({', '.join(sorted(ours)[:3])}); "
            "continue it with --resume_from_checkpoint auto, choose another folder, or pass --overwrite"
        )


# what decides which example lands in which step, and what each step computes
RESUME_MUST_MATCH = (
    "base_model",
    "batch_size",
    "micro_batch_size",
    "cutoff_len",
    "val_set_size",
    "seed",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "train_on_inputs",
    "add_eos_token",
    "group_by_length",
    "prompt_template_name",
    "quantization",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "weight_decay",
    "packing",
    "micro_batch_tokens",
)


def note_changed_settings(f):
    """Resuming with other data or hyperparameters continues, but not as the interrupted run would have."""
    saved = read_run_config(f.resume[1])
    if not saved:
        return
    changed = [
        f"{name} {saved['flags'][name]!r} -> {f[name]!r}"
        for name in RESUME_MUST_MATCH
        if name in saved.get("flags", {}) and saved["flags"][name] != f[name]
    ]
    if saved.get("data", {}).get("fingerprint", f.data_fingerprint) != f.data_fingerprint:
        changed.append("the data rows (another fingerprint)")
    if changed:
        say(
            f"Note: resuming from {Path(f.resume[1]).name} with settings that differ from its run: "
            f"{'; '.join(changed)}. The run continues, but not as the interrupted one would have"
        )


def check_writable(output_dir):
    """A folder that cannot take a checkpoint must fail now, not after hours of training."""
    path = Path(output_dir)
    created = [p for p in [path, *path.parents] if not p.exists()]  # removed again: a failed check writes nothing
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"--output_dir {output_dir} cannot be written ({err.strerror or err}); choose a folder you can write to"
        ) from None
    finally:
        for folder in created:
            if folder.is_dir():
                folder.rmdir()


def load_tokenizer_and_prompter(setup):
    tokenizer = prepare_tokenizer(load_tokenizer(setup.base_model_path, setup.trust_remote_code))
    return tokenizer, setup.prompter


def build_datasets(setup, tokenizer, prompter):
    example_tokenizer = ExampleTokenizer(
        tokenizer, prompter, setup.cutoff_len, setup.train_on_inputs, setup.add_eos_token
    )
    split = {"seed": setup.seed, "val_set_size": setup.val_set_size}
    splits, (where, folder) = tokenized_splits(
        {"train": setup.train_rows, "val": setup.val_rows},
        example_tokenizer,
        setup.data_fingerprint,
        split,
        use_cache=setup.cache_tokens,
    )
    (train_set, train_stats), (val_set, val_stats) = splits["train"], splits["val"]
    if folder is not None:
        say(f"Tokenized data: {'loaded from the cache' if where == 'cache' else 'tokenized and cached'} in {folder}")
    elif not setup.cache_tokens:
        say("Tokenized data: tokenized in memory, not cached (--cache_tokens false)")
    if train_set is None or len(train_set) == 0:
        raise UserError(
            f"{setup.data_path}: no training example keeps any response token within --cutoff_len "
            f"{setup.cutoff_len}; raise --cutoff_len or shorten the prompts"
        )
    if val_set is not None and len(val_set) == 0:
        raise UserError(
            f"--val_set_size {setup.val_set_size}: every held-out example was cut away by "
            f"--cutoff_len {setup.cutoff_len}; raise --cutoff_len"
        )
    stats = {"path": setup.data_path, "fingerprint": setup.data_fingerprint, "train": train_stats, "val": val_stats}
    dropped = train_stats["dropped_cut_away"] + val_stats["dropped_cut_away"]
    say(
        f"Data: {len(setup.rows)} rows from {setup.data_path}; {len(train_set)} train, "
        f"{0 if val_set is None else len(val_set)} held out; {train_stats['truncated'] + val_stats['truncated']} "
        f"cut at cutoff_len {setup.cutoff_len}; {dropped} dropped (response cut away entirely); "
        f"{train_stats['label_tokens']:,} response tokens (labels) per epoch"
    )
    if setup.packing:
        train_set, stats["train_packing"] = pack_dataset(train_set, setup.pack_budget)
        val_set, stats["val_packing"] = pack_dataset(val_set, setup.pack_budget)
        packing = stats["train_packing"]
        say(
            f"Packing: {packing['examples']} training examples in {packing['packed_rows']} rows of up to "
            f"{setup.pack_budget} tokens ({100 * packing['fill']:.1f}% filled); batch_size {setup.batch_size} "
            "and micro_batch_size count these rows"
        )
    steps = optimizer_steps(setup, len(train_set))
    done = checkpoint_step(setup.resume[1]) if setup.resume and setup.resume[0] == "checkpoint" else 0
    # a run whose last checkpoint holds every step but whose final save was cut short: export that checkpoint
    setup["finished_checkpoint"] = bool(
        done
        and done >= steps
        and Path(setup.resume[1]).parent == Path(setup.output_dir)
        and not (Path(setup.output_dir) / RUN_CONFIG).exists()
    )
    if done and done >= steps and not setup.finished_checkpoint:
        raise UserError(
            f"--resume_from_checkpoint {setup.resume[1]}: that checkpoint already finished the run "
            f"({done} of {steps} steps); nothing to train. Raise --num_epochs "
            "or --max_steps to go further"
        )
    if setup.warmup_steps >= steps:
        say(
            f"Note: --warmup_steps {setup.warmup_steps} covers the whole run ({steps} optimizer steps): the learning "
            f"rate never reaches --learning_rate {setup.learning_rate}"
        )
    return train_set, val_set, stats


def optimizer_steps(setup, n_train):
    """Optimizer steps the run will take (as the Trainer counts them)."""
    if setup.max_steps > 0:
        return setup.max_steps
    micro_batches = math.ceil(n_train / (setup.micro_batch_size * setup.world_size))
    return math.ceil(setup.num_epochs * math.ceil(micro_batches / setup.gradient_accumulation_steps))


def load_model_with_lora(setup):
    """The base with LoRA adapters (or, for --finetuning full, every weight trainable)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    fsdp = setup.strategy == "fsdp"
    full = setup.finetuning == "full"
    say(
        f"Loading {setup.base_model} ({setup.quantization}, {setup.precision}) on {setup.device}"
        + (", fp32 master weights for full fine-tuning" if full else "")
    )
    model = load_model(
        setup.base_model_path,
        setup.quantization,
        setup.precision,
        setup.double_quant,
        setup.trust_remote_code,
        # FSDP and ZeRO-3 place (and shard) the weights themselves
        placement=SHARDED if setup.strategy in ("fsdp", "zero3") else None,
        load_precision="fp32" if full else None,
        # FSDP shards float tensors only: pack the 4-bit codes in the compute dtype
        quant_storage=setup.precision if fsdp and setup.quantization == "4bit" else None,
        attn_implementation=None if setup.attn_implementation == "auto" else setup.attn_implementation,
    )
    checkpointed, layers = checkpoint_layers(model, setup.checkpoint_fraction)
    if checkpointed and cli.is_main_process():
        say(f"Activation checkpointing on {checkpointed} of {layers} decoder layers")
    if full:
        if cli.is_main_process():
            say(f"Full fine-tuning: all {sum(p.numel() for p in model.parameters()):,} parameters trainable")
        return model, None
    layout = quantization_layout(model, setup.quantization, setup.precision)
    if setup.quantization != "none" and not fsdp:
        # upcasts norms/embeddings to fp32 for stable training; checkpointing is the Trainer's job.
        # Not under FSDP: a wrapped layer's tensors must share one dtype.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(setup.seed)
    lora = LoraConfig(
        r=setup.lora_r,
        lora_alpha=setup.lora_alpha,
        lora_dropout=setup.lora_dropout,
        target_modules=setup.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if setup.resume and setup.resume[0] == "adapter":
        load_adapter_weights(model, setup.resume[1])
    if cli.is_main_process():
        trainable, total = model.get_nb_trainable_parameters()
        say(
            f"LoRA r={setup.lora_r} alpha={setup.lora_alpha} on {', '.join(setup.lora_target_modules)}: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"
        )
    return model, layout


def load_adapter_weights(model, folder):
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(folder, device="cpu")
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise UserError(
            f"--resume_from_checkpoint {folder}: the adapter does not fit this model and LoRA settings "
            f"({len(missing)} LoRA weights missing, e.g. {missing[0]}); check --base_model and "
            "--lora_target_modules"
        )
    say(
        f"Loaded adapter weights from {folder}. The optimizer state and learning-rate schedule restart from step 0 "
        "(an adapter folder holds no optimizer state; resume from a checkpoint-N folder to continue them)."
    )


def build_trainer(setup, model, tokenizer, train_set, val_set, run_config):
    import transformers
    from transformers.trainer_callback import ProgressCallback

    from platy.train.trainer import Trainer

    if setup.wandb_project:
        os.environ["WANDB_PROJECT"] = setup.wandb_project
    if setup.wandb_watch:
        os.environ["WANDB_WATCH"] = setup.wandb_watch
    if setup.wandb_log_model:
        os.environ["WANDB_LOG_MODEL"] = setup.wandb_log_model
    has_val = val_set is not None
    args = transformers.TrainingArguments(
        output_dir=setup.output_dir,
        per_device_train_batch_size=setup.micro_batch_size,
        per_device_eval_batch_size=setup.micro_batch_size,
        gradient_accumulation_steps=setup.gradient_accumulation_steps,
        num_train_epochs=setup.num_epochs,
        max_steps=setup.max_steps,
        learning_rate=setup.learning_rate,
        lr_scheduler_type=setup.lr_scheduler,
        warmup_steps=setup.warmup_steps,
        weight_decay=setup.weight_decay,
        bf16=setup.precision == "bf16",
        fp16=setup.precision == "fp16",
        activation_checkpointing=False,  # set on the model (load_model_with_lora): it may cover some layers only
        use_liger_kernel=setup.liger,
        torch_compile=setup.torch_compile,
        logging_steps=setup.logging_steps,
        logging_first_step=True,  # the starting loss, and a point on the curves of short runs
        eval_strategy="steps" if has_val else "no",
        eval_steps=(setup.eval_steps or setup.save_steps) if has_val else None,
        eval_on_start=has_val,
        save_strategy="steps",
        save_steps=setup.save_steps,
        save_total_limit=None,  # the Trainer subclass deletes old checkpoints, after the new one is complete
        train_sampling_strategy="group_by_length" if setup.group_by_length else "random",
        report_to=setup.report_to,
        run_name=setup.wandb_run_name or None,
        seed=setup.seed,
        data_seed=setup.seed,
        # a PeftModel is no PreTrainedModel, so the Trainer would search for unused parameters
        ddp_find_unused_parameters=False if setup.world_size > 1 else None,
        ddp_backend="gloo" if setup.world_size > 1 and setup.device == "cpu" else None,
        deepspeed=setup.deepspeed,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        remove_unused_columns=False,
        dataloader_pin_memory=setup.device == "cuda",
        # without use_cpu, accelerate runs CPU ranks as independent jobs: no gradient sync
        use_cpu=setup.device == "cpu",
    )
    if setup.packing:
        collator = PackedCollator()
    else:
        collator = transformers.DataCollatorForSeq2Seq(
            tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True, label_pad_token_id=-100
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=collator,
        processing_class=tokenizer,
        run_config=run_config,
        checkpoint_limit=setup.save_total_limit,
        skip_nonfinite_steps=setup.skip_nonfinite_steps,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(loss_progress_callback())
    return trainer


def describe_run(setup):
    """The run configuration: printed once at start, saved next to the adapter and in checkpoints."""
    flags = {k: setup[k] for k in inspect.signature(train).parameters}
    prompter = setup.prompter
    config = {
        "flags": flags,
        "resolved": {
            "base_model_path": setup.base_model_path,
            "model_type": setup.model_config.model_type,
            "template": {"name": prompter.name, "path": str(prompter.path), **prompter.template},
            "precision": setup.precision,
            "device": setup.device,
            "world_size": setup.world_size,
            "gradient_accumulation_steps": setup.gradient_accumulation_steps,
            "resume": setup.resume,
            "plan": setup.plan,
        },
        "data": {},
        "versions": library_versions(),
    }
    say_configuration(
        "Run configuration", {**flags, **{k: v for k, v in config["resolved"].items() if k not in ("template", "plan")}}
    )
    say(describe_plan(setup))
    return config


def describe_plan(setup):
    plan, memory = setup.plan, setup.plan["gpu_memory_gib"]
    config = setup.model_config
    what = (
        f"full fine-tuning, {plan['trainable_parameters']:,} trainable"
        if setup.finetuning == "full"
        else f"LoRA r={setup.lora_r} on {', '.join(setup.lora_target_modules)}: "
        f"{plan['trainable_parameters']:,} trainable ({100 * plan['trainable_parameters'] / plan['parameters']:.2f}%)"
    )
    lines = [
        f"Plan ({'dry run, ' if setup.dry_run else ''}estimates; no weights loaded yet):",
        f"  model: {setup.base_model} ({config.model_type}, shape from {plan['shape_source']}): "
        f"{sizing.human(plan['parameters'])} parameters, hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, vocab {config.vocab_size}",
        f"  training: {what}; base weights {setup.quantization if setup.finetuning == 'lora' else 'fp32'}",
        f"  processes: {plan['processes']} = {plan['nodes']} node(s) x {plan['processes_per_node']} per node; "
        f"{sizing.STRATEGY_WORDS[plan['strategy']]}",
        f"  batch: global {plan['global_batch']} = micro batch {plan['micro_batch_size']} x gradient accumulation "
        f"{plan['gradient_accumulation_steps']} x {plan['processes']} process(es)",
        f"  tokens per optimizer step: up to {plan['max_tokens_per_optimizer_step']:,} ({plan['global_batch']} "
        + (
            f"packed rows x {setup.pack_budget} tokens)"
            if setup.packing
            else f"sequences x cutoff_len {setup.cutoff_len}; shorter examples use fewer)"
        ),
    ]
    if "train_rows" in plan and setup.packing:
        lines.append(
            f"  data: {plan['train_rows']:,} training rows, packed after tokenization: the optimizer steps "
            "are counted then"
        )
    elif "train_rows" in plan:
        lines.append(f"  data: {plan['train_rows']:,} training rows: {plan['optimizer_steps']:,} optimizer steps")
    else:
        lines.append(f"  data: {setup.data_path} is not a local file: rows are counted when the run starts")
    lines.append(
        f"  GPU memory per process ({plan['estimate_precision']} compute): weights {memory['weights']:.1f} GiB"
        f" + trainable weights, gradients and AdamW states {memory['trainable_and_optimizer']:.1f} GiB"
        f" + activations {memory['activations']:.1f} GiB (micro batch {setup.micro_batch_size} x {setup.pack_budget}"
        f" tokens, checkpointing {describe_checkpointing(setup.checkpoint_fraction)}) + CUDA overhead"
        f" {memory['cuda_overhead']:.1f} GiB = {memory['total']:.1f} GiB"
    )
    available = plan["gpu_memory_available_gib"]
    if available is None:
        lines.append("  fit: no GPU here; pass --gpu_memory_gb (e.g. 80) to check the estimate against a GPU")
    else:
        verdict = "fits" if memory["total"] <= available else "does NOT fit"
        lines.append(f"  fit: {memory['total']:.1f} GiB estimated {verdict} in {available:g} GiB per GPU")
    return "\n".join(lines)


def describe_checkpointing(fraction):
    return {0: "off", 1: "on"}.get(fraction, f"on the first {100 * fraction:g}% of layers")


def run_training(setup, trainer, run_config):
    from platy.train.trainer import PreemptionCallback, StopRequest, lost_peer, peer_lost

    out = Path(setup.output_dir)
    if cli.is_main_process():
        if setup.overwrite and not setup.resume:
            # the old run's marker and checkpoints go first: a crash must not leave the folder looking finished
            (out / RUN_CONFIG).unlink(missing_ok=True)
            for old in out.glob("checkpoint-*"):
                say(f"--overwrite: removing {old}")
                retire(old)
        remove_leftovers(out)
        (out / PREEMPTED).unlink(missing_ok=True)
    resume = setup.resume[1] if setup.resume and setup.resume[0] == "checkpoint" else None
    if resume:
        say(f"Resuming from {resume} (global step, optimizer, schedule, RNG and data order continue)")
    started = time.time()
    with StopRequest() as request:
        preemption = PreemptionCallback(request)
        trainer.add_callback(preemption)
        try:
            output = trainer.train(resume_from_checkpoint=resume)
        except RuntimeError as err:
            if setup.world_size > 1 and lost_peer(err):
                raise peer_lost(err, out) from None
            raise
    seconds = time.time() - started
    if preemption.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
        stop_preempted(setup, trainer.state)
    metrics = {}
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
    state = trainer.state
    tokens = int(state.num_input_tokens_seen)
    losses = [r["loss"] for r in state.log_history if "loss" in r]
    return {
        "global_step": state.global_step,
        "trained_tokens": tokens,
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "train_loss": output.training_loss,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_loss": metrics.get("eval_loss"),
    }


def stop_preempted(setup, state):
    """Signalled: the checkpoint of this step is written; leave a marker and exit with PREEMPTED."""
    checkpoint = Path(setup.output_dir) / f"checkpoint-{state.global_step}"
    if cli.is_main_process():
        record = {
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "checkpoint": str(checkpoint),
            "time": time.time(),
        }
        write_json(Path(setup.output_dir) / PREEMPTED, record)
        if os.environ.get("PLATY_PREEMPTED_FILE"):  # fine-tuning.sh turns torchrun's status back into PREEMPTED
            write_json(os.environ["PLATY_PREEMPTED_FILE"], record)
    raise cli.Stopped(
        f"stopped at optimizer step {state.global_step} of {state.max_steps}; checkpoint saved in "
        f"{checkpoint}. Run the same command with --resume_from_checkpoint auto to finish",
        cli.PREEMPTED,
        label="preempted",
        every_rank=True,
    )


def save(setup, trainer, run_config, result):
    """Adapter (safetensors) and tokenizer via the Trainer; then config, history, curves (rank 0)."""
    from platy.train.trainer import write_failed

    out = Path(setup.output_dir)
    try:
        trainer.save_model(str(out / STAGING / "final"))  # every rank: ZeRO-3 gathers the weights
        if trainer.is_world_process_zero():
            publish_final(out / STAGING / "final", out)
            write_results(out, trainer.state.log_history, run_config, result)
    except OSError as err:
        raise write_failed(err, "writing the final adapter", out) from None
    if trainer.is_world_process_zero():
        report_done(setup, out, result)


def publish_final(staged, out):
    """Move each fully written file into output_dir: a reader never sees half an adapter."""
    for path in staged.iterdir():
        os.replace(path, out / path.name)
    shutil.rmtree(staged.parent, ignore_errors=True)


def write_results(out, log_history, run_config, result):
    write_json(out / LOG_HISTORY, log_history)
    plot_curves(log_history, out / CURVES)
    run_config["result"] = result
    write_json(out / RUN_CONFIG, run_config)  # written last: its presence marks a finished run


TRAINER_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin", RUN_CONFIG)


def export_finished_checkpoint(setup, tokenizer, run_config):
    """The last checkpoint holds the whole run but the final save was interrupted: export it."""
    import json

    checkpoint = Path(setup.resume[1])
    out = Path(setup.output_dir)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    say(
        f"{checkpoint.name} already holds all {state['global_step']} steps of this run; its final save was "
        "interrupted, so its adapter becomes the final one"
    )
    remove_leftovers(out)
    staged = out / STAGING / "final"
    staged.mkdir(parents=True)
    for path in checkpoint.iterdir():  # the weights (adapter or full model) and their configs, not the Trainer state
        if path.is_file() and path.name not in TRAINER_STATE and not path.name.startswith("rng_state"):
            shutil.copy2(path, staged / path.name)
    tokenizer.save_pretrained(staged)
    history = state.get("log_history", [])
    losses = [r["loss"] for r in history if "loss" in r]
    result = {
        "global_step": state["global_step"],
        "trained_tokens": int(state.get("num_input_tokens_seen", 0)),
        "train_seconds": None,
        "tokens_per_second": None,
        "train_loss": sum(losses) / len(losses) if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_loss": None,
        "exported_from": str(checkpoint),
    }
    publish_final(staged, out)
    write_results(out, history, run_config, result)
    report_done(setup, out, result)


def report_done(setup, out, result):
    losses = "" if result["train_loss"] is None else f"mean training loss {result['train_loss']:.4f}"
    if result["last_logged_loss"] is not None:
        losses += f", last logged {result['last_logged_loss']:.4f}"
    if result["eval_loss"] is not None:
        losses += f", eval loss {result['eval_loss']:.4f}"
    if result["train_seconds"] is None:
        say(f"\nDone: {result['global_step']} optimizer steps (exported from {result['exported_from']}); {losses}")
    else:
        say(
            f"\nDone: {result['global_step']} optimizer steps, {result['trained_tokens']:,} tokens processed "
            f"(non-padding) in {result['train_seconds']:.1f} s = {result['tokens_per_second']:,.0f} tokens/s; "
            f"{losses}"
        )
    weights = "model.safetensors" if setup.finetuning == "full" else "adapter_model.safetensors"
    say(f"{'Model' if setup.finetuning == 'full' else 'Adapter'}: {out / weights}")
    say(f"Run configuration: {out / RUN_CONFIG}; curves: {out / CURVES}; log: {out / LOG_HISTORY}")


if __name__ == "__main__":
    cli.run(train)
