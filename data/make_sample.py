"""Regenerate data/sample_platypus.json, the project's own sample instruction set.

    python data/make_sample.py            # writes data/sample_platypus.json

STEM and logic questions in the Alpaca format, in the spirit of Open-Platypus: every
answer is computed here, so it is correct by construction. Some rows carry an `input`,
some are in Korean. The output is deterministic (fixed seed), so the file in the
repository is exactly what this script writes.
"""

import json
import math
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "sample_platypus.json"

ATOMIC_MASS = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "Na": 22.990, "Cl": 35.45, "S": 32.06}
MOLECULES = {
    "H2O": {"H": 2, "O": 1},
    "CO2": {"C": 1, "O": 2},
    "CH4": {"C": 1, "H": 4},
    "NH3": {"N": 1, "H": 3},
    "NaCl": {"Na": 1, "Cl": 1},
    "H2SO4": {"H": 2, "S": 1, "O": 4},
    "C2H6": {"C": 2, "H": 6},
    "O2": {"O": 2},
    "N2": {"N": 2},
    "C6H12O6": {"C": 6, "H": 12, "O": 6},
}
SYLLOGISMS = [
    (
        "All mammals are animals. All whales are mammals.",
        "Are all whales animals?",
        "Yes. Whales are mammals and every mammal is an animal, so every whale is an animal.",
    ),
    (
        "All squares are rectangles. Some rectangles are not squares.",
        "Are all rectangles squares?",
        "No. The second statement says some rectangles are not squares.",
    ),
    (
        "If it rains, the ground gets wet. The ground is not wet.",
        "Did it rain?",
        "No. If it had rained the ground would be wet; it is not wet, so it did not rain (modus tollens).",
    ),
    (
        "Every prime greater than 2 is odd. 17 is a prime greater than 2.",
        "Is 17 odd?",
        "Yes. 17 is a prime greater than 2, and every such prime is odd.",
    ),
    (
        "No reptiles are mammals. All snakes are reptiles.",
        "Can a snake be a mammal?",
        "No. Every snake is a reptile and no reptile is a mammal.",
    ),
    (
        "If a number is divisible by 6, it is divisible by 3. 48 is divisible by 6.",
        "Is 48 divisible by 3?",
        "Yes. 48 is divisible by 6, so it is divisible by 3 (48 = 3 x 16).",
    ),
]
FACTS = [
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    (
        "What is the boiling point of water at sea level in degrees Celsius?",
        "Water boils at 100 degrees Celsius at sea level.",
    ),
    ("What is the speed of light in vacuum?", "The speed of light in vacuum is 299,792,458 metres per second."),
    ("What is the derivative of x^2?", "The derivative of x^2 is 2x."),
    ("What is the integral of 2x dx?", "The integral of 2x dx is x^2 + C."),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides."),
    (
        "What is the sum of the interior angles of a triangle?",
        "The interior angles of a triangle add up to 180 degrees.",
    ),
    ("What is Newton's second law?", "Newton's second law states that force equals mass times acceleration: F = m a."),
    ("What gas do plants absorb during photosynthesis?", "Plants absorb carbon dioxide (CO2) during photosynthesis."),
    ("What is the atomic number of carbon?", "The atomic number of carbon is 6."),
    ("What is the value of pi to four decimal places?", "Pi to four decimal places is 3.1416."),
    ("What is the square root of 144?", "The square root of 144 is 12."),
]
FACTS_KO = [
    ("물의 끓는점은 섭씨 몇 도입니까?", "물은 해수면 기압에서 섭씨 100도에서 끓습니다."),
    ("삼각형의 내각의 합은 얼마입니까?", "삼각형의 내각의 합은 180도입니다."),
    ("금의 원소 기호는 무엇입니까?", "금의 원소 기호는 Au입니다."),
    ("뉴턴의 제2법칙을 설명하세요.", "힘은 질량과 가속도의 곱과 같습니다: F = m a."),
    ("x^2의 도함수는 무엇입니까?", "x^2의 도함수는 2x입니다."),
    ("육각형은 변이 몇 개입니까?", "육각형은 변이 6개입니다."),
]


