"""finetune.py's stages, in the order they run; each reads the frozen TrainRun (platy/train/config.py).

describe_run -> load_tokenizer_and_prompter -> build_datasets -> finished_checkpoint ->
load_model_with_lora -> build_trainer (training_arguments) -> run_training -> save.
prepare(flags) runs them up to a ready Trainer, for tests and benchmarks.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from platy import cli
from platy.cli import UserError, say
from platy.files import CURVES, LOG_HISTORY, RUN_CONFIG, write_json, write_text
from platy.integrity import MANIFEST, config_hash, write_manifest
from platy.quantized import LOFTQ_OFFSET, read_loftq_offsets, rebuild_loftq_base, set_4bit_weight, write_loftq_offsets
from platy.train.checkpoints import PREEMPTED, STAGING, checkpoint_step, remove_leftovers, retire
from platy.train.config import changes_base, check_flags, resolve
from platy.train.plan import base_weights, describe_plan, lora_share, lora_words, optimizer_steps

# what a checkpoint holds besides the weights: not part of an exported adapter
TRAINER_STATE = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "trainer_state.json",
    "training_args.bin",
    RUN_CONFIG,
    MANIFEST,
)


@dataclass(frozen=True)
class Prepared:
    """Everything the entry has built when training is about to start."""

    run: Any
    run_config: dict
    tokenizer: Any
    train_set: Any
    val_set: Any
    model: Any
    trainer: Any


def prepare(flags):
    """The entry's stages from its flags (every flag, by name) up to a ready Trainer."""
    cli.fail_on(check_flags(flags))
    run = resolve(flags)
    run_config = describe_run(run)
    tokenizer, prompter = load_tokenizer_and_prompter(run)
    train_set, val_set, run_config["data"] = build_datasets(run, tokenizer, prompter)
    finished_checkpoint(run, train_set)
    model, run_config["resolved"]["quantization_layout"] = load_model_with_lora(run, tokenizer)
    trainer = build_trainer(run, model, tokenizer, train_set, val_set, run_config)
    return Prepared(run, run_config, tokenizer, train_set, val_set, model, trainer)


def describe_run(run):
    """The run configuration: printed once at start, saved next to the adapter and in checkpoints."""
    from platy.reporting import library_versions, say_configuration

    flags = run.flags()
    prompter = run.prompter
    config = {
        "flags": flags,
        "resolved": {
            "base_model_path": run.base_model_path,
            "model_type": run.model_config.model_type,
            "template": {"name": prompter.name, "path": str(prompter.path), **prompter.template},
            "precision": run.precision,
            "device": run.device,
            "world_size": run.world_size,
            "gradient_accumulation_steps": run.gradient_accumulation_steps,
            **lora_resolved(run),
            "resume": run.resume and run.resume.recorded(),
            "plan": run.plan,
        },
        "data": {},
        "versions": library_versions(),
        "command": launch_command(),
    }
    shown = {**flags, **{k: v for k, v in config["resolved"].items() if k not in ("template", "plan")}}
    say_configuration(
        "Run configuration (unset flags left out; all of it goes to run_config.json)",
        {k: v for k, v in shown.items() if v not in (None, "")},
    )
    say(describe_plan(run))
    return config


def lora_resolved(run):
    """The adapter the run trains, as the merge reads it: the layers adapted (all-linear resolved) and the scale."""
    if run.finetuning != "lora":
        return {}
    root = run.lora_r**0.5 if run.use_rslora else run.lora_r
    return {"lora_target_modules": run.lora_targets, "lora_scale": run.lora_alpha / root}


def launch_command():
    """The command line of this run as typed (finetune.py and its flags), for the adapter card; None when
    finetune.py is not the program (a test or benchmark calling the stages)."""
    import shlex
    import sys

    if os.path.basename(sys.argv[0]) != "finetune.py":
        return None
    return shlex.join(["python", "finetune.py", *sys.argv[1:]])


