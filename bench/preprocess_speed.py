"""Tokenization of 25,000 synthetic Open-Platypus-like rows: finetune.py's path against the original one.

    python bench/preprocess_speed.py                 # 25,000 rows, cutoff_len 4096
    python bench/preprocess_speed.py --rows 5000

Three timings on the same rows, with the embedded tiny model's tokenizer (a sentencepiece
BPE like Llama's; offline):
  original: per example, two passes, as the original Platypus scripts do it: Dataset.map
            one row at a time, tokenize prompt + response, then tokenize the prompt again
            to count the tokens to mask;
  cold:     this toolkit, first run: batched tokenization (platy.data.tokenize_rows) and
            writing the cache entry (platy.tokencache);
  cached:   this toolkit, second run or another DDP rank: the cache entry loaded.
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import synthetic_rows  # noqa: E402

from platy.cli import run, say  # noqa: E402

IGNORE_INDEX = -100


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


def main(rows: int = 25000, cutoff_len: int = 4096, seed: int = 0):
    """Args:
        rows: Synthetic rows to tokenize.
        cutoff_len: Longest example in tokens.
        seed: Seed of the synthetic rows.
    """
    from transformers import AutoTokenizer

    from platy import tiny
    from platy.data import ExampleTokenizer, prepare_tokenizer
    from platy.prompts import Prompter
    from platy.tokencache import tokenized_splits

    data = synthetic_rows(rows, seed)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny.ensure_model()))
    prompter = Prompter("alpaca")
    example_tokenizer = ExampleTokenizer(tokenizer, prompter, cutoff_len)
    times = {}
    started = time.perf_counter()
    original = original_path(data, tokenizer, prompter, cutoff_len)
    times["original"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as root:
        results = []
        for run_name in ("cold", "cached"):
            started = time.perf_counter()
            splits, (where, _) = tokenized_splits({"train": data}, example_tokenizer, f"bench:{rows}:{seed}", {},
                                                  root=root)
            times[run_name] = time.perf_counter() - started
            results.append(splits["train"][0]["input_ids"])
        assert where == "cache" and results[0] == results[1], "the cached entry differs from the tokenized one"
    tokens = sum(len(ids) for ids in original["input_ids"])
    say(f"{rows:,} rows, {tokens:,} tokens (original path's count), cutoff_len {cutoff_len}")
    say("| path | seconds | rows/s | speed-up |\n| --- | --- | --- | --- |")
    for name in ("original", "cold", "cached"):
        say(f"| {name} | {times[name]:.2f} | {rows / times[name]:,.0f} | {times['original'] / times[name]:.1f}x |")


if __name__ == "__main__":
    run(main)
