"""Does preference tuning change what a real model answers? DPO on the bundled pairs, then the model before
and the merged model after answer held-out questions greedily, side by side.

    python bench/preference_quality.py                                    # from SmolLM2-135M-Instruct itself
    python bench/preference_quality.py --init_adapter ./outputs/platypus-qlora   # from an SFT adapter

Stages, each a command of the toolkit in a process of its own (its CPU time is reported):
  1. finetune.py --stage dpo on data/sample_preference.json (8 pairs held out), from --base_model, or from
     --init_adapter's SFT adapter (then the reference is that SFT model);
  2. merge.py --verify of the DPO adapter into a float32 folder;
  3. evaluate.py --suite arithmetic on the model before DPO (the base, or base + SFT adapter) and on the
     merged model: 30 held-out questions (data/arithmetic, none of them a training pair's), in the Alpaca
     layout both were trained with.
Printed: the held-out reward accuracy and margin at step 0 and at the end (from the run's log), and for
each model the share of answers in the chosen style (stating "The answer is N."), with the right N, and
hedging as the rejected answers do ("maybe", "not sure"), with the first answers of each.
"""

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from platy.cli import UserError, run  # noqa: E402
from platy.evaluate_stages import unique_folders  # noqa: E402
from platy.evaluation import model_labels  # noqa: E402
from platy.files import write_json  # noqa: E402
from platy.flags import from_signature  # noqa: E402

STYLE = re.compile(r"The answer is (-?[0-9]+)\.")  # data/arithmetic/arithmetic.yaml's filter
HEDGE = re.compile(r"\b(maybe|not sure)\b", re.IGNORECASE)


def main(
    base_model: str = "builtin:smollm2-135m",
    init_adapter: str = None,
    output_dir: str = "./outputs/preference-quality",
    learning_rate: float = 1e-3,
    num_epochs: int = 4,
    beta: float = 0.1,
    lora_target_modules: str = "all-linear",
    show: int = 5,
):
    """Args:
    base_model: The model to align (a folder, a hub id or builtin:NAME).
    init_adapter: An SFT adapter of finetune.py on that base: DPO starts from it and it is the reference.
    output_dir: A new or empty folder, or this benchmark's earlier one: the DPO adapter, the merged model and
        the evaluation go below it.
    learning_rate: DPO's learning rate.
    num_epochs: DPO's epochs over the 40 training pairs (5 optimizer steps each).
    beta: DPO's beta.
    lora_target_modules: The new adapter's LoRA targets (from --init_adapter: that adapter's own).
    show: Print the answers to the first SHOW questions (at least 1).
    """
    if show < 1:
        raise UserError(f"--show {show}: give 1 or more (the answers are read from evaluate.py's samples)")
    out = Path(output_dir).expanduser().resolve()  # the commands run from the repository's root
    if init_adapter:
        init_adapter = str(Path(init_adapter).expanduser().resolve())
    if Path(base_model).expanduser().exists():
        base_model = str(Path(base_model).expanduser().resolve())
    if out.exists() and any(out.iterdir()) and not (out / "quality.json").exists():
        raise UserError(f"--output_dir {out}: holds other files; give a new or empty folder")
    adapter, merged, evaluation = out / "dpo", out / "dpo-merged", out / "eval"
    before = init_adapter or base_model
    dpo = [
        "finetune.py", "--stage", "dpo", "--base_model", base_model, "--quantization", "none",
        "--data_path", "data/sample_preference.json", "--val_set_size", 8, "--output_dir", adapter,
        "--batch_size", 8, "--micro_batch_size", 4, "--learning_rate", learning_rate, "--beta", beta,
        "--warmup_steps", 0, "--num_epochs", num_epochs, "--logging_steps", 1, "--eval_steps", 5,
        "--cutoff_len", 256, "--lora_target_modules", lora_target_modules, "--overwrite", True,
    ]  # fmt: skip
    if init_adapter:
        dpo += ["--init_adapter", init_adapter]
    merge = ["merge.py", "--peft_model_path", adapter, "--output_dir", merged, "--dtype", "float32", "--verify"]
    merge += ["--overwrite", True]
    models = f"{before},{merged}"
    score = ["evaluate.py", "--suite", "arithmetic", "--models", models, "--output_dir", evaluation]
    score += ["--show_answers", show]  # also writes every answer
    seconds = {name: command(name, argv) for name, argv in (("DPO", dpo), ("merge", merge), ("evaluate", score))}

    rewards = held_out_rewards(adapter / "log_history.json")
    labels = model_labels(models.split(","))
    answers = {label: read_answers(evaluation / folder) for label, folder in zip(labels, unique_folders(labels))}
    figures = {"before": before, "rewards": rewards, "cpu_seconds": seconds}
    figures["answers"] = {label: shares(rows) for label, rows in answers.items()}
    write_json(out / "quality.json", figures)
    report(figures, answers, show)