def load_tokenizer_and_prompter(run):
    from platy.data.examples import prepare_tokenizer
    from platy.modeling import load_tokenizer

    tokenizer = prepare_tokenizer(load_tokenizer(run.base_model_path, run.trust_remote_code, flag="--base_model"))
    chat = bind_chat_template(run, tokenizer)
    if chat is not None:
        say(
            f"Chat template {chat.name}: assistant turns end with {', '.join(chat.end_of_turn) or 'no special token'}"
            + (f"; added to the vocabulary: {', '.join(chat.added)}" if chat.added else "")
        )
    return tokenizer, run.prompter


def bind_chat_template(run, tokenizer):
    """The run's ChatTemplate bound to the tokenizer (its missing control tokens added), or None."""
    from platy.prompts import ChatTemplate

    chat = ChatTemplate.resolve(run.chat_template, tokenizer)
    if chat is not None:
        chat.added = chat.bind(tokenizer)
    return chat


def build_datasets(run, tokenizer, prompter):
    """Tokenized (and, with --packing, packed) train and val sets, and what was done to them."""
    from platy.data.cache import tokenized_splits
    from platy.data.examples import ExampleTokenizer

    example_tokenizer = ExampleTokenizer(
        tokenizer,
        prompter,
        run.cutoff_len,
        run.train_on_inputs,
        run.add_eos_token,
        chat_template=bind_chat_template(run, tokenizer),
    )
    splits, (where, folder) = tokenized_splits(
        {"train": run.train_rows, "val": run.val_rows},
        example_tokenizer,
        run.data_fingerprint,
        {"seed": run.seed, "val_set_size": run.val_set_size},
        use_cache=run.cache_tokens,
    )
    (train_set, train_stats), (val_set, val_stats) = splits["train"], splits["val"]
    if folder is not None:
        say(f"Tokenized data: {'loaded from the cache' if where == 'cache' else 'tokenized and cached'} in {folder}")
    elif not run.cache_tokens:
        say("Tokenized data: tokenized in memory, not cached (--cache_tokens false)")
    check_examples_left(run, train_set, val_set)
    stats = {"path": run.data_path, "fingerprint": run.data_fingerprint, "train": train_stats, "val": val_stats}
    dropped = train_stats["dropped_cut_away"] + val_stats["dropped_cut_away"]
    say(
        f"Data: {len(run.rows)} rows from {run.data_path}; {len(train_set)} train, "
        f"{0 if val_set is None else len(val_set)} held out; {train_stats['truncated'] + val_stats['truncated']} "
        f"cut at cutoff_len {run.cutoff_len}; {dropped} dropped (response cut away entirely); "
        f"{train_stats['label_tokens']:,} response tokens (labels) per epoch"
    )
    if run.packing:
        train_set, val_set = pack(run, train_set, val_set, stats)
    return train_set, val_set, stats


def check_examples_left(run, train_set, val_set):
    if train_set is None or len(train_set) == 0:
        raise UserError(
            f"{run.data_path}: no training example keeps any response token within --cutoff_len "
            f"{run.cutoff_len}; raise --cutoff_len or shorten the prompts"
        )
    if val_set is not None and len(val_set) == 0:
        raise UserError(
            f"--val_set_size {run.val_set_size}: every held-out example was cut away by "
            f"--cutoff_len {run.cutoff_len}; raise --cutoff_len"
        )


def pack(run, train_set, val_set, stats):
    """Packed train and val sets; their packing figures go into stats."""
    from platy.data.packing import pack_dataset

    train_set, stats["train_packing"] = pack_dataset(train_set, run.pack_budget)
    val_set, stats["val_packing"] = pack_dataset(val_set, run.pack_budget)
    packing = stats["train_packing"]
    say(
        f"Packing: {packing['examples']} training examples in {packing['packed_rows']} rows of up to "
        f"{run.pack_budget} tokens ({100 * packing['fill']:.1f}% filled); batch_size {run.batch_size} "
        "and micro_batch_size count these rows"
    )
    return train_set, val_set


