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
from platy.data import ExampleTokenizer, load_rows, prepare_tokenizer, split_rows, tokenize_rows
from platy.merging import ADAPTER_FILES
from platy.modeling import (
    check_target_modules,
    linear_module_names,
    load_config,
    load_model,
    load_tokenizer,
    parse_target_modules,
    quantization_config,
    quantization_layout,
    resolve_base_model,
    resolve_precision,
)
from platy.prompts import Prompter
from platy.reporting import (
    CURVES,
    LOG_HISTORY,
    RUN_CONFIG,
    library_versions,
    loss_progress_callback,
    plot_curves,
    say_configuration,
    write_json,
)

REPORT_TO = ("auto", "none", "wandb", "tensorboard")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
OWN_OUTPUTS = (*ADAPTER_FILES, "adapter_config.json", RUN_CONFIG)


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
    quantization: str = "4bit",
    double_quant: bool = False,
    precision: str = "auto",
    max_steps: int = -1,
    seed: int = 42,
    logging_steps: int = 10,
    eval_steps: int = None,
    save_steps: int = 200,
    save_total_limit: int = 3,
    gradient_checkpointing: bool = True,
    report_to: str = "auto",
    trust_remote_code: bool = False,
    deepspeed: str = None,
    overwrite: bool = False,
):
    """Train a LoRA adapter; output_dir then holds everything merge.py and inference.py need.

    Args:
        base_model: Hub id or local folder of a causal LM (Llama, Mistral, Yi, Qwen, ...);
            builtin:tiny-llama is the embedded tiny model for CPU try-outs.
        data_path: JSON, JSONL, CSV or Parquet file of rows with instruction, input
            (optional) and output, or a data set id (needs network).
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
        resume_from_checkpoint: A checkpoint folder (continues step, schedule and optimizer),
            'auto' (the latest checkpoint in output_dir), or an adapter folder (loads its
            weights; optimizer and schedule restart).
        wandb_project: Weights & Biases project; setting it turns wandb reporting on.
        wandb_run_name: Weights & Biases run name.
        wandb_watch: 'gradients', 'all' or 'false': what wandb watches.
        wandb_log_model: 'true' or 'checkpoint' to upload the model to wandb.
        quantization: 4bit (NF4, QLoRA), 8bit, or none (LoRA on 16/32-bit weights).
        double_quant: Quantize the 4-bit quantization constants too (saves ~0.4 bit/weight).
        precision: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), bf16, fp16, fp32.
        max_steps: Stop after this many optimizer steps (-1: run num_epochs).
        seed: Seed for weights of LoRA, data order and the validation split.
        logging_steps: Log loss every this many optimizer steps.
        eval_steps: Evaluate every this many steps (default: save_steps); needs val_set_size.
        save_steps: Write a checkpoint every this many optimizer steps.
        save_total_limit: Checkpoints kept in output_dir (oldest deleted first); 0 keeps all.
        gradient_checkpointing: Recompute activations in backward to save memory.
        report_to: auto (wandb when wandb_project is set, else none), none, wandb,
            tensorboard, or a comma-separated list.
        trust_remote_code: Allow model code from the hub (some Yi/Qwen variants need it).
        deepspeed: Path to a DeepSpeed JSON config, passed to the Trainer.
        overwrite: Allow writing into an output_dir that already holds a run.
    """
    setup = validate(dict(locals()))
    run_config = describe_run(setup)
    tokenizer, prompter = load_tokenizer_and_prompter(setup)
    train_set, val_set, run_config["data"] = build_datasets(setup, tokenizer, prompter)
    model, run_config["resolved"]["quantization_layout"] = load_model_with_lora(setup)
    trainer = build_trainer(setup, model, tokenizer, train_set, val_set)
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
    if problems:
        raise UserError("; ".join(problems))

    # batch_size is global: it must split evenly over micro batches and processes
    world = cli.world_size()
    per_step = f.micro_batch_size * world
    if f.batch_size % per_step:
        raise UserError(
            f"--batch_size {f.batch_size} is not a multiple of --micro_batch_size {f.micro_batch_size} x "
            f"{world} process(es) = {per_step}; choose a batch_size such as {per_step * max(1, round(f.batch_size / per_step))}")
    f["world_size"] = world
    f["gradient_accumulation_steps"] = f.batch_size // per_step
    f["lora_target_modules"] = parse_target_modules(f.lora_target_modules)
    f["prompter"] = Prompter(f.prompt_template_name)
    f["output_dir"] = str(Path(f.output_dir).expanduser().resolve())
    f["resume"] = resolve_resume(f.resume_from_checkpoint, f.output_dir)
    check_output_dir(f.output_dir, f.overwrite, f.resume)
    f["rows"], f["data_fingerprint"] = load_rows(f.data_path)
    f["train_rows"], f["val_rows"] = split_rows(f.rows, f.val_set_size, f.seed)

    import torch

    f["precision"] = resolve_precision(f.precision)
    quantization_config(f.quantization, f.precision, f.double_quant)  # validates the quantization flags
    f["report_to"] = resolve_report_to(f)
    if f.deepspeed is not None:
        check_deepspeed(f.deepspeed, f.quantization)
    f["device"] = "cuda" if torch.cuda.is_available() else "cpu"

    f["base_model_path"] = resolve_base_model(f.base_model)
    f["model_config"] = load_config(f.base_model_path, f.trust_remote_code)
    check_target_modules(f.lora_target_modules, linear_module_names(f.model_config, f.trust_remote_code),
                         f.base_model)
    return f


