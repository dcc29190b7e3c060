"""Speed of refine.py's stages on 25,000 synthetic Open-Platypus-like rows, beside a per-row loop.

    python bench/refine_speed.py                    # 25,000 rows, loop baseline on 4,000 of them
    python bench/refine_speed.py --rows 5000 --loop_rows 1000

Prints the time of exact dedup, embedding (all-MiniLM-L6-v2, no cache), the blocked near
dedup and decontamination searches and the search's share of the total, and the per-row
loop (each row compared with each kept row in turn, as a notebook would do it) on the same
embeddings. The loop runs on the first --loop_rows rows; its full-size time is extrapolated
from its time per comparison and the number of comparisons it would make on all rows
(counted exactly from the embeddings).
"""

import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from platy.cli import run
from platy.flags import from_signature
from platy.refining import (
    BUILTIN_EMBEDDING_MODEL,
    embed_texts,
    exact_duplicates,
    most_similar,
    near_duplicates,
    near_duplicates_loop,
    resolve_embedding_model,
    row_text,
)

SUBJECTS = [
    "a copper wire",
    "a falling stone",
    "an ideal gas",
    "a spring",
    "a pendulum",
    "a capacitor",
    "a prism",
    "a chemical reaction",
    "a sample of water",
    "a moving car",
    "a satellite",
    "a rolling ball",
    "a lens",
    "a triangle",
    "a circle",
    "a sequence",
    "a polynomial",
    "a matrix",
    "a random variable",
    "a graph",
    "a prime number",
    "a bank account",
    "a logic puzzle",
    "a protein",
    "a cell membrane",
    "a DNA strand",
]
QUANTITIES = [
    "mass",
    "speed",
    "energy",
    "pressure",
    "temperature",
    "area",
    "volume",
    "probability",
    "charge",
    "resistance",
    "frequency",
    "wavelength",
    "angle",
    "determinant",
    "derivative",
    "integral",
    "sum",
    "concentration",
    "half-life",
    "momentum",
    "torque",
    "entropy",
    "power",
    "density",
    "radius",
]
ASKS = [
    "Compute the {q} of {s} when its {q2} is {n} units.",
    "Explain why the {q} of {s} changes if the {q2} doubles.",
    "A student measures the {q} of {s} as {n}. What is its {q2}?",
    "Prove that the {q} of {s} cannot exceed {n} given its {q2}.",
    "Which is larger for {s}: the {q} or the {q2}, if both equal {n}?",
    "Estimate the {q} of {s} from a {q2} of {n} and explain each step.",
    "How does the {q2} of {s} affect its {q}? Give an example with {n}.",
]
CONTEXT = [
    "Assume standard conditions.",
    "Ignore friction.",
    "Give the answer to two decimal places.",
    "Show your reasoning step by step.",
    "Use SI units.",
    "Choose the best option: A, B, C or D.",
    "",
]


def vocabulary():
    """Whole English words of the embedding model's own vocabulary (offline, about 20,000)."""
    folder = Path(resolve_embedding_model(BUILTIN_EMBEDDING_MODEL))
    words = (folder / "vocab.txt").read_text(encoding="utf-8").split()
    return [w for w in words if w.isalpha() and w.isascii() and len(w) >= 4]