def finished_checkpoint(run, train_set):
    """Whether the resumed checkpoint already holds every optimizer step of this run with only its final
    save cut short (it is then exported instead of trained). A checkpoint that finished the run in another
    way is refused, and a warmup that covers the whole run is noted."""
    steps = optimizer_steps(run, len(train_set))
    done = checkpoint_step(run.resume.path) if run.resume and run.resume.checkpoint else 0
    finished = bool(
        done
        and done >= steps
        and Path(run.resume.path).parent == Path(run.output_dir)
        and not (Path(run.output_dir) / RUN_CONFIG).exists()
    )
    if done and done >= steps and not finished:
        raise UserError(
            f"--resume_from_checkpoint {run.resume.path}: that checkpoint already finished the run "
            f"({done} of {steps} steps); nothing to train. Raise --num_epochs "
            "or --max_steps to go further"
        )
    if run.warmup_steps >= steps:
        say(
            f"Note: --warmup_steps {run.warmup_steps} covers the whole run ({steps} optimizer steps): the learning "
            f"rate never reaches --learning_rate {run.learning_rate}"
        )
    return finished


def load_model_with_lora(run, tokenizer=None):
    """The base with LoRA adapters (or, for --finetuning full, every weight trainable), and the
    quantization layout to record (None for full fine-tuning). Where the tokenizer has grown (a chat
    template's control tokens added), the embeddings grow to fit and their new rows are trained."""
    from platy.modeling import quantization_layout
    from platy.train.speed import checkpoint_layers

    full = run.finetuning == "full"
    say(
        f"Loading {run.base_model} ({base_weights(run)}, {run.precision} compute) on {run.device}"
        + (", fp32 master weights for full fine-tuning" if full else "")
    )
    model = load_base(run)
    new_tokens = grow_vocabulary(model, tokenizer)
    checkpointed, layers = checkpoint_layers(model, run.checkpoint_fraction)
    if checkpointed and cli.is_main_process():
        say(f"Activation checkpointing on {checkpointed} of {layers} decoder layers")
    if full:
        if cli.is_main_process():
            say(f"Full fine-tuning: all {sum(p.numel() for p in model.parameters()):,} parameters trainable")
        return model, None
    layout = quantization_layout(model, run.quantization, run.precision)
    return add_lora(run, model, layout, new_tokens), layout


def grow_vocabulary(model, tokenizer):
    """The ids the tokenizer has beyond the model's embedding rows, after growing the embeddings (and an
    untied lm_head) to fit; their new rows start at the mean of the old ones (transformers' default)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is None or len(tokenizer) <= rows:
        return []
    model.resize_token_embeddings(len(tokenizer))
    return list(range(rows, len(tokenizer)))


def trainable_tokens(model, new_tokens):
    """peft's trainable_token_indices for the new ids: the input embeddings' rows, and the lm_head's
    where it is not tied to them (only the new rows train; the old ones stay as they were)."""
    if not new_tokens:
        return None
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    indices = {names[model.get_input_embeddings()]: new_tokens}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        indices[names[output]] = new_tokens
    return indices


def load_base(run):
    from platy.modeling import SHARDED, load_model

    fsdp = run.strategy == "fsdp"
    return load_model(
        run.base_model_path,
        run.quantization,
        run.precision,
        run.double_quant,
        run.trust_remote_code,
        # FSDP and ZeRO-3 place (and shard) the weights themselves
        placement=SHARDED if run.strategy in ("fsdp", "zero3") else None,
        load_precision="fp32" if run.finetuning == "full" else None,
        # FSDP shards float tensors only: pack the 4-bit codes in the compute dtype
        quant_storage=run.precision if fsdp and run.quantization == "4bit" else None,
        attn_implementation=None if run.attn_implementation == "auto" else run.attn_implementation,
        flag="--base_model",
    )


def add_lora(run, model, layout, new_tokens=()):
    """model wrapped with LoRA adapters (seeded, as --init_lora_weights says), loaded from
    --resume_from_checkpoint's adapter folder if given."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    label = f"--resume_from_checkpoint {run.resume.path}" if run.resume else None
    saved = read_loftq_offsets(run.resume.path, label) if run.resume else {}
    if saved:  # the resumed adapter trained on LoftQ's requantized base: rebuild exactly that one
        rebuild_loftq_base(model, run.base_model_path, saved, layout, "--base_model", label)
    if run.quantization != "none" and run.strategy != "fsdp":
        # upcasts norms/embeddings to fp32 for stable training; checkpointing is the Trainer's job.
        # Not under FSDP: a wrapped layer's tensors must share one dtype.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(run.seed)
    lora = LoraConfig(
        r=run.lora_r,
        lora_alpha=run.lora_alpha,
        lora_dropout=run.lora_dropout,
        target_modules=run.lora_targets,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=run.use_rslora,
        use_dora=run.use_dora,
        init_lora_weights=PEFT_INIT.get(run.init_lora_weights, run.init_lora_weights),
        trainable_token_indices=trainable_tokens(model, new_tokens),
    )
    model = get_peft_model(model, lora)
    if new_tokens and cli.is_main_process():
        say(
            f"New tokens {new_tokens[0]}-{new_tokens[-1]}: their embedding and lm_head rows are trained "
            "(peft trainable_token_indices)"
        )
    if run.init_lora_weights == "loftq":
        loftq_initialise(model, run.base_model_path, layout, run.loftq_iter, rebuilt=bool(saved))
    if saved:
        model.loftq_offsets = saved  # saved again with every checkpoint and the final adapter
    if changes_base(run.init_lora_weights) and cli.is_main_process():
        model.initial_adapter = save_initial_adapter(model)
    if run.resume and run.resume.adapter:
        load_adapter_weights(model, run.resume.path)
    if cli.is_main_process():
        trainable, total = model.get_nb_trainable_parameters()
        say(
            f"{lora_words(run)} alpha={run.lora_alpha} on {', '.join(run.lora_targets)}: "
            f"{trainable:,} trainable of {total:,} parameters ({lora_share(trainable, total - trainable)})"
        )
    return model


