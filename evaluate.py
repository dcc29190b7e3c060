r"""Benchmark base, merged and adapter models with EleutherAI's lm-evaluation-harness.

    # the Open LLM Leaderboard table (ARC, HellaSwag, MMLU, TruthfulQA, Winogrande, GSM8K) for a
    # base model and its fine-tune, in one table
    python evaluate.py --models meta-llama/Llama-2-13b-hf,./Platypus2-13B --suite openllm

    # KoBEST (COPA, HellaSwag, BoolQ, SentiNeg), macro F1 at 0, 5, 10 and 50 shots; an adapter
    # folder is evaluated on its base without merging
    python evaluate.py --models beomi/llama-2-ko-7b,./outputs/ko-platypus-qlora --suite kobest

    # any harness tasks, or local tasks in the harness's YAML format (offline)
    python evaluate.py --models ./outputs/platypus-merged --suite arc_easy,piqa --num_fewshot 0 --limit 100
    python evaluate.py --models builtin:tiny-llama --suite my_task --include_path ./my_tasks

    # the quick start's task (bundled, offline): base against fine-tuned, with their answers
    python evaluate.py --models builtin:smollm2-135m,./outputs/platypus-qlora --suite toolcalls --show_answers 5

Needs lm-eval: pip install -r requirements-eval.txt. Writes the harness's results JSON per model
and shot count, and the tables (Markdown, as the published model cards lay them out) into
--output_dir.
"""

from platy import cli
from platy import evaluate_stages as stages
from platy.flags import Flag, Flags, declared

FLAGS = Flags(
    Flag(
        "models",
        None,
        str,
        "Comma-separated models: merged or base model folders, hub ids, builtin:tiny-llama, adapter "
        "folders written by finetune.py (evaluated on their recorded base without merging), or GGUF files that "
        "merge.py --gguf wrote in a merged folder (read by transformers). One row each, in this order.",
    ),
    Flag(
        "suite",
        "openllm",
        str,
        "openllm (ARC 25-shot acc_norm, HellaSwag 10-shot acc_norm, MMLU 5-shot acc, TruthfulQA 0-shot mc2, "
        "Winogrande 5-shot acc, GSM8K 5-shot exact match, and their average), kobest (COPA, HellaSwag, BoolQ, "
        "SentiNeg: macro F1 at 0, 5, 10 and 50 shots), toolcalls (the quick start's held-out requests, bundled "
        "and offline: exact match of the tool call), arithmetic (held-out questions of the bundled preference "
        "pairs: answers stating 'The answer is N.' with the right N), or comma-separated harness task names.",
    ),
    Flag(
        "num_fewshot",
        None,
        str,
        "Shot count(s) for a task list, e.g. 5 or 0,5,10 (a table per task, a column per shot count); "
        "default: each task's own. With openllm or kobest it replaces the published shots (a note says so).",
    ),
    Flag(
        "limit",
        None,
        float,
        "Evaluate only the first N examples of each task (or a fraction below 1): for quick checks; the "
        "scores are then not comparable with published ones.",
    ),
    Flag(
        "include_path",
        None,
        str,
        "Folder of local tasks in lm-eval's YAML format (used first, then the harness's built-in tasks). Task "
        "files are programs, not data: one that names Python code (!function) is refused unless "
        "--trust_task_code.",
    ),
    Flag(
        "show_answers",
        0,
        int,
        "Print the first N prompts of each task with every model's answer and whether it scored; all answers "
        "go to <output_dir>/<model>/<shots>-shot-samples.json.",
    ),
    Flag(
        "output_dir",
        "./outputs/eval",
        str,
        "Where the results JSON per model and the tables (results.md) go.",
    ),
    Flag(
        "batch_size",
        "auto",
        str,
        "auto (the harness finds the largest that fits on a CUDA GPU; 8 on CPU and mps, where its full-length "
        "probe would take minutes) or a number.",
    ),
    Flag(
        "device",
        "auto",
        str,
        "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps.",
    ),
    Flag(
        "load_4bit",
        None,
        bool,
        "Load models in 4-bit NF4. Default: adapters on their base quantized as in training (their scores are "
        "those of the trained adapter), other models unquantized; True or False applies to every model.",
    ),
    Flag(
        "apply_chat_template",
        False,
        bool,
        "Format every prompt as each model was trained (its run_config.json: the chat template finetune.py's "
        "--chat_template recorded, or its prompt template written as a chat template; a model without one: its "
        "tokenizer's own), as a chat model is used; the published tables were scored without one.",
    ),
    Flag(
        "system_instruction",
        None,
        str,
        "A system message put before every prompt (in the chat template's system turn with "
        "--apply_chat_template, else as the prompt's first line).",
    ),
    Flag(
        "fewshot_as_multiturn",
        None,
        bool,
        "With --apply_chat_template, give the few-shot examples as earlier user/assistant turns (default: "
        "yes, as lm-eval does) instead of one user turn.",
    ),
    Flag(
        "trust_remote_code",
        False,
        bool,
        "Allow model code from the hub (not for adapters in --models: their base is named by a received file).",
    ),
    Flag(
        "trust_task_code",
        False,
        bool,
        "Run the Python code that --include_path's task files name (!function): only for a folder you trust.",
    ),
)


@declared(FLAGS)
def main(**flags):
    """Evaluate each model on a suite and print its table."""
    stages.require_harness()
    problems = stages.check_flags(flags)  # no I/O
    # one failure for every flag, model and task problem, before any weight loads
    run = stages.resolve(flags, problems)
    eval_config = stages.describe_run(run)
    stages.quiet_harness()
    runs_by_model = {}
    for model in run.models:
        runs_by_model[model["label"]] = stages.evaluate_model(model, run)
    stages.report(run, runs_by_model, eval_config)


if __name__ == "__main__":
    cli.run(main)
