"""The training objective: what a row becomes for the model, how examples are batched, which Trainer
computes the loss, and what it needs from the loaded model (prepare). The recipe (platy/train/recipe.py) runs
the same stages for every objective and asks its objective for these: Supervised (--stage sft) and Preference
(--stage dpo, ipo, simpo, orpo).
"""

import time

from platy.cli import UserError, say


def objective_of(run):
    """The objective --stage names."""
    if run.stage == "sft":
        return Supervised()
    return Preference(run.stage, run.beta, run.simpo_gamma, run.precision)


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

    def prepare(self, run, start, tokenizer, train_set, val_set, record):
        """What the objective adds once the model is loaded: nothing for supervised training."""
        return train_set, val_set


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


class Preference:
    """Preference tuning (--stage dpo, ipo, simpo or orpo): each row is a prompt with a chosen and a rejected
    answer, both rendered as a supervised row with that answer would be; batches hold both answers of each
    pair; the loss compares their log-probs (platy/train/preference.py), for dpo and ipo against the
    reference's, computed once before training and cached."""

    def __init__(self, stage, beta, simpo_gamma, precision):
        self.name, self.beta, self.simpo_gamma, self.precision = stage, beta, simpo_gamma, precision
        self.reference_seconds = 0.0

    def datasets(self, run, tokenizer, chat):
        """The tokenized train and val pairs, and their stats; cut pairs are counted and reported."""
        from platy.data.pairs import PairTokenizer, tokenize_pairs

        pair_tokenizer = PairTokenizer(tokenizer, run.prompter, run.cutoff_len, run.add_eos_token, chat_template=chat)
        train_set, train_stats = tokenize_pairs(run.train_rows, pair_tokenizer, run.data_path)
        val_set, val_stats = tokenize_pairs(run.val_rows, pair_tokenizer, run.data_path)
        cut = train_stats["answers_cut_at_cutoff_len"] + val_stats["answers_cut_at_cutoff_len"]
        stripped = train_stats["end_of_turn_text_removed"] + val_stats["end_of_turn_text_removed"]
        say(
            f"Preference data: {len(run.rows)} pairs from {run.data_path}; {len(train_set)} train, "
            f"{0 if val_set is None else len(val_set)} held out; {cut} answers cut at cutoff_len {run.cutoff_len}"
            + (f"; {stripped} answers lost an end-of-turn text of their own (the template adds it)" if stripped else "")
        )
        stats = {"path": run.data_path, "fingerprint": run.data_fingerprint, "train": train_stats, "val": val_stats}
        return train_set, val_set, stats

    def collator(self, run, tokenizer):
        from platy.train.preference import PairCollator

        return PairCollator(tokenizer.pad_token_id)

    def trainer_class(self):
        """The Trainer subclass that computes the preference loss, with this stage's knobs bound."""
        import functools

        from platy.train.preference import PreferenceTrainer

        return functools.partial(
            PreferenceTrainer, stage=self.name, beta=self.beta, simpo_gamma=self.simpo_gamma, precision=self.precision
        )

    def prepare(self, run, start, tokenizer, train_set, val_set, record):
        """The policy's dropout turned off, and (dpo, ipo) the reference's log-probs of every pair added to the
        data sets: read from the cache, or computed now and cached; the record names the reference."""
        from platy.train.preference import (
            WITH_REFERENCE,
            cached_reference,
            disable_dropout,
            reference_key,
            reference_logps,
            reference_of,
        )

        disable_dropout(start.model)
        if self.name not in WITH_REFERENCE:
            record.set_reference({"model": f"none ({self.name} compares the two answers alone)"})
            return train_set, val_set
        reference = reference_of(run)
        record.set_reference(reference)
        started = time.time()
        collator = self.collator(run, tokenizer)
        sets = []
        for label, dataset in (("train", train_set), ("held out", val_set)):
            if dataset is None:
                sets.append(None)
                continue
            key = reference_key(reference, dataset)

            def compute(dataset=dataset):
                return reference_logps(
                    start.model, dataset, collator, run.micro_batch_size, bool(run.init_adapter), run.precision
                )

            chosen, rejected = cached_reference(key, compute, label)
            sets.append(
                dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column(
                    "ref_rejected_logps", rejected.tolist()
                )
            )
        self.reference_seconds = time.time() - started  # computing or reading them: what a benchmark counts
        return sets[0], sets[1]