def command(name, argv):
    """Run one toolkit command from the repository root; its CPU time (user + system) in seconds."""
    start, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed ({argv[0]}, exit {result.returncode}):\n{result.stderr[-3000:]}")
    end = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = end.ru_utime - start.ru_utime + end.ru_stime - start.ru_stime
    print(f"{name}: {cpu:.0f} CPU-seconds ({time.time() - wall:.0f} s wall)", flush=True)
    return round(cpu, 1)


def held_out_rewards(log_file):
    """[(step, reward accuracy, margin)] of every held-out evaluation of the run."""
    history = json.loads(Path(log_file).read_text())
    keys = ("step", "eval_rewards/accuracies", "eval_rewards/margins")
    return [[row[k] for k in keys] for row in history if "eval_rewards/accuracies" in row]


def read_answers(folder):
    """(question, expected N, the model's own answer) of every held-out question, from the samples evaluate.py
    wrote in a model's results folder."""
    samples = json.loads((folder / "0-shot-samples.json").read_text())["platy_arithmetic"]
    return [(s["doc"]["instruction"], s["target"], s["resps"][0][0].strip()) for s in samples]


def shares(rows):
    """{style, right, hedged}: how many answers state "The answer is N.", with the right N, and hedge."""
    found = [(STYLE.search(answer), expected, answer) for _, expected, answer in rows]
    return {
        "questions": len(rows),
        "style": sum(match is not None for match, _, _ in found),
        "right": sum(match is not None and match.group(1) == expected for match, expected, _ in found),
        "hedged": sum(HEDGE.search(answer) is not None for _, _, answer in found),
    }


def report(figures, answers, show):
    (step0, accuracy0, margin0), *_, (step, accuracy, margin) = figures["rewards"]
    print(
        f"\nHeld-out reward accuracy: {accuracy0:.0%} at step {step0} -> {accuracy:.0%} at step {step}; "
        f"margin {margin0:.2f} -> {margin:.2f}"
    )
    print("\n| model | chosen style ('The answer is N.') | with the right N | hedged |\n| --- | --- | --- | --- |")
    for label, counts in figures["answers"].items():
        n = counts["questions"]
        cells = [f"{counts[k]}/{n} ({counts[k] / n:.0%})" for k in ("style", "right", "hedged")]
        print(f"| {label} | {' | '.join(cells)} |")
    print("\nCPU time: " + ", ".join(f"{name} {s:.0f} s" for name, s in figures["cpu_seconds"].items()))
    rows = list(answers.values())
    width = max(len(label) for label in answers)
    for index, (question, expected, _) in enumerate(rows[0][:show]):
        print(f"\n  {question}  (expected {expected})")
        for label, model_rows in answers.items():
            print(f"    {label.ljust(width)}  {model_rows[index][2]}")


if __name__ == "__main__":
    run(from_signature(main))
