"""The training objective: what a row becomes for the model, how examples are batched, which Trainer
computes the loss. The recipe (platy/train/recipe.py) runs the same stages for every objective and asks
its objective for these three; a second objective (preference pairs, say) is a second class here.
"""

from platy.cli import UserError, say


class Supervised:
    """Supervised fine-tuning: each row is a prompt and a response as token ids, with labels on the response
    (and its end of turn) only, unless --train_on_inputs; the loss is the model's next-token cross-entropy
    over the labels. Batches are padded (labels padded with -100), or packed rows put end to end."""

    name = "sft"

    def datasets(self, run, tokenizer, chat):
        """Tokenized (and, with --packing, packed) train and val sets, and what was done to them."""
        from platy.data.cache import tokenized_splits
        from platy.data.examples import ExampleTokenizer

        example_tokenizer = ExampleTokenizer(
            tokenizer,
            run.prompter,
            run.cutoff_len,
            run.train_on_inputs,
            run.add_eos_token,
            chat_template=chat,
        )
        splits, (where, folder) = tokenized_splits(
            {"train": run.train_rows, "val": run.val_rows},
            example_tokenizer,
            run.data_fingerprint,
            {"seed": run.seed, "val_set_size": run.val_set_size},
            use_cache=run.cache_tokens,
        )
        (train_set, train_stats), (val_set, val_stats) = splits["train"], splits["val"]
        if folder is not None:
            say(
                f"Tokenized data: {'loaded from the cache' if where == 'cache' else 'tokenized and cached'} in {folder}"
            )
        elif not run.cache_tokens:
            say("Tokenized data: tokenized in memory, not cached (--cache_tokens false)")
        check_examples_left(run, train_set, val_set)
        stats = {"path": run.data_path, "fingerprint": run.data_fingerprint, "train": train_stats, "val": val_stats}
        dropped = train_stats["dropped_cut_away"] + val_stats["dropped_cut_away"]
        say(
            f"Data: {len(run.rows)} rows from {run.data_path}; {len(train_set)} train, "
            f"{0 if val_set is None else len(val_set)} held out; {train_stats['truncated'] + val_stats['truncated']} "
            f"cut at cutoff_len {run.cutoff_len}; {dropped} dropped (response cut away entirely); "
            f"{train_stats['label_tokens']:,} response tokens (labels) per epoch"
        )
        if run.packing:
            train_set, val_set = pack(run, train_set, val_set, stats)
        return train_set, val_set, stats

    def collator(self, run, tokenizer):
        import transformers

        from platy.data.examples import IGNORE_INDEX
        from platy.data.packing import PackedCollator

        if run.packing:
            return PackedCollator()
        return transformers.DataCollatorForSeq2Seq(
            tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True, label_pad_token_id=IGNORE_INDEX
        )

    def trainer_class(self):
        """The Trainer subclass that trains this objective (the model's own loss on the labels)."""
        from platy.train.trainer import Trainer

        return Trainer


def check_examples_left(run, train_set, val_set):
    if train_set is None or len(train_set) == 0:
        raise UserError(
            f"{run.data_path}: no training example keeps any response token within --cutoff_len "
            f"{run.cutoff_len}; raise --cutoff_len or shorten the prompts"
        )
    if val_set is not None and len(val_set) == 0:
        raise UserError(
            f"--val_set_size {run.val_set_size}: every held-out example was cut away by "
            f"--cutoff_len {run.cutoff_len}; raise --cutoff_len"
        )


def pack(run, train_set, val_set, stats):
    """Packed train and val sets; their packing figures go into stats."""
    from platy.data.packing import pack_dataset

    train_set, stats["train_packing"] = pack_dataset(train_set, run.pack_budget)
    val_set, stats["val_packing"] = pack_dataset(val_set, run.pack_budget)
    packing = stats["train_packing"]
    say(
        f"Packing: {packing['examples']} training examples in {packing['packed_rows']} rows of up to "
        f"{run.pack_budget} tokens ({100 * packing['fill']:.1f}% filled); batch_size {run.batch_size} "
        "and micro_batch_size count these rows"
    )
    return train_set, val_set
