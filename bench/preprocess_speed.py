"""Tokenization of 25,000 synthetic Open-Platypus-like rows: finetune.py's path against the original one.

    python bench/preprocess_speed.py                 # 25,000 rows, cutoff_len 4096, median of 3 runs
    python bench/preprocess_speed.py --rows 5000 --repeats 1

Timings on the same rows, with the embedded tiny model's tokenizer (a sentencepiece BPE like
Llama's; offline), each the median of --repeats runs:
  original:  per example, two passes, as the original Platypus scripts do it: Dataset.map one
             row at a time, tokenize prompt + response, then tokenize the prompt again to
             count the tokens to mask;
  two-pass:  this toolkit's batched path made to take the same two passes (for tokenizers
             whose vocabulary could join the prompt's end to the response);
  cold:      this toolkit, first run: each prompt and response tokenized once, batched on all
             cores, Arrow columns built and the cache entry written (platy/data/cache.py);
  cached:    this toolkit, second run or another DDP rank: the cache entry loaded.
Every path's ids and labels are checked equal to the original's (less the examples whose prompt
fills cutoff_len, which this toolkit drops) before the table is printed.
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from platy.cli import run, say  # noqa: E402
from platy.data.examples import IGNORE_INDEX  # noqa: E402
from platy.flags import from_signature  # noqa: E402

from synthetic import synthetic_rows  # noqa: E402


def original_path(rows, tokenizer, prompter, cutoff_len):
    """Per-example two-pass tokenization as in the original scripts (their masking, not ours)."""
    import datasets

    def tokenize(text, add_eos):
        result = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)
        ids = result["input_ids"]
        if add_eos and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
            ids.append(tokenizer.eos_token_id)
            result["attention_mask"].append(1)
        result["labels"] = list(ids)
        return result

    def one_row(row):
        full = tokenize(prompter.generate_prompt(row["instruction"], row["input"], row["output"]), True)
        user_len = len(tokenize(prompter.generate_prompt(row["instruction"], row["input"]), False)["input_ids"])
        full["labels"] = [IGNORE_INDEX] * user_len + full["labels"][user_len:]
        return full

    ds = datasets.Dataset.from_list(rows)
    return ds.map(one_row, remove_columns=ds.column_names, load_from_cache_file=False, desc="original per-example")


def kept_examples(original):
    """The original path's ids and labels without the examples whose prompt fills cutoff_len (every label
    masked): the original scripts train on those with no target; this toolkit drops and counts them."""
    kept = [
        (ids, labels)
        for ids, labels in zip(original["input_ids"], original["labels"])
        if any(label != IGNORE_INDEX for label in labels)
    ]
    return [ids for ids, _ in kept], [labels for _, labels in kept]


def main(rows: int = 25000, cutoff_len: int = 4096, seed: int = 0, repeats: int = 3):
    """Args:
    rows: Synthetic rows to tokenize.
    cutoff_len: Longest example in tokens.
    seed: Seed of the synthetic rows.
    repeats: Runs of each path; the table gives the median.
    """
    import statistics

    from transformers import AutoTokenizer

    from platy import tiny
    from platy.data.cache import tokenized_splits
    from platy.data.examples import ExampleTokenizer, prepare_tokenizer
    from platy.prompts import Prompter

    data = synthetic_rows(rows, seed)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny.ensure_model()))
    prompter = Prompter("alpaca")
    two_pass = ExampleTokenizer(tokenizer, prompter, cutoff_len)
    two_pass.clean = lambda char: False  # as for a tokenizer that could join the prompt's end to the response
    toolkit = {"two-pass": two_pass, "cold": ExampleTokenizer(tokenizer, prompter, cutoff_len)}
    times = {name: [] for name in ("original", "two-pass", "cold", "cached")}
    expected = None
    for _ in range(repeats):
        started = time.perf_counter()
        original = original_path(data, tokenizer, prompter, cutoff_len)
        times["original"].append(time.perf_counter() - started)
        expected = expected or kept_examples(original)  # the same every repeat: read once
        for name, example_tokenizer in toolkit.items():
            with tempfile.TemporaryDirectory() as root:
                runs = ("cold", "cached") if name == "cold" else (name,)
                for run_name in runs:
                    started = time.perf_counter()
                    splits, (where, _) = tokenized_splits(
                        {"train": data}, example_tokenizer, f"bench:{rows}:{seed}", {}, root=root
                    )
                    times[run_name].append(time.perf_counter() - started)
                    train = splits["train"][0]
                    assert (train["input_ids"], train["labels"]) == expected, (
                        f"{run_name}: the ids or labels differ from the original path's"
                    )
                assert where == ("cache" if name == "cold" else "tokenized")
    tokens = sum(len(ids) for ids in original["input_ids"])
    say(f"{rows:,} rows, {tokens:,} tokens, cutoff_len {cutoff_len}; median of {repeats} run(s)")
    say("| path | seconds | rows/s | speed-up | all runs (s) |\n| --- | --- | --- | --- | --- |")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in median.items():
        runs = ", ".join(f"{value:.2f}" for value in times[name])
        say(f"| {name} | {seconds:.2f} | {rows / seconds:,.0f} | {median['original'] / seconds:.1f}x | {runs} |")


if __name__ == "__main__":
    run(from_signature(main))
