"""Regenerate data/sample_preference.json, the project's own sample preference set, and the held-out
questions of data/arithmetic (evaluate.py --suite arithmetic).

    python data/make_preference.py        # writes both files

Arithmetic and unit questions, each with a chosen answer that works the result out and ends with
"The answer is N." and a rejected one that hedges and gives a wrong number: the preferred style
differs checkably (a final answer, and the right one). Computed here, deterministic (fixed seed), so
the file in the repository is exactly what this script writes. Rows use the three layouts
finetune.py --stage dpo reads: Alpaca (instruction), prompt, and messages.

The held-out questions are drawn the same way from another seed, none of them a training question;
each row keeps the number the chosen style ends with ("The answer is N.") as its target.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "sample_preference.json"
HELDOUT = HERE / "arithmetic" / "heldout.json"


def question(rng, kind):
    """A question of one of three kinds, its answer, and the working that leads to it."""
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    if kind == 0:
        return f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}."
    if kind == 1:
        m = b % 9 + 2
        return f"What is {a} times {m}?", a * m, f"{a} x {m} = {a * m}."
    return f"How many minutes are in {a} hours?", 60 * a, f"{a} x 60 = {60 * a} minutes."


def pairs(rng):
    for k in range(48):
        question_text, value, work = question(rng, k % 3)
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 3]) * rng.randint(1, 4)
        chosen = f"{work} The answer is {value}."
        rejected = f"Hmm, maybe around {wrong}, but I am not sure."
        layout = k % 4
        if layout == 3:
            yield {"messages": [{"role": "user", "content": question_text}], "chosen": chosen, "rejected": rejected}
        elif layout == 2:
            yield {"prompt": question_text, "chosen": chosen, "rejected": rejected}
        else:
            yield {"instruction": question_text, "input": "", "chosen": chosen, "rejected": rejected}


def prompt_of(pair):
    return pair.get("instruction") or pair.get("prompt") or pair["messages"][-1]["content"]


def heldout(rng, trained, count=30):
    rows, seen = [], set(trained)
    while len(rows) < count:
        question_text, value, _ = question(rng, len(rows) % 3)
        if question_text not in seen:
            seen.add(question_text)
            rows.append({"instruction": question_text, "input": "", "output": str(value)})
    return rows


def write(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    rows = list(pairs(random.Random(7)))
    write(OUT, rows)
    print(f"{OUT}: {len(rows)} pairs")
    questions = heldout(random.Random(8), [prompt_of(pair) for pair in rows])
    write(HELDOUT, questions)
    print(f"{HELDOUT}: {len(questions)} held-out questions")
