"""finetune.py's configuration: every flag checked at once, then the run those flags describe.

check_flags(flags) looks at the values only (no file, no network, no torch) and returns every
problem, so the user fixes them in one go. resolve(flags) then does the I/O (the resume point,
output_dir, the data rows, the model config, the memory plan, a write probe) and returns a
frozen TrainRun that every stage reads.
"""

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from platy import checks, cli, outputs
from platy.base_weights import resolve_base_model
from platy.cli import UserError, say
from platy.files import RUN_CONFIG
from platy.modeling import PRECISIONS, QUANTIZATIONS, bitsandbytes_missing, parse_target_modules
from platy.prompts import Prompter, chat_template_problem
from platy.quantized import LOFTQ_OFFSET
from platy.record import RunRecord
from platy.train import checkpoints, plan
from platy.train.checkpoints import Resume
from platy.train.flags import STAGES, TRAIN_FLAGS
from platy.train.speed import checkpoint_fraction, cpu_precision, liger_unavailable

REPORT_TO = ("auto", "none", "wandb", "tensorboard")
WANDB_FLAGS = ("wandb_project", "wandb_run_name", "wandb_watch", "wandb_log_model")
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
FINETUNING = ("lora", "full")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
# --optim: the Trainer's names; the bitsandbytes ones need that package
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "paged_adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit")
BNB_OPTIMIZERS = ("paged_adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit")
# --init_lora_weights: peft's initialisations; pissa_niter_N is pissa with N subspace iterations (fast SVD)
INIT_LORA_WEIGHTS = ("default", "gaussian", "pissa", "olora", "loftq")
PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
POSITIVE_INTS = ("batch_size", "micro_batch_size", "cutoff_len", "lora_r", "save_steps", "ddp_timeout")


@dataclass(frozen=True)
class TrainRun:
    """One training run: finetune.py's flags (declared in platy/train/flags.py), resolved (output_dir
    absolute, precision decided, lora_target_modules and report_to as lists) and read as attributes
    (run.lora_r), and what was derived or read from them."""

    values: dict  # every flag by name, resolved
    # derived without I/O
    world_size: int = 1
    gradient_accumulation_steps: int = 1
    pack_budget: int = 0  # tokens of one row at most: a packed row's budget, or cutoff_len
    checkpoint_fraction: float = 1.0  # None until --gradient_checkpointing auto is decided (plan.with_model_plan)
    # read or probed
    prompter: Any = None
    resume: Resume = None
    rows: list = None
    data_fingerprint: str = None
    train_rows: list = None
    val_rows: list = None
    device: str = None
    precision_reason: str = None  # why this precision: the flag, or what --precision auto found
    checkpointing_reason: str = None  # why this checkpoint_fraction: the flag, or what auto found
    deepspeed_stage: int = None
    strategy: str = None
    base_model_path: str = None
    model_config: Any = None
    shape_source: str = None
    lora_targets: list = None  # the Linear layers adapted: lora_target_modules with all-linear resolved
    plan: dict = None
    already_finished: str = None  # --resume_from_checkpoint auto on the finished run of these flags: why

    def __getattr__(self, name):
        values = self.__dict__.get("values") or {}
        if name in values:
            return values[name]
        raise AttributeError(f"TrainRun has no {name!r}")

    def flags(self):
        """The flags by name, with their resolved values, in declared order."""
        return dict(self.values)

    def replace(self, **changes):
        """A copy with these flags or derived values changed."""
        flags = {name: value for name, value in changes.items() if name in self.values}
        rest = {name: value for name, value in changes.items() if name not in self.values}
        return dataclasses.replace(self, values={**self.values, **flags}, **rest)


def check_flags(flags):
    """Every problem with the flags' values, as sentences naming the flag ([] when all are good); no I/O."""
    return [
        *value_problems(flags),
        *combination_problems(flags),
        *speed_problems(flags),
        *lora_problems(flags),
        *word_problems(flags),
        *batch_problems(flags),
        *preference_problems(flags),
    ]