# --init_lora_weights words peft spells otherwise
PEFT_INIT = {"default": True, "loftq": True}  # loftq: the adapter starts as LoRA does, then loftq_initialise


def save_initial_adapter(model):
    """The adapter as PiSSA or OLoRA initialised it (the part of each base weight it took), saved where
    peft's conversion on save reads it; returns that folder."""
    import tempfile

    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # peft loads it back without decomposing again
    folder = Path(tempfile.mkdtemp(prefix="platy-initial-adapter-")) / "initial"
    try:
        model.save_pretrained(str(folder))
    finally:
        config.init_lora_weights = init
    return folder


def loftq_initialise(model, base_path, layout, iterations=1, rebuilt=False):
    """LoftQ on the 4-bit base: each adapter starts as the rank-r SVD of its layer's quantization error
    W - dequantize(base), W read from the base checkpoint, so base + adapter starts nearer the unquantized
    weights. With iterations = 1 the 4-bit base stays as loaded. Each further iteration quantizes
    W - (the adapter's L @ R) again and decomposes the new error (LoftQ's alternation); the offsets of the
    last quantization are kept on the model (model.loftq_offsets, saved beside the adapter) so the merge and
    every later load rebuild exactly that base. rebuilt: the base is already the one a resumed run's offsets
    rebuilt, and only the start is computed. Says and returns the error before and after."""
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition

    from platy.base_weights import base_tensors
    from platy.quantized import quantize_4bit_as_loaded

    where = base_tensors(base_path, "--base_model")
    before = after = reference = 0.0
    layers, offsets = 0, {}
    prefix = "base_model.model."
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            rank, key = module.r["default"], name[len(prefix) :]
            base = module.get_base_layer()
            weight = where[f"{key}.weight"].read(f"{key}.weight").to(base.weight.device, torch.float32)
            residual = weight - bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            plain = bnbf.dequantize_4bit(*quantize_4bit_as_loaded(weight, layout)).float() if rebuilt else None
            before += (residual if plain is None else weight - plain).square().sum().item()
            offset = None
            for step in range(1 if rebuilt else iterations):
                if step:  # quantize the weight again around the adapter's current L @ R
                    codes, state = quantize_4bit_as_loaded(weight, layout, offset)
                    residual = weight - bnbf.dequantize_4bit(codes, state).float()
                low_rank = _low_rank_decomposition(residual, reduced_rank=rank)
                if step < iterations - 1 and not rebuilt:
                    offset = (low_rank["L"].contiguous().cpu(), low_rank["R"].contiguous().cpu())
            if offset is not None:
                set_4bit_weight(base, codes, state)
                offsets[key] = offset
            module.lora_A["default"].weight.copy_(low_rank["R"])
            module.lora_B["default"].weight.copy_(low_rank["L"] / module.scaling["default"])  # adds scaling x B A
            after += (residual - low_rank["L"] @ low_rank["R"]).square().sum().item()
            reference += weight.square().sum().item()
            layers += 1
    report = {
        "layers": layers,
        "iterations": iterations,
        "relative_error_before": (before / reference) ** 0.5,
        "relative_error_after": (after / reference) ** 0.5,
    }
    if cli.is_main_process():
        say(
            f"LoftQ ({iterations} iteration{'s' if iterations > 1 else ''}): quantization error of the {layers} "
            f"adapted layers, ||W - base - adapter|| / ||W||: {report['relative_error_before']:.4f} (plain QLoRA "
            f"start) -> {report['relative_error_after']:.4f}"
        )
    model.loftq_report = report
    model.loftq_offsets = offsets
    return report


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
        activation_checkpointing=False,  # set on the model (load_model_with_lora): it may cover some layers only
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
        deepspeed=run.deepspeed,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        remove_unused_columns=False,
        dataloader_pin_memory=run.device == "cuda",
        # without use_cpu, accelerate runs CPU ranks as independent jobs: no gradient sync
        use_cpu=run.device == "cpu",
    )