def resolve_report_to(f):
    wanted = [r.strip() for r in str(f.report_to).split(",") if r.strip()]
    unknown = [r for r in wanted if r not in REPORT_TO]
    if unknown or not wanted:
        raise UserError(f"--report_to {f.report_to}: choose from {', '.join(REPORT_TO)}")
    if wanted == ["auto"]:
        wanted = ["wandb"] if f.wandb_project else ["none"]
    wandb_flags = [n for n in ("wandb_project", "wandb_run_name", "wandb_watch", "wandb_log_model") if f[n]]
    if wandb_flags and "wandb" not in wanted:
        raise UserError(f"--{wandb_flags[0]} is set but --report_to {f.report_to} does not include wandb; "
                        "add wandb to --report_to or drop the wandb flags")
    if "none" in wanted and len(wanted) > 1:
        raise UserError(f"--report_to {f.report_to}: 'none' cannot be combined with other reporters")
    for reporter, module in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if reporter in wanted:
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"--report_to {reporter}: the {module} package is not installed; "
                                f"pip install {module}, or use --report_to none") from None
    return wanted


def check_deepspeed(path, quantization):
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
        raise UserError(f"--deepspeed {path}: ZeRO-3 cannot shard a {quantization} base loaded by this script; "
                        "use ZeRO-2 (the Dolphin-ORCA-Platypus setup) or --quantization none")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("--deepspeed needs the deepspeed package: pip install deepspeed") from None


def latest_checkpoint(output_dir):
    """The highest-numbered checkpoint-N in output_dir that the Trainer finished writing."""
    candidates = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / "trainer_state.json").is_file():
            candidates.append((int(suffix), path))
    return str(max(candidates)[1]) if candidates else None


def checkpoint_step(folder):
    import json

    return json.loads((Path(folder) / "trainer_state.json").read_text()).get("global_step", 0)


def resolve_resume(value, output_dir):
    """None, or ('checkpoint' | 'adapter', path)."""
    if value in (None, "", False):
        return None
    if value == "auto":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise UserError(f"--resume_from_checkpoint auto: no complete checkpoint in {output_dir}; "
                            "drop the flag to start a new run")
        return ("checkpoint", path)
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {value}: folder not found; give a checkpoint-N folder, "
                        "an adapter folder, or 'auto'")
    if (path / "trainer_state.json").is_file():
        missing = [n for n in ("optimizer.pt", "scheduler.pt") if not (path / n).is_file()]
        if missing and not any(path.glob("global_step*")):  # DeepSpeed keeps its states in global_stepN/
            raise UserError(f"--resume_from_checkpoint {value}: the checkpoint is incomplete ({', '.join(missing)} "
                            "missing), so optimizer and schedule would restart silently; use an earlier checkpoint-N, "
                            "or the folder as an adapter-only start by copying its adapter files elsewhere")
        return ("checkpoint", str(path))
    if any((path / name).is_file() for name in ADAPTER_FILES):
        return ("adapter", str(path))
    raise UserError(f"--resume_from_checkpoint {value}: holds neither a Trainer checkpoint (trainer_state.json) "
                    "nor an adapter (adapter_model.safetensors)")