def value_problems(f):
    """Each flag on its own: required, a number in range, one of its words."""
    problems = []
    if not f["base_model"]:
        problems.append("--base_model is required (a hub id, a local folder, or builtin:tiny-llama)")
    if not f["data_path"]:
        problems.append("--data_path is required (a JSON, JSONL, CSV or Parquet file, or a data set id)")
    problems += checks.problems_of(
        *(checks.positive_int(name, f[name]) for name in POSITIVE_INTS),
        checks.non_negative_int("warmup_steps", f["warmup_steps"]),
        checks.non_negative_int("save_total_limit", f["save_total_limit"]),
        checks.positive_int("eval_steps", f["eval_steps"], optional=True),
        checks.positive_int("logging_steps", f["logging_steps"], optional=True),
        checks.non_negative_number("weight_decay", f["weight_decay"]),
        checks.non_negative_number("lora_alpha", f["lora_alpha"]),
        checks.positive_number("gpu_memory_gb", f["gpu_memory_gb"], optional=True),
        checks.choice("lr_scheduler", f["lr_scheduler"], LR_SCHEDULERS),
        checks.choice("finetuning", f["finetuning"], FINETUNING),
        checks.choice("attn_implementation", f["attn_implementation"], ATTENTION),
        checks.choice("quantization", f["quantization"], QUANTIZATIONS),
        checks.choice("precision", f["precision"], PRECISIONS),
        chat_template_problem(f["chat_template"]),
    )
    if not checks.is_int(f["max_steps"]) or f["max_steps"] == 0 or f["max_steps"] < -1:
        problems.append(f"--max_steps must be a positive integer or -1 (run num_epochs), got {f['max_steps']!r}")
    problems += checks.problems_of(
        checks.positive_number("num_epochs", f["num_epochs"]),
        checks.positive_number("learning_rate", f["learning_rate"]),
    )
    if not checks.is_number(f["lora_dropout"]) or not 0 <= f["lora_dropout"] < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {f['lora_dropout']!r}")
    if not checks.is_number(f["val_set_size"]) or f["val_set_size"] < 0:
        problems.append(f"--val_set_size must be a row count or a fraction, got {f['val_set_size']!r}")
    return problems


def combination_problems(f):
    """Flags that do not go together."""
    problems = []
    if f["eval_steps"] is not None and not f["val_set_size"]:
        problems.append("--eval_steps needs held-out rows: set --val_set_size too")
    if f["finetuning"] == "full" and f["quantization"] != "none":
        problems.append(
            f"--finetuning full trains every weight, which a {f['quantization']} base cannot hold; "
            "add --quantization none"
        )
    if f["double_quant"] and f["quantization"] == "none":
        problems.append("--double_quant needs --quantization 4bit")
    elif f["double_quant"] and f["quantization"] == "8bit":
        problems.append("--double_quant applies to 4-bit only; drop it or use --quantization 4bit")
    if f["trust_checkpoint"] and not f["resume_from_checkpoint"]:
        problems.append("--trust_checkpoint vouches for the checkpoint --resume_from_checkpoint names: give that too")
    return problems


def speed_problems(f):
    """Problems with the speed flags (packing, token budgets)."""
    problems = []  # --packing is a bool flag: cli.run has checked its word
    tokens = f["micro_batch_tokens"]
    if tokens is not None:
        if problem := checks.positive_int("micro_batch_tokens", tokens):
            problems.append(problem)
        elif not f["packing"]:
            problems.append("--micro_batch_tokens fills each micro-step with packed examples: add --packing true")
        elif checks.is_int(f["cutoff_len"]) and tokens < f["cutoff_len"]:
            problems.append(
                f"--micro_batch_tokens {tokens} is below --cutoff_len {f['cutoff_len']}, "
                "so the longest examples would not fit; raise it or lower --cutoff_len"
            )
        if f["micro_batch_size"] != 1:
            problems.append(
                f"--micro_batch_tokens replaces --micro_batch_size (got {f['micro_batch_size']!r}); "
                "drop --micro_batch_size"
            )
    if f["packing"] and f["group_by_length"]:
        problems.append(
            "--group_by_length has nothing to do with --packing (packed rows hold no padding); drop one of them"
        )
    return problems


def init_problem(value):
    if value in INIT_LORA_WEIGHTS or (isinstance(value, str) and PISSA_NITER.fullmatch(value)):
        return None
    return f"--init_lora_weights {value}: choose one of {', '.join(INIT_LORA_WEIGHTS)} or pissa_niter_N (N >= 1)"


def changes_base(init):
    """PiSSA and OLoRA move part of each adapted base weight into the adapter at initialisation."""
    return isinstance(init, str) and (init == "olora" or init.startswith("pissa"))


