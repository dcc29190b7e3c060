"""Publishing a finished run: the final adapter (or model) staged and moved into output_dir, the log, the
curves, the card and run_config.json last; a checkpoint that holds the whole run exported instead; the
closing lines on the console.
"""

import json
import os
import shutil
from pathlib import Path

from platy import cli
from platy.cli import say
from platy.files import (
    CURVES,
    LOG_HISTORY,
    RUN_CONFIG,
    STAGING,
    readable_as_umask_allows,
    sync_folder,
    sync_tree,
    write_json,
    write_text,
)
from platy.integrity import MANIFEST, config_hash, write_manifest
from platy.prompts import CHAT_TEMPLATE_NONE
from platy.quantized import LOFTQ_OFFSET, write_loftq_offsets
from platy.record import RecordedChatTemplate
from platy.tiny import is_random
from platy.train.checkpoints import remove_leftovers
from platy.train.config import changes_base
from platy.train.lora import attach, convert_to_plain_lora

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


def save(run, trainer, start, chat, record, result):
    """Adapter (safetensors) and tokenizer via the Trainer; then config, history, curves (rank 0). start: the
    LoraStart (PiSSA / OLoRA's initial adapter, LoftQ's offsets); chat: the bound chat template or None.
    Every rank learns whether a write failed anywhere, and all stop together."""
    from platy.train.trainer import write_attempt

    out = Path(run.output_dir)
    staged, doing = out / STAGING / "final", "writing the final adapter"
    # every rank: ZeRO-3 gathers the weights
    trainer.agree_on_writes(write_attempt(trainer.save_model, str(staged)), doing, out)
    failure = None
    if trainer.is_world_process_zero():
        failure = write_attempt(complete_final, run, trainer, start, chat, record, result, staged)
    trainer.agree_on_writes(failure, doing, out)
    if trainer.is_world_process_zero():
        report_done(run, out, result)


def complete_final(run, trainer, start, chat, record, result, staged):
    """Rank 0: the staged adapter completed (plain LoRA, LoftQ offsets, chat template), its manifest written,
    published into output_dir, then the results and the record."""
    out = Path(run.output_dir)
    if start.initial_adapter:
        convert_to_plain_lora(trainer.model, start.initial_adapter, staged)
    write_loftq_offsets(start.loftq_offsets, staged)
    if not start.loftq_offsets:  # nor may an earlier run's offsets stay beside this adapter
        (out / LOFTQ_OFFSET).unlink(missing_ok=True)
    record_prompt_format(run, chat, trainer.processing_class, staged, record)
    # PEFT's empty card: write_results writes the toolkit's after the manifest
    (staged / "README.md").unlink(missing_ok=True)
    record.set_result(result)
    record.write(staged)  # inside the manifest: a changed record is found like a changed weight
    trainer.write_manifest(staged)
    publish_final(staged, out, trainer.state.log_history, record)


def record_prompt_format(run, chat, tokenizer, folder, record):
    """With a chat template: a generation_config.json whose eos_token_id holds the end-of-turn tokens as well
    as EOS (so generate, lm-eval and vLLM stop at the end of a turn), and the template in the run record. The
    tokenizer files the Trainer saved carry the template itself. Without one, the tokenizer's chat template
    (the base's own) gives way to the prompt template written as one: the adapter's prompts are laid out so."""
    from transformers import GenerationConfig

    if chat is None:
        save_prompt_template(run, tokenizer, folder)
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
    record.set_chat_template(
        RecordedChatTemplate(chat.name, chat.path, tuple(chat.end_of_turn), len(tokenizer), tuple(stops), chat.text)
    )


def save_prompt_template(run, tokenizer, folder):
    """A run without a chat template: its prompt template, written as a chat template, is the saved tokenizer's
    (the base's own chat template would lay prompts out otherwise than training did)."""
    from platy.data.examples import adds_bos
    from platy.prompts import alpaca_chat_template, save_chat_template

    save_chat_template(folder, alpaca_chat_template(run.prompter.template, adds_bos(tokenizer)))