def is_prime(n):
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def arithmetic(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    if rng.random() < 0.5:
        return {
            "instruction": "Compute the value of the expression.",
            "input": f"{a} {op} {b}",
            "output": f"{a} {op} {b} = {value}.",
        }
    return {"instruction": f"What is {a} {op} {b}?", "input": "", "output": f"{a} {op} {b} = {value}."}


def word_problem(rng):
    boxes, per_box, eaten = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 5)
    total = boxes * per_box - eaten
    return {
        "instruction": f"A shop has {boxes} boxes with {per_box} apples each. {eaten} apples are sold. "
        "How many apples are left?",
        "input": "",
        "output": f"There are {boxes} x {per_box} = {boxes * per_box} apples. "
        f"After selling {eaten}, {boxes * per_box} - {eaten} = {total} apples are left.",
    }


def molar_mass(rng):
    name = rng.choice(sorted(MOLECULES))
    parts = MOLECULES[name]
    terms = " + ".join(f"{n} x {ATOMIC_MASS[el]}" for el, n in parts.items())
    mass = sum(n * ATOMIC_MASS[el] for el, n in parts.items())
    return {
        "instruction": "Calculate the molar mass of the molecule in g/mol.",
        "input": name,
        "output": f"{name}: {terms} = {mass:.2f} g/mol.",
    }


def force(rng):
    m, a = rng.randint(1, 50), rng.randint(1, 20)
    return {
        "instruction": f"A body of mass {m} kg accelerates at {a} m/s^2. What net force acts on it?",
        "input": "",
        "output": f"By Newton's second law, F = m a = {m} kg x {a} m/s^2 = {m * a} N.",
    }


def circle(rng):
    r = rng.randint(1, 20)
    return {
        "instruction": f"What is the area of a circle with radius {r} cm?",
        "input": "",
        "output": f"A = pi r^2 = pi x {r}^2 = {math.pi * r * r:.2f} cm^2.",
    }


def prime(rng):
    n = rng.randint(20, 200)
    if is_prime(n):
        why = f"{n} has no divisor between 2 and {math.isqrt(n)}, so it is prime."
    else:
        d = next(d for d in range(2, n) if n % d == 0)
        why = f"{n} = {d} x {n // d}, so it is not prime."
    return {"instruction": f"Is {n} a prime number?", "input": "", "output": ("Yes. " if is_prime(n) else "No. ") + why}


def gcd(rng):
    a, b = rng.randint(12, 180), rng.randint(12, 180)
    return {
        "instruction": "Find the greatest common divisor of the two numbers.",
        "input": f"{a} and {b}",
        "output": f"gcd({a}, {b}) = {math.gcd(a, b)}.",
    }


def sequence(rng):
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    seq = [start + i * step for i in range(5)]
    return {
        "instruction": "What is the next number in the sequence?",
        "input": ", ".join(map(str, seq)),
        "output": f"The sequence adds {step} each time, so the next number is {seq[-1] + step}.",
    }


def convert(rng):
    km = rng.randint(1, 90)
    return {
        "instruction": f"Convert {km} kilometres to metres.",
        "input": "",
        "output": f"1 km = 1000 m, so {km} km = {km * 1000} m.",
    }


def korean_sum(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {
        "instruction": "다음 두 수의 합을 구하시오.",
        "input": f"{a}, {b}",
        "output": f"{a} + {b} = {a + b} 입니다.",
    }


def korean_area(rng):
    w, h = rng.randint(2, 30), rng.randint(2, 30)
    return {
        "instruction": f"가로 {w}cm, 세로 {h}cm인 직사각형의 넓이는 얼마입니까?",
        "input": "",
        "output": f"넓이는 가로 x 세로 = {w} x {h} = {w * h} cm^2 입니다.",
    }


GENERATORS = [
    arithmetic,
    word_problem,
    molar_mass,
    force,
    circle,
    prime,
    gcd,
    sequence,
    convert,
    korean_sum,
    korean_area,
]


def build(rows_per_generator=20, seed=0):
    rng = random.Random(seed)
    rows = []
    for context, question, answer in SYLLOGISMS:
        rows.append({"instruction": question, "input": context, "output": answer, "data_source": "logic"})
    for question, answer in FACTS:
        rows.append({"instruction": question, "input": "", "output": answer, "data_source": "facts"})
    for question, answer in FACTS_KO:
        rows.append({"instruction": question, "input": "", "output": answer, "data_source": "facts_ko"})
    for gen in GENERATORS:
        for _ in range(rows_per_generator):
            rows.append({**gen(rng), "data_source": gen.__name__})
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    rows = build()
    OUT.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} rows to {OUT}")