def lora_problems(f):
    """The LoRA variants and training knobs: their values, and the combinations that cannot work."""
    problems = checks.problems_of(
        checks.choice("optim", f["optim"], OPTIMIZERS),
        init_problem(f["init_lora_weights"]),
        checks.positive_int("loftq_iter", f["loftq_iter"]),
        checks.positive_number("loraplus_lr_ratio", f["loraplus_lr_ratio"], optional=True),
        checks.positive_number("neftune_noise_alpha", f["neftune_noise_alpha"], optional=True),
    )
    init, quantization = f["init_lora_weights"], f["quantization"]
    if f["finetuning"] == "full":
        lora_only = TRAIN_FLAGS.where(lora_only=True)
        changed = [name for name in lora_only if f[name] != TRAIN_FLAGS.by_name[name].default]
        if changed:
            problems.append(f"--{changed[0]} is a LoRA setting, and --finetuning full trains no adapter; drop it")
        return problems
    if init == "loftq" and quantization != "4bit":
        problems.append(
            f"--init_lora_weights loftq offsets the 4-bit quantization error, and --quantization {quantization} "
            "has none to offset; add --quantization 4bit or choose another --init_lora_weights"
        )
    if f["loftq_iter"] != 1 and init != "loftq":
        problems.append(
            f"--loftq_iter {f['loftq_iter']} sets LoftQ's iterations, and --init_lora_weights is {init}; "
            "add --init_lora_weights loftq or drop --loftq_iter"
        )
    if changes_base(init) and quantization != "none":
        problems.append(
            f"--init_lora_weights {init} rewrites the base weights, which a {quantization} base cannot give back "
            "for the merge (they would be quantized again); add --quantization none or choose default, gaussian or "
            "loftq"
        )
    if f["use_dora"] and (init == "loftq" or changes_base(init)):
        problems.append(
            f"--use_dora computes its magnitudes from the base weights, which --init_lora_weights {init} changes "
            "after they were taken; drop one of them"
        )
    if f["neftune_noise_alpha"] is not None and f["packing"]:
        problems.append(
            "--neftune_noise_alpha scales its noise by the length of each row, and a packed row holds several "
            "examples (each would get weaker noise than NEFTune's); drop --packing or --neftune_noise_alpha"
        )
    if f["optim"] in BNB_OPTIMIZERS and f["deepspeed"]:
        problems.append(
            f"--optim {f['optim']} is a bitsandbytes optimizer, and --deepspeed builds its own from the config; "
            "drop --optim or set the optimizer in the DeepSpeed config"
        )
    if f["loraplus_lr_ratio"] is not None and f["deepspeed"]:
        problems.append(
            "--loraplus_lr_ratio builds its own optimizer groups, which --deepspeed replaces with the config's; "
            "drop one of them"
        )
    return problems


def word_problems(f):
    """Flags read from words or lists: gradient_checkpointing, lora_target_modules, report_to."""
    return checks.problems_of(
        cli.problem_of(checkpoint_fraction, f["gradient_checkpointing"]),
        cli.problem_of(parse_target_modules, f["lora_target_modules"]),
        cli.problem_of(report_to, f),
    )


def report_to(f):
    """--report_to as a list of reporters (auto: wandb when a wandb flag asks for it)."""
    wanted = [r.strip() for r in str(f["report_to"]).split(",") if r.strip()]
    unknown = [r for r in wanted if r not in REPORT_TO]
    if unknown or not wanted:
        raise UserError(f"--report_to {f['report_to']}: choose from {', '.join(REPORT_TO)}")
    if wanted == ["auto"]:
        wanted = ["wandb"] if f["wandb_project"] else ["none"]
    wandb_flags = [n for n in WANDB_FLAGS if f[n]]
    if wandb_flags and "wandb" not in wanted:
        raise UserError(
            f"--{wandb_flags[0]} is set but --report_to {f['report_to']} does not include wandb; "
            "add wandb to --report_to or drop the wandb flags"
        )
    if "none" in wanted and len(wanted) > 1:
        raise UserError(f"--report_to {f['report_to']}: 'none' cannot be combined with other reporters")
    return wanted