def publish_final(staged, out, log_history, record):
    """Move each fully written file into output_dir, the manifest after them; then the log, the curves and
    the card; the run record (listed in the manifest) moves last: its presence marks a finished run. A reader
    never sees half an adapter, nor a manifest of files not yet in place."""
    for path in staged.iterdir():
        if path.is_file():
            readable_as_umask_allows(path)  # safetensors writes 0600: the adapter is for whoever may read here
    sync_tree(staged)  # on disk before the renames: a crash must not leave a renamed but empty file
    for path in sorted(staged.iterdir(), key=lambda p: p.name == MANIFEST):
        if path.name != RUN_CONFIG:
            os.replace(path, out / path.name)
    write_results(out, log_history, record)
    for path in staged.iterdir():  # what is left: the run record, moved last
        os.replace(path, out / path.name)
    sync_folder(out)
    shutil.rmtree(staged.parent, ignore_errors=True)


def write_results(out, log_history, record):
    """The log, the curves and the adapter's card beside the published adapter."""
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
    if (out / "adapter_config.json").is_file():  # the toolkit's card, not PEFT's empty template
        write_text(out / "README.md", adapter_card(record, out))


def export_finished_checkpoint(run, tokenizer, record):
    """The last checkpoint holds the whole run but the final save was interrupted: export it. Rank 0 alone
    exports (no Trainer, so no collective, exists yet); under torchrun the other processes end at once, and
    the job's status is rank 0's."""
    if not cli.is_main_process():
        return
    from platy.train.trainer import write_failed

    try:
        export_checkpoint(run, tokenizer, record)
    except OSError as err:
        raise write_failed(err, f"exporting {Path(run.resume.path).name}", run.output_dir) from None


def export_checkpoint(run, tokenizer, record):
    """The checkpoint's weights, the tokenizer and the record staged, then published as a finished run's."""
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
    if run.chat_template == CHAT_TEMPLATE_NONE:
        save_prompt_template(run, tokenizer, staged)
    if changes_base(run.init_lora_weights):  # the checkpoint's adapter is relative to the changed base
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        start = attach(run)  # the same start, recomputed from the base
        set_peft_model_state_dict(start.model, load_peft_weights(str(checkpoint), device="cpu"))
        convert_to_plain_lora(start.model, start.initial_adapter, staged)
    history = state.get("log_history", [])
    losses = [r["loss"] for r in history if "loss" in r]
    mean_loss = sum(losses) / len(losses) if losses else None
    tokens = int(state.get("num_input_tokens_seen", 0))
    result = run_result(history, state["global_step"], tokens, mean_loss, exported_from=str(checkpoint))
    record.set_result(result)
    record.write(staged)
    write_manifest(staged, step=state["global_step"], config_hash=config_hash(record.to_dict()))
    publish_final(staged, out, history, record)
    report_done(run, out, result)


def run_result(history, global_step, tokens, train_loss, seconds=None, exported_from=None):
    """The figures of a finished run, as its record keeps them: one layout for a run trained here
    (seconds: how long it took) and one exported from the checkpoint that holds it (exported_from)."""
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    losses = [r["loss"] for r in history if "loss" in r]
    return {
        "global_step": global_step,
        "trained_tokens": tokens,
        "train_seconds": None if seconds is None else round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "train_loss": train_loss,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,  # the last step is always evaluated (last_step_logged)
        "first_eval_loss": evals[0] if evals else None,
        "exported_from": exported_from,
    }


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
    if is_random(run.base_model):
        learned = f"; its eval loss went {eval_change(result)}" if result.get("first_eval_loss") else ""
        say(
            f"Note: {run.base_model} is a random tiny model that shows the pipeline works: whatever it generates "
            f"is meaningless{learned}"
        )


def eval_change(result):
    """The held-out loss of the run, from its first evaluation when there was one: '7.02 -> 5.79'."""
    first, last = result.get("first_eval_loss"), result["eval_loss"]
    return f"{first:.2f} -> {last:.2f}" if first is not None and first != last else f"{last:.4f}"