def check_output_dir(output_dir, overwrite, resume):
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file; give a folder")
    resuming_here = resume and resume[0] == "checkpoint" and Path(resume[1]).resolve().parent == path.resolve()
    if resuming_here or overwrite or not path.is_dir():
        return
    if (path / RUN_CONFIG).exists():
        raise UserError(f"--output_dir {output_dir} already holds a finished run; choose another folder or pass "
                        "--overwrite (to train that adapter further: --resume_from_checkpoint "
                        f"{output_dir} with a new --output_dir)")
    ours = [name for name in OWN_OUTPUTS if (path / name).exists()] + [p.name for p in path.glob("checkpoint-*")]
    if ours:
        raise UserError(f"--output_dir {output_dir} holds an unfinished run ({', '.join(sorted(ours)[:3])}); "
                        "continue it with --resume_from_checkpoint auto, choose another folder, or pass --overwrite")


def load_tokenizer_and_prompter(setup):
    tokenizer = prepare_tokenizer(load_tokenizer(setup.base_model_path, setup.trust_remote_code))
    return tokenizer, setup.prompter


def build_datasets(setup, tokenizer, prompter):
    example_tokenizer = ExampleTokenizer(tokenizer, prompter, setup.cutoff_len, setup.train_on_inputs,
                                         setup.add_eos_token)
    train_set, train_stats = tokenize_rows(setup.train_rows, example_tokenizer)
    val_set, val_stats = tokenize_rows(setup.val_rows, example_tokenizer)
    if train_set is None or len(train_set) == 0:
        raise UserError(f"{setup.data_path}: no training example keeps any response token within --cutoff_len "
                        f"{setup.cutoff_len}; raise --cutoff_len or shorten the prompts")
    if val_set is not None and len(val_set) == 0:
        raise UserError(f"--val_set_size {setup.val_set_size}: every held-out example was cut away by "
                        f"--cutoff_len {setup.cutoff_len}; raise --cutoff_len")
    stats = {"path": setup.data_path, "fingerprint": setup.data_fingerprint, "train": train_stats, "val": val_stats}
    dropped = train_stats["dropped_cut_away"] + val_stats["dropped_cut_away"]
    say(f"Data: {len(setup.rows)} rows from {setup.data_path}; {len(train_set)} train, "
        f"{0 if val_set is None else len(val_set)} held out; {train_stats['truncated'] + val_stats['truncated']} "
        f"cut at cutoff_len {setup.cutoff_len}; {dropped} dropped (response cut away entirely); "
        f"{train_stats['label_tokens']:,} response tokens (labels) per epoch")
    steps = optimizer_steps(setup, len(train_set))
    done = checkpoint_step(setup.resume[1]) if setup.resume and setup.resume[0] == "checkpoint" else 0
    if done and done >= steps:
        raise UserError(f"--resume_from_checkpoint {setup.resume[1]}: that checkpoint already finished the run "
                        f"({done} of {steps} steps); nothing to train. Raise --num_epochs "
                        "or --max_steps to go further")
    if setup.warmup_steps >= steps:
        say(f"Note: --warmup_steps {setup.warmup_steps} covers the whole run ({steps} optimizer steps): the learning "
            f"rate never reaches --learning_rate {setup.learning_rate}")
    return train_set, val_set, stats


def optimizer_steps(setup, n_train):
    """Optimizer steps the run will take (as the Trainer counts them)."""
    if setup.max_steps > 0:
        return setup.max_steps
    micro_batches = math.ceil(n_train / (setup.micro_batch_size * setup.world_size))
    return math.ceil(setup.num_epochs * math.ceil(micro_batches / setup.gradient_accumulation_steps))


