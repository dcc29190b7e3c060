"""Regenerate data/sample_preference.json, the project's own sample preference set.

    python data/make_preference.py        # writes data/sample_preference.json

Arithmetic and unit questions, each with a chosen answer that works the result out and ends with
"The answer is N." and a rejected one that hedges and gives a wrong number: the preferred style
differs checkably (a final answer, and the right one). Computed here, deterministic (fixed seed), so
the file in the repository is exactly what this script writes. Rows use the three layouts
finetune.py --stage dpo reads: Alpaca (instruction), prompt, and messages.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "sample_preference.json"


def pairs(rng):
    for k in range(48):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        kind = k % 3
        if kind == 0:
            question, value, work = f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}."
        elif kind == 1:
            question, value, work = (
                f"What is {a} times {b % 9 + 2}?",
                a * (b % 9 + 2),
                f"{a} x {b % 9 + 2} = {a * (b % 9 + 2)}.",
            )
        else:
            question, value, work = f"How many minutes are in {a} hours?", 60 * a, f"{a} x 60 = {60 * a} minutes."
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 3]) * rng.randint(1, 4)
        chosen = f"{work} The answer is {value}."
        rejected = f"Hmm, maybe around {wrong}, but I am not sure."
        layout = k % 4
        if layout == 3:
            yield {"messages": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected}
        elif layout == 2:
            yield {"prompt": question, "chosen": chosen, "rejected": rejected}
        else:
            yield {"instruction": question, "input": "", "chosen": chosen, "rejected": rejected}


if __name__ == "__main__":
    rows = list(pairs(random.Random(7)))
    OUT.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(rows)} pairs")