def batch_problems(f):
    """batch_size is global: it must split evenly over micro batches and processes."""
    batch, micro = f["batch_size"], f["micro_batch_size"]
    if checks.positive_int("batch_size", batch) or checks.positive_int("micro_batch_size", micro):
        return []  # reported on their own
    world = cli.world_size()
    per_step = micro * world
    if batch % per_step == 0:
        return []
    return [
        f"--batch_size {batch} is not a multiple of --micro_batch_size {micro} x {world} process(es) = "
        f"{per_step}; choose a batch_size such as {per_step * max(1, round(batch / per_step))}"
    ]


def preference_problems(f):
    """--stage and its knobs, and what a preference stage cannot combine with."""
    stage = f["stage"]
    problems = checks.problems_of(
        checks.choice("stage", stage, STAGES),
        checks.positive_number("beta", f["beta"]),
        checks.non_negative_number("simpo_gamma", f["simpo_gamma"]),
    )
    defaults = TRAIN_FLAGS.by_name
    if stage == "sft" or stage not in STAGES:
        knobs = [name for name in ("beta", "simpo_gamma", "init_adapter") if f[name] != defaults[name].default]
        if knobs and stage == "sft":
            problems.append(f"--{knobs[0]} applies to preference tuning; add --stage dpo (or ipo, simpo, orpo)")
        return problems
    if stage != "simpo" and f["simpo_gamma"] != defaults["simpo_gamma"].default:
        problems.append(f"--simpo_gamma is SimPO's margin, and --stage is {stage}; drop it or use --stage simpo")
    if f["finetuning"] != "lora":
        problems.append(
            f"--stage {stage} trains a LoRA adapter (its reference is the model without it); drop --finetuning"
        )
    for name, why in (
        ("packing", "a pair's two answers are batched side by side"),
        ("train_on_inputs", "the preference losses compare the answers only"),
    ):
        if f[name]:
            problems.append(f"--{name} does not apply to --stage {stage} ({why}); drop it")
    return problems


def resolve(flags):
    """The TrainRun the flags describe (flags that passed check_flags): reads the resume point, output_dir,
    the data rows and the model config, plans the memory and probes that output_dir can be written."""
    run = derive(flags)
    resume = resolve_resume(run)
    if finished := finished_here(run, resume):
        return run.replace(resume=resume, already_finished=finished)
    check_output_dir(run, resume)
    if run.stage != "sft":
        run = preference_start(run, resume)
    run = run.replace(resume=resume, **read_data(run))
    if resume and resume.checkpoint and run.rows is not None:
        note_changed_settings(resume.path, run.flags(), run.data_fingerprint)
    run = run.replace(**environment(run))
    run = plan.with_model_plan(run)
    if not run.dry_run:
        check_writable(run.output_dir)
    return run


def derive(flags):
    """The TrainRun of the flags alone: values derived from them and the template read; --liger is turned off
    (with a note) where it cannot run."""
    values = dict(flags)
    if values["liger"] and values["stage"] != "sft":
        # Liger replaces the model's forward, whose logits_to_keep the preference losses pass as a mask of answer
        # positions; its fused loss is SFT's cross-entropy, which no preference stage uses
        why = f"--stage {values['stage']} computes its own loss from the answer positions' log-probs"
    else:
        why = values["liger"] and liger_unavailable()
    if why:
        say(f"Note: --liger is off: {why}; training with the model's own layers")
        values["liger"] = False
    world = cli.world_size()
    return TrainRun(
        {
            **values,
            "lora_target_modules": parse_target_modules(values["lora_target_modules"]),
            "output_dir": str(Path(values["output_dir"]).expanduser().resolve()),
            "report_to": report_to(values),
        },
        prompter=Prompter(values["prompt_template_name"]),
        world_size=world,
        pack_budget=values["micro_batch_tokens"] or values["cutoff_len"],
        gradient_accumulation_steps=values["batch_size"] // (values["micro_batch_size"] * world),
        checkpoint_fraction=checkpoint_fraction(values["gradient_checkpointing"]),
    )