def load_model_with_lora(setup):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    say(f"Loading {setup.base_model} ({setup.quantization}, {setup.precision}) on {setup.device}")
    model = load_model(setup.base_model_path, setup.quantization, setup.precision, setup.double_quant,
                       setup.trust_remote_code)
    layout = quantization_layout(model, setup.quantization, setup.precision)
    if setup.quantization != "none":
        # upcasts norms/embeddings to fp32 for stable training; checkpointing is the Trainer's job
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(setup.seed)
    lora = LoraConfig(r=setup.lora_r, lora_alpha=setup.lora_alpha, lora_dropout=setup.lora_dropout,
                      target_modules=setup.lora_target_modules, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if setup.resume and setup.resume[0] == "adapter":
        load_adapter_weights(model, setup.resume[1])
    if cli.is_main_process():
        trainable, total = model.get_nb_trainable_parameters()
        say(f"LoRA r={setup.lora_r} alpha={setup.lora_alpha} on {', '.join(setup.lora_target_modules)}: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    return model, layout


def load_adapter_weights(model, folder):
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(folder, device="cpu")
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise UserError(f"--resume_from_checkpoint {folder}: the adapter does not fit this model and LoRA settings "
                        f"({len(missing)} LoRA weights missing, e.g. {missing[0]}); check --base_model and "
                        "--lora_target_modules")
    say(f"Loaded adapter weights from {folder}. The optimizer state and learning-rate schedule restart from step 0 "
        "(an adapter folder holds no optimizer state; resume from a checkpoint-N folder to continue them).")


def build_trainer(setup, model, tokenizer, train_set, val_set):
    import transformers
    from transformers.trainer_callback import ProgressCallback

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
        activation_checkpointing=setup.gradient_checkpointing,
        logging_steps=setup.logging_steps,
        logging_first_step=True,  # the starting loss, and a point on the curves of short runs
        eval_strategy="steps" if has_val else "no",
        eval_steps=(setup.eval_steps or setup.save_steps) if has_val else None,
        eval_on_start=has_val,
        save_strategy="steps",
        save_steps=setup.save_steps,
        save_total_limit=setup.save_total_limit or None,
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
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt",
                                                   padding=True, label_pad_token_id=-100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                                   data_collator=collator, processing_class=tokenizer)
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
        },
        "data": {},
        "versions": library_versions(),
    }
    say_configuration("Run configuration", {**flags, **{k: v for k, v in config["resolved"].items()
                                                        if k != "template"}})
    return config


def run_training(setup, trainer, run_config):
    from transformers.trainer_callback import TrainerCallback

    class SaveRunConfig(TrainerCallback):
        """Each checkpoint carries the run configuration, so merge.py can use it directly."""

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_json(folder / RUN_CONFIG, run_config)

    trainer.add_callback(SaveRunConfig())
    if setup.overwrite and not setup.resume and cli.is_main_process():
        # the old run's marker and checkpoints go first: a crash must not leave the folder looking finished
        (Path(setup.output_dir) / RUN_CONFIG).unlink(missing_ok=True)
        for old in Path(setup.output_dir).glob("checkpoint-*"):
            say(f"--overwrite: removing {old}")
            shutil.rmtree(old)
    resume = setup.resume[1] if setup.resume and setup.resume[0] == "checkpoint" else None
    if resume:
        say(f"Resuming from {resume} (global step, optimizer, schedule and data order continue)")
    started = time.time()
    output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - started
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


def save(setup, trainer, run_config, result):
    """Adapter (safetensors) and tokenizer via the Trainer; then config, history, curves (rank 0)."""
    trainer.save_model(setup.output_dir)
    if not trainer.is_world_process_zero():
        return
    out = Path(setup.output_dir)
    write_json(out / LOG_HISTORY, trainer.state.log_history)
    plot_curves(trainer.state.log_history, out / CURVES)
    run_config["result"] = result
    write_json(out / RUN_CONFIG, run_config)  # written last: its presence marks a finished run
    losses = f"mean training loss {result['train_loss']:.4f}"
    if result["last_logged_loss"] is not None:
        losses += f", last logged {result['last_logged_loss']:.4f}"
    if result["eval_loss"] is not None:
        losses += f", eval loss {result['eval_loss']:.4f}"
    say(f"\nDone: {result['global_step']} optimizer steps, {result['trained_tokens']:,} tokens processed "
        f"(non-padding) in {result['train_seconds']:.1f} s = {result['tokens_per_second']:,.0f} tokens/s; {losses}")
    say(f"Adapter: {out / 'adapter_model.safetensors'}")
    say(f"Run configuration: {out / RUN_CONFIG}; curves: {out / CURVES}; log: {out / LOG_HISTORY}")


if __name__ == "__main__":
    cli.run(train)