def synthetic_rows(n, words, seed=0):
    """STEM-style questions, mostly distinct as in Open-Platypus (a frame filled with a subject,
    quantities and topic words drawn from a large vocabulary), with about 4% exact repeats and
    4% light rewordings that near dedup must catch."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        roll = rng.random()
        if rows and roll < 0.04:
            rows.append(dict(rng.choice(rows), output="A longer answer. " * rng.randint(1, 4)))
            continue
        if rows and roll < 0.08:
            base = rng.choice(rows)
            rows.append(dict(base, instruction="Please answer: " + base["instruction"].lower()))
            continue
        q, q2 = rng.sample(QUANTITIES, 2)
        text = rng.choice(ASKS).format(q=q, q2=q2, s=rng.choice(SUBJECTS), n=rng.randint(2, 9999))
        topic = " ".join(rng.sample(words, rng.randint(4, 8)))
        text += f" Consider {topic}. " + " ".join(rng.sample(CONTEXT, 2))
        rows.append(
            {
                "instruction": text.strip(),
                "input": "",
                "output": f"The answer is {rng.randint(1, 99)}. " + "Reasoning follows. " * rng.randint(1, 30),
                "data_source": "synthetic",
            }
        )
    return rows


def loop_comparisons(embeddings, keep, threshold):
    """Comparisons the per-row loop makes on all rows: every kept row before a kept row, and for a
    dropped row the kept rows up to the first one above threshold."""
    kept_index = np.flatnonzero(keep)
    kept_vectors = embeddings[kept_index]
    total = 0
    for start in range(0, len(embeddings), 1024):
        rows = np.arange(start, min(start + 1024, len(embeddings)))
        before = np.searchsorted(kept_index, rows)  # kept rows with a smaller index
        sims = embeddings[rows] @ kept_vectors.T
        hits = (sims > threshold) & (np.arange(len(kept_index))[None, :] < before[:, None])
        first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, before)
        total += int(np.where(keep[rows], before, first).sum())
    return total


def main(
    rows: int = 25000, loop_rows: int = 4000, test_questions: int = 1000, threshold: float = 0.7, batch_size: int = 64
):
    import torch

    words = vocabulary()
    data = synthetic_rows(rows, words=words)
    tests = [row_text(r) for r in synthetic_rows(test_questions, seed=1, words=words)]
    print(
        f"{rows:,} synthetic rows, {test_questions:,} test questions, threshold {threshold}, "
        f"{torch.get_num_threads()} torch threads"
    )

    started = time.perf_counter()
    kept, _ = exact_duplicates(data)
    exact_s = time.perf_counter() - started
    data = [data[i] for i in kept]

    model = resolve_embedding_model(BUILTIN_EMBEDDING_MODEL)
    started = time.perf_counter()
    embeddings, _ = embed_texts([row_text(r) for r in data], model, None, batch_size)
    test_embeddings, _ = embed_texts(tests, model, None, batch_size)
    embed_s = time.perf_counter() - started

    started = time.perf_counter()
    keep, _, _ = near_duplicates(embeddings, threshold)
    near_s = time.perf_counter() - started
    started = time.perf_counter()
    most_similar(embeddings[keep], test_embeddings)
    decontaminate_s = time.perf_counter() - started

    subset = embeddings[:loop_rows]
    started = time.perf_counter()
    loop_keep, loop_done = near_duplicates_loop(subset, threshold)
    loop_s = time.perf_counter() - started
    assert np.array_equal(loop_keep, near_duplicates(subset, threshold)[0]), "the loop disagrees"
    full_comparisons = loop_comparisons(embeddings, keep, threshold)
    loop_full_s = loop_s / max(loop_done, 1) * full_comparisons

    search_s = near_s + decontaminate_s
    total = exact_s + embed_s + search_s
    print(f"exact dedup:           {exact_s:8.2f} s   ({rows - len(data):,} repeats dropped; goal < 2 s)")
    print(f"embedding:             {embed_s:8.2f} s   ({len(data) + len(tests):,} texts, no cache)")
    print(f"near dedup (blocked):  {near_s:8.2f} s   ({int((~keep).sum()):,} dropped)")
    print(f"decontaminate search:  {decontaminate_s:8.2f} s")
    print(
        f"similarity search:     {search_s:8.2f} s = {100 * search_s / total:.1f}% of the total "
        f"{total:.1f} s (goal < 10%)"
    )
    print(
        f"per-row loop near dedup, first {loop_rows:,} rows: {loop_s:.2f} s for {loop_done:,} comparisons "
        f"(same result as the blocked search: yes)"
    )
    print(
        f"per-row loop near dedup, all {len(data):,} rows: ~{loop_full_s:.0f} s (extrapolated from "
        f"{full_comparisons:,} comparisons) = {loop_full_s / near_s:.0f}x the blocked search"
    )


if __name__ == "__main__":
    run(from_signature(main))
