"""DPO throughput and peak memory: this toolkit's --stage dpo against TRL's DPOTrainer, same model, LoRA,
pairs and beta.

    python bench/preference_speed.py                       # the tiny model on CPU, data/sample_preference.json
    python bench/preference_speed.py --base_model builtin:smollm2-135m --chat_template auto --steps 6

Each configuration runs --steps optimizer steps in a process of its own (its peak memory is its own), fp32,
no quantization, LoRA r 16 on gate/up/down, batch --batch_size in micro-batches of --micro_batch_size pairs,
no activation checkpointing:
  (a) toolkit-cold:  finetune.py --stage dpo with an empty reference cache: the reference log-probs are
                     computed before training (that time counted), for every pair: with fewer steps than one
                     epoch (6 for the bundled 48 pairs in batches of 8) it counts pairs that are never trained;
  (b) toolkit-warm:  the same with the reference log-probs read from the cache;
  (c) trl:           TRL DPOTrainer's defaults (the reference computed in every step, adapter disabled), on
                     the prompts as the toolkit renders them: the Alpaca template as text, or with
                     --chat_template auto the pairs as conversations, which TRL renders with the model's own
                     chat template as the toolkit does (ChatML for SmolLM2, its default system prompt included;
                     TRL's answers also hold the newline after <|im_end|>, one token the toolkit does not score).
                     TRL 1.16 computes its lm_head only at the answer positions too (its fused_lm_head);
  (d) trl-precomputed: TRL with precompute_ref_log_probs=True (that pass counted, every pair as in (a)).
Printed: trained (non-pad) tokens per second over the whole call (set-up of the model excluded), peak memory
(GPU: max allocated; CPU: the process's peak resident memory), and each relative to (c); for the toolkit
also the first logged loss (ln 2 for DPO: the policy starts as its reference) and, with --val_set_size, the
held-out reward accuracy at step 0 and at the end (those pairs are held out of TRL's training too, and the
toolkit's two evaluations count in its time). --result_file writes the figures as JSON, rewritten after
each configuration (bench/gpu_check.py's DPO step reads it). Needs trl for (c) and (d)
(requirements-bench.txt).
"""

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from platy.base_weights import resolve_base_model  # noqa: E402
from platy.cli import UserError, run, say  # noqa: E402
from platy.files import write_json  # noqa: E402
from platy.flags import from_signature  # noqa: E402

RENDERED = {"none": "the Alpaca template", "auto": "the model's chat template"}
CONFIGS = ("toolkit-cold", "toolkit-warm", "trl", "trl-precomputed")
LABELS = {
    "toolkit-cold": "(a) toolkit, reference log-probs computed before training (cold cache)",
    "toolkit-warm": "(b) toolkit, reference log-probs read from the cache",
    "trl": "(c) TRL DPOTrainer defaults (reference forward in every step)",
    "trl-precomputed": "(d) TRL with precompute_ref_log_probs",
}


