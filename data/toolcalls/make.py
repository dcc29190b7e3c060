"""Build the quick start's task: requests in plain words -> one tool call as JSON.

    python data/toolcalls/make.py     # writes data/toolcalls/train.json and heldout.json

Five tools; each request is one of a few phrasings filled with an entity (a city, a number, an item).
The held-out rows use entities that no training row has, in the trained phrasings, so a model scores
only by having learned the tools and their argument layout, not the rows. The answer is compact JSON
with keys in a fixed order; evaluate.py --suite toolcalls (toolcalls.yaml) scores it by exact match, spaces
ignored. Deterministic: the same files every time.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

CITIES = (
    "Lisbon Oslo Nairobi Lima Osaka Denver Krakow Dublin Hanoi Quito Perth Tunis Porto Seville Zurich "
    "Lagos Austin Bergen Cairo Leeds Malmo Gdansk Busan Cusco Accra Riga Vilnius Tbilisi Hobart Boise"
).split()
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "NOK", "INR")
ITEMS = (
    "milk eggs bread rice apples coffee butter onions lemons yogurt flour honey tea pasta cheese "
    "tomatoes garlic oats carrots beans spinach salt pepper soap batteries"
).split()
LISTS = ("shopping", "groceries", "packing", "hardware")
CONTACTS = "Maria Tom Aiko Omar Lena Ravi Sofia Jonas Mei Pedro Nora Ivan Chloe Hugo Zara Emil".split()

PHRASINGS = {
    "get_weather": (
        "What's the weather like in {city}?",
        "Will it rain in {city} today?",
        "Tell me the forecast for {city}.",
        "How warm is it in {city} right now?",
    ),
    "set_timer": (
        "Set a timer for {minutes} minutes.",
        "Remind me in {minutes} minutes.",
        "Start a {minutes} minute countdown.",
        "Wake me up in {minutes} minutes.",
    ),
    "convert_currency": (
        "How much is {amount} {source} in {target}?",
        "Convert {amount} {source} to {target}.",
        "What do {amount} {source} come to in {target}?",
        "I have {amount} {source}; how many {target} is that?",
    ),
    "add_to_list": (
        "Add {item} to my {list} list.",
        "Put {item} on the {list} list.",
        "Don't let me forget {item}: {list} list.",
        "My {list} list needs {item}.",
    ),
    "call_contact": (
        "Call {contact}.",
        "Phone {contact} for me.",
        "Give {contact} a ring.",
        "Start a call with {contact}.",
    ),
}


def arguments(tool, rng, pool):
    """Fill-ins for one request and the call's arguments, in the call's key order."""
    if tool == "get_weather":
        city = pool["city"].pop()
        return {"city": city}, {"city": city}
    if tool == "set_timer":
        minutes = rng.choice(pool["minutes"])
        return {"minutes": minutes}, {"minutes": minutes}
    if tool == "convert_currency":
        amount = rng.choice(pool["amount"])
        source, target = rng.sample(CURRENCIES, 2)
        return {"amount": amount, "source": source, "target": target}, {
            "amount": amount,
            "from": source,
            "to": target,
        }
    if tool == "add_to_list":
        item, name = pool["item"].pop(), rng.choice(LISTS)
        return {"item": item, "list": name}, {"item": item, "list": name}
    contact = pool["contact"].pop()
    return {"contact": contact}, {"name": contact}


def rows(rng, pool, per_tool):
    out = []
    for tool, phrasings in PHRASINGS.items():
        for i in range(per_tool):
            fill, args = arguments(tool, rng, pool)
            call = json.dumps({"name": tool, "arguments": args}, ensure_ascii=False)
            out.append({"instruction": phrasings[i % len(phrasings)].format(**fill), "input": "", "output": call})
    rng.shuffle(out)
    return out


def split_pools(rng):
    """Entities split once: the held-out rows draw from their own share of each pool."""
    shuffled = {
        "city": rng.sample(CITIES, len(CITIES)),
        "item": rng.sample(ITEMS, len(ITEMS)),
        "contact": rng.sample(CONTACTS, len(CONTACTS)),
    }
    minutes = [n for n in range(2, 91)]
    amounts = [n * 5 for n in range(1, 201)]
    rng.shuffle(minutes)
    rng.shuffle(amounts)
    held = {k: v[: len(v) // 4] for k, v in shuffled.items()}
    held |= {"minutes": minutes[:20], "amount": amounts[:50]}
    train = {k: v[len(v) // 4 :] for k, v in shuffled.items()}
    train |= {"minutes": minutes[20:], "amount": amounts[50:]}
    return train, held


def main():
    rng = random.Random(0)
    train_pool, held_pool = split_pools(rng)
    # pools of names are popped from: repeat them so every row gets one (entities then recur in training)
    for key in ("city", "item", "contact"):
        train_pool[key] = train_pool[key] * 4
        held_pool[key] = held_pool[key] * 2
    train = rows(rng, train_pool, per_tool=24)
    heldout = rows(rng, held_pool, per_tool=6)
    for name, data in (("train.json", train), ("heldout.json", heldout)):
        (HERE / name).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{name}: {len(data)} rows")


if __name__ == "__main__":
    main()