def resolve_resume(run):
    """--resume_from_checkpoint as a Resume (None: a new run)."""
    resume = checkpoints.resolve_resume(run.resume_from_checkpoint, run.output_dir, run.trust_checkpoint)
    if run.finetuning == "full" and resume and resume.adapter:
        raise UserError(
            f"--resume_from_checkpoint {resume.path} is an adapter folder, which cannot start "
            "--finetuning full; give a checkpoint-N folder of a full run, or drop the flag"
        )
    if run.loftq_iter > 1 and resume and resume.adapter and not (Path(resume.path) / LOFTQ_OFFSET).is_file():
        raise UserError(
            f"--resume_from_checkpoint {resume.path} is an adapter trained without LoftQ's iterations, and "
            f"--loftq_iter {run.loftq_iter} would requantize the base under it; drop --loftq_iter or give a "
            "checkpoint-N folder of this run"
        )
    if changes_base(run.init_lora_weights) and resume and resume.adapter:
        raise UserError(
            f"--resume_from_checkpoint {resume.path} is an adapter folder, and --init_lora_weights "
            f"{run.init_lora_weights} would start from its own decomposition instead; give a checkpoint-N folder "
            "of this run, or use --init_lora_weights default"
        )
    return resume


def finished_here(run, resume):
    """--resume_from_checkpoint auto (a scheduler's requeue) on an output_dir whose finished run had these
    same settings and ended at its latest checkpoint: the one line to print instead of training, else None."""
    if run.resume_from_checkpoint != "auto" or not resume:
        return None
    saved = RunRecord.read(run.output_dir)
    if not saved or not saved.finished:
        return None
    same = ("num_epochs", "max_steps", "data_path", *TRAIN_FLAGS.where(resume=True))
    flags = run.flags()
    if any(saved.flag(name) != flags[name] for name in same):
        return None  # other settings (more epochs, say): train on from the checkpoint
    step = saved.global_step
    if step != checkpoints.checkpoint_step(resume.path):
        return None
    return f"{run.output_dir} already finished: {step} optimizer steps; nothing to do"


def read_data(run):
    """The rows, their fingerprint and the train/val split; a dry run fetches nothing that is not a local file."""
    from platy.data.rows import load_rows, split_rows

    if run.dry_run and not Path(run.data_path).expanduser().is_file():
        return {}
    if run.stage != "sft":
        from platy.data.pairs import load_pairs

        rows, fingerprint = load_pairs(run.data_path)
    else:
        rows, fingerprint = load_rows(run.data_path, run.seed)
    train_rows, val_rows = split_rows(rows, run.val_set_size, run.seed)
    return {"rows": rows, "data_fingerprint": fingerprint, "train_rows": train_rows, "val_rows": val_rows}


def preference_start(run, resume):
    """A preference run's start: dropout off (the policy must compute what its reference computed), and with
    --init_adapter the SFT adapter's own LoRA settings, base and template, checked against the flags."""
    changes = {}
    if run.lora_dropout:
        say(f"Note: --lora_dropout {run.lora_dropout} -> 0 for --stage {run.stage}: the policy starts as its reference")
        changes["lora_dropout"] = 0.0
    if not run.init_adapter:
        return run.replace(**changes)
    if resume and resume.adapter:
        raise UserError(
            f"--resume_from_checkpoint {resume.path} is an adapter folder, and --init_adapter {run.init_adapter} "
            "names the adapter to start from; drop one of them"
        )
    folder = Path(run.init_adapter).expanduser()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(
            f"--init_adapter {run.init_adapter}: no adapter_config.json there; give the output_dir of an SFT run "
            "of finetune.py"
        )
    import json

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(
            f"--init_adapter {config_file}: not valid JSON ({err.msg}); train the SFT adapter again"
        ) from None
    saved = RunRecord.read(folder)
    if saved is None:
        raise UserError(
            f"--init_adapter {run.init_adapter}: no {RUN_CONFIG}; give the output_dir of a finished SFT run"
        )
    mismatched = [
        f"--{name} {run.flags()[name]!r} (the adapter's: {saved.flag(name)!r})"
        for name in ("base_model", "prompt_template_name", "chat_template", "quantization")
        if saved.flag(name) is not None and saved.flag(name) != run.flags()[name]
    ]
    if mismatched:
        raise UserError(
            f"--init_adapter {run.init_adapter} was trained with other settings: {'; '.join(mismatched)}. The "
            "reference must be the SFT model as it was trained; use its settings"
        )
    targets = config["target_modules"]
    adapter = {
        "lora_r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")),
        "lora_target_modules": sorted(targets) if isinstance(targets, list) else [targets],
    }
    given = {**run.flags(), "lora_target_modules": sorted(run.lora_target_modules)}
    overridden = [f"{name} {given[name]!r} -> {value!r}" for name, value in adapter.items() if given[name] != value]
    if overridden:
        say(f"Note: --init_adapter {run.init_adapter}: its own LoRA settings are used: {'; '.join(overridden)}")
    return run.replace(**changes, **adapter, init_adapter=str(folder.resolve()))