def build_trainer(run, model, tokenizer, train_set, val_set, run_config):
    import transformers
    from transformers.trainer_callback import ProgressCallback

    from platy.data.examples import IGNORE_INDEX
    from platy.data.packing import PackedCollator
    from platy.reporting import loss_progress_callback
    from platy.train.trainer import Trainer

    for name, value in (
        ("WANDB_PROJECT", run.wandb_project),
        ("WANDB_WATCH", run.wandb_watch),
        ("WANDB_LOG_MODEL", run.wandb_log_model),
    ):
        if value:
            os.environ[name] = value
    if run.packing:
        collator = PackedCollator()
    else:
        collator = transformers.DataCollatorForSeq2Seq(
            tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True, label_pad_token_id=IGNORE_INDEX
        )
    trainer = Trainer(
        model=model,
        args=training_arguments(run, has_val=val_set is not None, steps=optimizer_steps(run, len(train_set))),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=collator,
        processing_class=tokenizer,
        run_config=run_config,
        checkpoint_limit=run.save_total_limit,
        skip_nonfinite_steps=run.skip_nonfinite_steps,
        loraplus_lr_ratio=run.loraplus_lr_ratio,
    )
    if getattr(model, "loftq_report", None):  # measured when the adapter was initialised
        run_config["resolved"]["loftq"] = model.loftq_report
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(loss_progress_callback())
    trainer.add_callback(last_step_logged())
    return trainer


