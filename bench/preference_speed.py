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
Printed: trained (non-pad) tokens per second over the whole call (set-up of the model excluded), peak
resident memory of the process, and each relative to (c). Needs trl (requirements-bench.txt).
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from platy.cli import UserError, run, say  # noqa: E402
from platy.flags import from_signature  # noqa: E402

CONFIGS = ("toolkit-cold", "toolkit-warm", "trl", "trl-precomputed")


def main(
    base_model: str = "builtin:tiny-llama",
    data_path: str = str(ROOT / "data" / "sample_preference.json"),
    steps: int = 6,
    batch_size: int = 8,
    micro_batch_size: int = 4,
    beta: float = 0.1,
    cutoff_len: int = 256,
    chat_template: str = "none",
    config: str = "",
):
    """Args:
    base_model: the model (a hub id, a folder, builtin:tiny-llama or builtin:smollm2-135m).
    data_path: the preference pairs.
    steps: optimizer steps per configuration.
    batch_size: pairs per optimizer step.
    micro_batch_size: pairs per forward pass.
    beta: DPO's beta.
    cutoff_len: longest sequence in tokens.
    chat_template: none (the Alpaca template, both sides) or auto (the model's own chat template, both sides).
    config: run one configuration in this process (what the parent starts); empty: all of them.
    """
    settings = dict(
        base_model=base_model,
        data_path=data_path,
        steps=steps,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        beta=beta,
        cutoff_len=cutoff_len,
        chat_template=chat_template,
    )
    if chat_template not in ("none", "auto"):
        raise UserError(f"--chat_template {chat_template}: choose none (the Alpaca template) or auto")
    if config:
        print(json.dumps({"config": config, **measure(config, **settings)}))
        return
    from platy.base_weights import resolve_base_model

    # a built-in model's folder, built once in the usual cache: the children's cache is an empty one (no reference
    # log-probs in it), where building the model again would only cost time
    settings["base_model"] = resolve_base_model(base_model, "--base_model")
    cache = tempfile.mkdtemp(prefix="platy-preference-bench-")
    results = {}
    for name in CONFIGS:
        argv = [sys.executable, __file__, *(f"--{k}={v}" for k, v in settings.items()), f"--config={name}"]
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PLATY_CACHE": cache})
        lines = [line for line in done.stdout.splitlines() if line.startswith('{"config"')]
        if done.returncode or not lines:
            say(f"{name}: failed (status {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            continue
        results[name] = json.loads(lines[-1])
    base = results.get("trl")
    rendered = "the model's chat template" if chat_template == "auto" else "the Alpaca template"
    say(
        f"DPO, {base_model}, {rendered}, {steps} steps of {batch_size} pairs (micro-batches of {micro_batch_size}), "
        f"beta {beta}"
    )
    for name, r in results.items():
        ratio = f"  {r['tokens_per_second'] / base['tokens_per_second']:.2f}x tokens/s, " if base else "  "
        ratio += f"{r['peak_memory_mb'] / base['peak_memory_mb']:.2f}x memory vs trl" if base else ""
        say(
            f"{name:16s} {r['tokens_per_second']:9.1f} tokens/s  peak {r['peak_memory_mb']:8.0f} MB  "
            f"{r['seconds']:6.1f} s  final loss {r['loss']:.4f}{ratio}"
        )


def measure(config, **settings):
    return (toolkit if config.startswith("toolkit") else trl_run)(config, **settings)


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def toolkit(config, base_model, data_path, steps, batch_size, micro_batch_size, beta, cutoff_len, chat_template):
    from platy import cli
    from platy.train.recipe import Recipe

    flags = cli.entry_defaults(cli.script_entry("finetune"))
    out = tempfile.mkdtemp(prefix="platy-bench-dpo-")
    flags.update(
        base_model=base_model,
        data_path=data_path,
        output_dir=out,
        stage="dpo",
        beta=beta,
        quantization="none",
        gradient_checkpointing=False,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        max_steps=steps,
        warmup_steps=0,
        learning_rate=1e-4,
        cutoff_len=cutoff_len,
        chat_template=chat_template,
        logging_steps=1,
        save_steps=10**6,
        report_to="none",
        overwrite=True,
    )
    if config == "toolkit-warm":  # fill the cache, then measure a run that reads it
        Recipe.from_flags(dict(flags)).setup()
    recipe = Recipe.from_flags(flags)
    recipe.describe()
    recipe.setup()  # the reference log-probs are computed (or read) here
    result = recipe.train()
    seconds = result["train_seconds"] + recipe.objective.reference_seconds
    return {
        "tokens_per_second": result["trained_tokens"] / seconds,
        "seconds": seconds,
        "peak_memory_mb": peak_mb(),
        "loss": result["last_logged_loss"],
    }


def trl_run(config, base_model, data_path, steps, batch_size, micro_batch_size, beta, cutoff_len, chat_template):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from platy.base_weights import resolve_base_model
    from platy.data.pairs import load_pairs

    path = resolve_base_model(base_model, "--base_model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pairs, _ = load_pairs(data_path)
    rows = [trl_row(pair, chat_template == "auto") for pair in pairs]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-dpo-"),
        beta=beta,
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=batch_size // micro_batch_size,
        max_steps=steps,
        learning_rate=1e-4,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        max_length=cutoff_len,
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
