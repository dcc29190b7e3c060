"""Synthetic instruction rows with an Open-Platypus-like length spread, for the benchmarks.

Open-Platypus is mostly short STEM questions with answers of a few hundred tokens and a
long tail of multi-thousand-token ones; the lognormal word counts below give that shape
(median instruction about 45 words, median answer about 110, a few rows past 2,000).
"""

import math
import random

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "sa",
    "ti",
    "vo",
    "pe",
    "gra",
    "stu",
    "ion",
    "ent",
    "al",
    "or",
    "the",
    "and",
    "com",
    "pro",
    "tion",
    "er",
    "in",
    "de",
    "ma",
    "ter",
    "co",
    "di",
    "ex",
    "pre",
    "qu",
]


def words(rng, n):
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def word_count(rng, median, sigma, cap):
    return max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma))))


def synthetic_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        rows.append(
            {
                "instruction": words(rng, word_count(rng, 45, 0.8, 1500)) + "?",
                "input": words(rng, word_count(rng, 20, 1.0, 400)) if rng.random() < 0.2 else "",
                "output": words(rng, word_count(rng, 110, 1.0, 2500)) + ".",
            }
        )
    return rows