def main(
    base_model: str = "builtin:tiny-llama",
    data_path: str = str(ROOT / "data" / "sample_preference.json"),
    steps: int = 6,
    batch_size: int = 8,
    micro_batch_size: int = 4,
    beta: float = 0.1,
    learning_rate: float = 1e-4,
    cutoff_len: int = 256,
    val_set_size: int = 0,
    chat_template: str = "none",
    configs: str = ",".join(CONFIGS),
    result_file: str = "",
    config: str = "",
):
    """Args:
    base_model: the model (a hub id, a folder, builtin:tiny-llama or builtin:smollm2-135m).
    data_path: the preference pairs.
    steps: optimizer steps per configuration.
    batch_size: pairs per optimizer step.
    micro_batch_size: pairs per forward pass.
    beta: DPO's beta.
    learning_rate: the peak learning rate (no warm-up).
    cutoff_len: longest sequence in tokens.
    val_set_size: pairs held out (of every configuration's training): the toolkit's held-out reward accuracy.
    chat_template: none (the Alpaca template, both sides) or auto (the model's own chat template, both sides).
    configs: the configurations to run, in this order (comma-separated).
    result_file: also write the figures as JSON here, rewritten after every configuration.
    config: run one configuration in this process (what the parent starts); empty: those of --configs.
    """
    settings = dict(
        base_model=base_model,
        data_path=data_path,
        steps=steps,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        beta=beta,
        learning_rate=learning_rate,
        cutoff_len=cutoff_len,
        val_set_size=val_set_size,
        chat_template=chat_template,
    )
    if chat_template not in ("none", "auto"):
        raise UserError(f"--chat_template {chat_template}: choose none (the Alpaca template) or auto")
    if config:
        print(json.dumps({"config": config, **measure(config, **settings)}))
        return
    names = [name for name in configs.split(",") if name]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        raise UserError(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    # the model is resolved (a builtin one built or converted) once, in the user's cache; each configuration
    # gets a private cache that holds only the reference log-probs, so (a) starts cold and (b) reads (a)'s
    settings["base_model"] = resolve_base_model(base_model, "--base_model")
    cache = tempfile.mkdtemp(prefix="platy-preference-bench-")
    figures = {"model": base_model, "settings": {**settings, "base_model": base_model}, "memory": memory_kind()}
    figures["results"] = results = {}
    for name in names:
        argv = [sys.executable, __file__, *(f"--{k}={v}" for k, v in settings.items()), f"--config={name}"]
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PLATY_CACHE": cache})
        lines = [line for line in done.stdout.splitlines() if line.startswith('{"config"')]
        if done.returncode or not lines:
            say(f"{name}: failed (status {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            results[name] = None
        else:
            results[name] = json.loads(lines[-1])
        if result_file:
            write_json(Path(result_file), figures)
    say("\n".join(report(figures)))


def report(figures):
    """The figures as BENCHMARKS.md shows them: a heading line, the table, the toolkit's loss and accuracy."""
    settings, results = figures["settings"], {k: v for k, v in figures["results"].items() if v}
    base = results.get("trl")
    lines = [
        f"DPO, {figures['model']}, {RENDERED[settings.get('chat_template', 'none')]}, "
        f"{settings['steps']} steps of {settings['batch_size']} pairs (micro-batches of "
        f"{settings['micro_batch_size']}), beta {settings['beta']}; peak memory: {figures['memory']}",
        "",
        "| configuration | tokens/s | peak memory (MB) | seconds | tokens/s vs (c) | memory vs (c) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        vs = ("n/a", "n/a")
        if base:
            vs = (
                f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x",
                f"{r['peak_memory_mb'] / base['peak_memory_mb']:.2f}x",
            )
        lines.append(
            f"| {LABELS[name]} | {r['tokens_per_second']:,.1f} | {r['peak_memory_mb']:,.0f} | {r['seconds']:.1f} | "
            f"{vs[0]} | {vs[1]} |"
        )
    for name, r in results.items():
        if name.startswith("toolkit"):
            accuracy = r.get("heldout_accuracy")
            held_out = (
                f"; held-out reward accuracy {100 * accuracy[0]:.0f}% at step 0 -> {100 * accuracy[-1]:.0f}%"
                if accuracy
                else ""
            )
            lines.append(
                f"- {LABELS[name][:3]} first logged loss {r['first_loss']:.4f} (ln 2 = {math.log(2):.4f}), "
                f"last {r['loss']:.4f}; reference log-probs {r['reference']} in {r['reference_seconds']:.1f} s"
                + held_out
            )
    failed = [name for name, r in figures["results"].items() if not r]
    if failed:
        lines.append(f"- failed: {', '.join(failed)}")
    return lines


def measure(config, **settings):
    """One configuration's figures; settings are main's flags, read as attributes."""
    return (toolkit if config.startswith("toolkit") else trl_run)(config, SimpleNamespace(**settings))


def memory_kind():
    import torch

    return "GPU: max allocated" if torch.cuda.is_available() else "CPU: the process's peak resident memory"


def peak_mb():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def toolkit(config, s):
    import gc

    import torch

    from platy import cli
    from platy.files import cache_root
    from platy.train.recipe import Recipe

    flags = cli.entry_defaults(cli.script_entry("finetune"))
    out = tempfile.mkdtemp(prefix="platy-bench-dpo-")
    flags.update(
        base_model=s.base_model,
        data_path=s.data_path,
        output_dir=out,
        stage="dpo",
        beta=s.beta,
        precision="fp32",  # as TRL runs (bf16=False); --precision auto would pick bf16 on some CPUs and GPUs
        quantization="none",
        gradient_checkpointing=False,
        batch_size=s.batch_size,
        micro_batch_size=s.micro_batch_size,
        max_steps=s.steps,
        warmup_steps=0,
        learning_rate=s.learning_rate,
        cutoff_len=s.cutoff_len,
        val_set_size=s.val_set_size,
        chat_template=s.chat_template,
        logging_steps=1,
        save_steps=10**6,  # no checkpoint; the held-out pairs are evaluated at step 0 and at the end
        report_to="none",
        overwrite=True,
    )

    def cached():
        return any((cache_root() / "reference").glob("*.safetensors"))

    if config == "toolkit-warm" and not cached():
        Recipe.from_flags(dict(flags)).setup()  # fill the cache (when (a) did not), then measure a run reading it
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    reference = "read from the cache" if cached() else "computed"
    recipe = Recipe.from_flags(flags)
    recipe.describe()
    recipe.setup()  # the reference log-probs are computed (or read) here
    result = recipe.train()
    seconds = result["train_seconds"] + recipe.objective.reference_seconds
    history = recipe.trainer.state.log_history
    return {
        "tokens_per_second": result["trained_tokens"] / seconds,
        "seconds": seconds,
        "peak_memory_mb": peak_mb(),
        "loss": result["last_logged_loss"],
        "first_loss": next(r["loss"] for r in history if "loss" in r),
        "reference": reference,
        "reference_seconds": recipe.objective.reference_seconds,
        "heldout_accuracy": [r["eval_rewards/accuracies"] for r in history if "eval_rewards/accuracies" in r],
    }


def trl_run(config, s):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from platy import cli
    from platy.data.pairs import load_pairs
    from platy.data.rows import split_rows

    path = resolve_base_model(s.base_model, "--base_model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pairs, _ = load_pairs(s.data_path)
    seed = cli.entry_defaults(cli.script_entry("finetune"))["seed"]
    pairs, _ = split_rows(pairs, s.val_set_size, seed)  # the pairs the toolkit trains on, split as it splits them
    rows = [trl_row(pair, s.chat_template == "auto") for pair in pairs]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-dpo-"),
        beta=s.beta,
        per_device_train_batch_size=s.micro_batch_size,
        gradient_accumulation_steps=s.batch_size // s.micro_batch_size,
        max_steps=s.steps,
        learning_rate=s.learning_rate,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        max_length=s.cutoff_len,
        precompute_ref_log_probs=config == "trl-precomputed",
    )
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["gate_proj", "down_proj", "up_proj"])
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )
    started = time.time()
    output = trainer.train()  # TRL's precompute pass runs inside train()
    seconds = time.time() - started
    tokens = trainer._total_train_tokens
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "tokens_per_second": tokens / seconds,
        "seconds": seconds,
        "peak_memory_mb": peak_mb(),
        "loss": losses[-1] if losses else output.training_loss,
    }


def trl_row(pair, chat):
    """A pair as TRL's DPOTrainer takes it, rendered as the toolkit renders it: the Alpaca prompt as text (TRL
    appends EOS to each answer), or (chat) the conversation as the toolkit's chat rendering takes it, which TRL
    renders with the tokenizer's chat template."""
    from platy.data.pairs import sft_row
    from platy.data.rows import row_messages
    from platy.prompts import Prompter

    prompt = pair["prompt"]
    if chat:
        conversation = row_messages(sft_row(prompt, pair["chosen"]))[:-1]
        answers = {key: [{"role": "assistant", "content": pair[key]}] for key in ("chosen", "rejected")}
        return {"prompt": conversation, **answers}
    text = Prompter("alpaca").generate_prompt(
        prompt.get("instruction") or prompt["messages"][-1]["content"], prompt.get("input")
    )
    return {"prompt": text, "chosen": pair["chosen"], "rejected": pair["rejected"]}


if __name__ == "__main__":
    run(from_signature(main))