def environment(run):
    """What this machine and launcher decide: precision, device, installed packages, the parallel strategy."""
    import torch

    from platy.modeling import resolve_precision

    precision = resolve_precision(run.precision)
    check_packages(run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    why = f"--precision {run.precision}"
    if run.precision == "auto":
        precision, why = auto_precision(precision, device)
    stage = check_deepspeed(run.deepspeed, run.quantization, run.dry_run) if run.deepspeed else None
    check_attention(run.attn_implementation, device, run.dry_run)
    return {
        "precision": precision,
        "precision_reason": why,
        "device": device,
        "deepspeed_stage": stage,
        "strategy": plan.parallel_strategy(stage, run.world_size),
    }


def auto_precision(gpu_choice, device):
    """--precision auto: (precision, why). On a GPU resolve_precision's choice; on a CPU bf16 only where it
    computes bf16 natively, measured (several times fp32 there; slower than fp32 where it is emulated)."""
    if device == "cpu":
        return cpu_precision()
    return gpu_choice, f"auto: {'bf16, which this GPU supports' if gpu_choice == 'bf16' else 'this GPU has no bf16'}"


def check_packages(run):
    """The packages that --quantization and --report_to need are installed."""
    if bitsandbytes_missing(run.quantization):
        raise UserError(
            f"--quantization {run.quantization} needs bitsandbytes: pip install bitsandbytes, "
            "or use --quantization none"
        )
    if run.optim in BNB_OPTIMIZERS and bitsandbytes_missing("8bit"):
        raise UserError(f"--optim {run.optim} needs bitsandbytes: pip install bitsandbytes, or use --optim adamw_torch")
    for reporter in ("wandb", "tensorboard"):
        if reporter in run.report_to:
            try:
                __import__(reporter)
            except ImportError:
                raise UserError(
                    f"--report_to {reporter}: the {reporter} package is not installed; "
                    f"pip install {reporter}, or use --report_to none"
                ) from None


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


def check_attention(attn_implementation, device, dry_run):
    if attn_implementation != "flash_attention_2":
        return
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            "--attn_implementation flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn --no-build-isolation); or use sdpa"
        )
    if device != "cuda" and not dry_run:
        raise UserError("--attn_implementation flash_attention_2 runs on CUDA GPUs only; use sdpa here")


def check_output_dir(run, resume):
    """output_dir may take this run (platy/outputs.py): not a folder the run reads (the base, an adapter it
    resumes from) nor one above them; new, empty, or a run of its own that is continued or (--overwrite)
    replaced."""
    out = Path(run.output_dir)
    continuing = bool(resume and resume.checkpoint and Path(resume.path).resolve().parent == out.resolve())
    reads = [("the base model folder", resolve_base_model(run.base_model, "--base_model", weights=False))]
    if resume and not continuing:
        reads.append(("the adapter folder" if resume.adapter else "the checkpoint folder", resume.path))
    outputs.check_output_dir(out, outputs.RUN, run.overwrite, reads, continuing)


def note_changed_settings(checkpoint, flags, data_fingerprint):
    """Resuming with other data or hyperparameters continues, but not as the interrupted run would have."""
    saved = RunRecord.read(checkpoint)
    if not saved:
        return
    recorded = saved.flags
    changed = [
        f"{name} {recorded[name]!r} -> {flags[name]!r}"
        for name in TRAIN_FLAGS.where(resume=True)
        if name in recorded and recorded[name] != flags[name]
    ]
    if saved.data_fingerprint not in (None, data_fingerprint):
        changed.append("the data rows (another fingerprint)")
    if changed:
        say(
            f"Note: resuming from {Path(checkpoint).name} with settings that differ from its run: "
            f"{'; '.join(changed)}. The run continues, but not as the interrupted one would have"
        )


def check_writable(output_dir):
    """A folder that cannot take a checkpoint must fail now, not after hours of training. Rank 0 alone probes
    (racing ranks removed each other's new folders under the probe): when it refuses, it exits before any
    collective and torchrun stops the other processes with it."""
    if not cli.is_main_process():
        return
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
