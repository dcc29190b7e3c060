"""The quick start's held-out score of a base model, and of an adapter trained on it.

    python bench/heldout_score.py --base_model builtin:smollm2-135m --lora_weights ./lora-alpaca \
        --heldout data/toolcalls/heldout.json --result_file score.json

Each held-out request is answered greedily by the toolkit's own generation (inference.py's), prompted
in the Alpaca template the quick start trains with, and scored by EXACT_MATCH: the answer's first line
equals the expected tool call with spaces ignored (evaluate.py's toolcalls task applies the same rule
through lm-eval). The base is scored without the adapter, then with it, on the same rows.
"""

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EXACT_MATCH = "the answer's first line equals the expected output, spaces ignored"
MAX_NEW_TOKENS = 48  # the longest tool call of the task is about 30 tokens


def exact_match(answer, expected):
    """EXACT_MATCH for one answer: generation stops at the first newline, and spaces do not count."""
    first_line = answer.split("\n", 1)[0]
    return first_line.replace(" ", "") == expected.replace(" ", "")


def main(base_model="builtin:tiny-llama", lora_weights=None, heldout=None, rows=None, result_file=None):
    """Args:
    base_model: The base model (a folder, a hub id or builtin:NAME).
    lora_weights: The adapter trained on it; without one only the base is scored.
    heldout: The held-out rows (instruction, input, output), JSON.
    rows: Score the first ROWS rows only (default: all).
    result_file: Write the scores as JSON there too.
    """
    held = json.loads(Path(heldout).read_text(encoding="utf-8"))[:rows]
    scores = {"rows": len(held), "rule": EXACT_MATCH}
    scores["base"] = score(base_model, None, held)
    if lora_weights:
        scores["adapter"] = score(base_model, lora_weights, held)
    for name in ("base", "adapter"):
        if name in scores:
            s = scores[name]
            print(f"{name}: {s['correct']}/{len(held)} exact ({s['seconds']:.1f} s); first answer: {s['first']!r}")
    if result_file:
        from platy.files import write_json

        write_json(Path(result_file), scores)


def score(base_model, lora_weights, held):
    """{correct, seconds, first} of one model on the held-out rows, answered in one batch."""
    from platy import cli, inference_stages

    flags = {
        **cli.entry_defaults(cli.script_entry("inference")),
        "base_model": base_model,
        "lora_weights": lora_weights,
        "prompt": "x",
        "prompt_template": "alpaca",
        "chat_template": False,  # the quick start trains with the Alpaca template: the base answers the same prompt
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch_size": len(held),
        "seed": 0,
    }
    generator = inference_stages.prepare(flags)
    started = time.perf_counter()
    answers = generator.generate([{"instruction": r["instruction"], "input": r.get("input", "")} for r in held])
    seconds = time.perf_counter() - started
    correct = sum(exact_match(a, r["output"]) for a, r in zip(answers, held))
    return {"correct": correct, "seconds": round(seconds, 2), "first": answers[0] if answers else ""}


if __name__ == "__main__":
    import fire

    from platy import cli

    cli.quiet_libraries()
    fire.Fire(main)