def last_step_logged():
    """A callback that logs (and evaluates, with held-out rows) the last step, whatever --logging_steps is."""
    from transformers import TrainerCallback

    class LastStepLogged(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
                control.should_evaluate = args.eval_strategy != "no"
            return control

    return LastStepLogged()


def run_training(run, trainer):
    """Train (resuming where --resume_from_checkpoint says); the figures of the finished run."""
    from platy.train.trainer import PreemptionCallback, StopRequest, lost_peer, peer_lost

    out = Path(run.output_dir)
    clear_output_dir(run)
    resume = run.resume.path if run.resume and run.resume.checkpoint else None
    if resume:
        say(f"Resuming from {resume} (global step, optimizer, schedule, RNG and data order continue)")
    started = time.time()
    with StopRequest() as request:
        preemption = PreemptionCallback(request)
        trainer.add_callback(preemption)
        try:
            output = trainer.train(resume_from_checkpoint=resume)
        except RuntimeError as err:
            if run.world_size > 1 and lost_peer(err):
                raise peer_lost(err, out) from None
            raise
    seconds = time.time() - started
    if preemption.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
        stop_preempted(run, trainer.state)
    state = trainer.state
    evals = [r["eval_loss"] for r in state.log_history if "eval_loss" in r]
    tokens = int(state.num_input_tokens_seen)
    losses = [r["loss"] for r in state.log_history if "loss" in r]
    return {
        "global_step": state.global_step,
        "trained_tokens": tokens,
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "train_loss": output.training_loss,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,  # the last step is always evaluated (last_step_logged)
        "first_eval_loss": evals[0] if evals else None,
    }


def clear_output_dir(run):
    """Before training (rank 0): what --overwrite replaces, partial writes and the preemption marker go."""
    if not cli.is_main_process():
        return
    out = Path(run.output_dir)
    if run.overwrite and not run.resume:
        # the old run's marker and checkpoints go first: a crash must not leave the folder looking finished
        (out / RUN_CONFIG).unlink(missing_ok=True)
        for old in out.glob("checkpoint-*"):
            say(f"--overwrite: removing {old}")
            retire(old)
    remove_leftovers(out)
    (out / PREEMPTED).unlink(missing_ok=True)


def stop_preempted(run, state):
    """Signalled: the checkpoint of this step is written; leave a marker and exit with PREEMPTED."""
    checkpoint = Path(run.output_dir) / f"checkpoint-{state.global_step}"
    if cli.is_main_process():
        record = {
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "checkpoint": str(checkpoint),
            "time": time.time(),
        }
        write_json(Path(run.output_dir) / PREEMPTED, record)
        if os.environ.get("PLATY_PREEMPTED_FILE"):  # fine-tuning.sh turns torchrun's status back into PREEMPTED
            write_json(os.environ["PLATY_PREEMPTED_FILE"], record)
    raise cli.Stopped(
        f"stopped at optimizer step {state.global_step} of {state.max_steps}; checkpoint saved in "
        f"{checkpoint}. Run the same command with --resume_from_checkpoint auto to finish",
        cli.PREEMPTED,
        label="preempted",
        every_rank=True,
    )


def save(run, trainer, run_config, result):
    """Adapter (safetensors) and tokenizer via the Trainer; then config, history, curves (rank 0)."""
    from platy.train.trainer import write_failed

    out = Path(run.output_dir)
    try:
        trainer.save_model(str(out / STAGING / "final"))  # every rank: ZeRO-3 gathers the weights
        if trainer.is_world_process_zero() and getattr(trainer.model, "initial_adapter", None):
            convert_to_plain_lora(trainer.model, out / STAGING / "final")
        if trainer.is_world_process_zero():
            offsets = getattr(trainer.model, "loftq_offsets", None)
            write_loftq_offsets(offsets, out / STAGING / "final")
            if not offsets:  # nor may an earlier run's offsets stay beside this adapter
                (out / LOFTQ_OFFSET).unlink(missing_ok=True)
            record_chat_template(run, trainer.processing_class, out / STAGING / "final", run_config)
            # PEFT's empty card: write_results writes the toolkit's after the manifest, as run_config.json
            (out / STAGING / "final" / "README.md").unlink(missing_ok=True)
            trainer.write_manifest(out / STAGING / "final")
            publish_final(out / STAGING / "final", out)
            write_results(out, trainer.state.log_history, run_config, result)
    except OSError as err:
        raise write_failed(err, "writing the final adapter", out) from None
    if trainer.is_world_process_zero():
        report_done(run, out, result)


def convert_to_plain_lora(model, staged):
    """PiSSA / OLoRA: the adapter saved as the difference to its initial value (peft's conversion, rank 2r),
    so that it applies to the unchanged base, as every LoRA adapter does."""
    initial = model.initial_adapter
    try:
        model.save_pretrained(str(staged), path_initial_model_for_weight_conversion=str(initial))
    finally:
        shutil.rmtree(initial.parent, ignore_errors=True)
    say(
        f"Adapter converted for the unchanged base ({model.peft_config['default'].init_lora_weights} moved part of "
        "each adapted weight into the adapter at the start): rank doubled, merge.py and peft apply it to the base"
    )


def record_chat_template(run, tokenizer, folder, run_config):
    """With a chat template: a generation_config.json whose eos_token_id holds the end-of-turn tokens as well
    as EOS (so generate, lm-eval and vLLM stop at the end of a turn), and the template in run_config. The
    tokenizer files the Trainer saved carry the template itself."""
    from transformers import GenerationConfig

    chat = bind_chat_template(run, tokenizer)
    if chat is None:
        return
    try:
        generation = GenerationConfig.from_pretrained(run.base_model_path)
    except OSError:  # the base has no generation_config.json
        generation = GenerationConfig()
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    stops = [
        i for i in dict.fromkeys([*eos, tokenizer.eos_token_id, *chat.end_of_turn_ids(tokenizer)]) if i is not None
    ]
    generation.eos_token_id = stops
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(folder)
    run_config["resolved"]["chat_template"] = {
        "name": chat.name,
        "path": chat.path,
        "end_of_turn": list(chat.end_of_turn),
        "vocabulary": len(tokenizer),
        "eos_token_id": stops,
        "text": chat.text,
    }


def publish_final(staged, out):
    """Move each fully written file into output_dir, the manifest last: a reader never sees half an adapter,
    nor a manifest of files not yet in place."""
    for path in sorted(staged.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(path, out / path.name)
    shutil.rmtree(staged.parent, ignore_errors=True)


def write_results(out, log_history, run_config, result):
    from platy.model_card import adapter_card
    from platy.reporting import MIN_CURVE_POINTS, plot_curves

    write_json(out / LOG_HISTORY, log_history)
    (out / CURVES).unlink(missing_ok=True)  # a plot of an earlier run must not pass for this one's
    if not plot_curves(log_history, out / CURVES):
        logged = sum("loss" in r for r in log_history)
        say(
            f"No {CURVES}: {logged} training loss point(s) logged, and a curve needs {MIN_CURVE_POINTS}; "
            "lower --logging_steps or train longer"
        )
    run_config["result"] = result
    if (out / "adapter_config.json").is_file():  # the toolkit's card, not PEFT's empty template
        write_text(out / "README.md", adapter_card(run_config, out))
    write_json(out / RUN_CONFIG, run_config)  # written last: its presence marks a finished run


def export_finished_checkpoint(run, tokenizer, run_config):
    """The last checkpoint holds the whole run but the final save was interrupted: export it."""
    checkpoint = Path(run.resume.path)
    out = Path(run.output_dir)
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
    if changes_base(run.init_lora_weights):  # the checkpoint's adapter is relative to the changed base
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        model, _ = load_model_with_lora(run)  # the same start, recomputed from the base
        set_peft_model_state_dict(model, load_peft_weights(str(checkpoint), device="cpu"))
        convert_to_plain_lora(model, staged)
    write_manifest(staged, step=state["global_step"], config_hash=config_hash(run_config))
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
    report_done(run, out, result)


def report_done(run, out, result):
    losses = "" if result["train_loss"] is None else f"mean training loss {result['train_loss']:.4f}"
    if result["last_logged_loss"] is not None:
        losses += f", last logged {result['last_logged_loss']:.4f}"
    if result["eval_loss"] is not None:
        losses += f", eval loss {eval_change(result)}"
    if result["train_seconds"] is None:
        say(f"\nDone: {result['global_step']} optimizer steps (exported from {result['exported_from']}); {losses}")
    else:
        say(
            f"\nDone: {result['global_step']} optimizer steps, {result['trained_tokens']:,} tokens processed "
            f"(non-padding) in {result['train_seconds']:.1f} s = {result['tokens_per_second']:,.0f} tokens/s; "
            f"{losses}"
        )
    weights = "model.safetensors" if run.finetuning == "full" else "adapter_model.safetensors"
    say(f"{'Model' if run.finetuning == 'full' else 'Adapter'}: {out / weights}")
    curves = f"curves: {out / CURVES}; " if (out / CURVES).exists() else ""
    say(f"Run configuration: {out / RUN_CONFIG}; {curves}log: {out / LOG_HISTORY}")
    if run.base_model.startswith("builtin:"):
        learned = f"; its eval loss went {eval_change(result)}" if result.get("first_eval_loss") else ""
        say(
            f"Note: {run.base_model} is a random tiny model that shows the pipeline works: whatever it generates "
            f"is meaningless{learned}"
        )


def eval_change(result):
    """The held-out loss of the run, from its first evaluation when there was one: '7.02 -> 5.79'."""
    first, last = result.get("first_eval_loss"), result["eval_loss"]
    return f"{first:.2f} -> {last:.2f}" if first is not None and first != last else f"{last:.4f}"
