"""Padding-free packing: several tokenized examples share one row, none sees another.

A packed row is the concatenation of whole examples (each already cut at cutoff_len) up
to a token budget. Its position ids restart at 0 for every example; its labels are -100
at each example's first token, so no loss term predicts one example from the previous
one (an unpacked example never has a target at its first position either: labels are
shifted inside the model). The row carries no attention mask: transformers 5 then reads
the example boundaries from the position ids (masking_utils.find_packed_sequence_indices
for SDPA, eager and flex attention; cu_seqlens for FlashAttention), so attention never
crosses an example boundary and the loss is the unpacked loss, without pad tokens.
"""

import bisect

from platy.data import IGNORE_INDEX


def pack_lengths(lengths, budget):
    """Rows of example indices, each row's lengths summing to at most budget.

    Best fit decreasing: longest example first, into the fullest row it still fits. It
    fills rows tightly (Open-Platypus-like lengths leave a few percent unused) and is
    deterministic, so every DDP rank packs the same rows.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, free = [], []  # free: sorted (room left, row number)
    for i in order:
        need = lengths[i]
        if need > budget:
            raise ValueError(f"example {i} has {need} tokens, more than the packing budget {budget}")
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = budget, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, row))
    return [sorted(row) for row in rows]  # examples keep their data order within a row


def pack_examples(examples, rows):
    """One packed row (input_ids, labels, position_ids) per row of example indices."""
    packed = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": []}
    for row in rows:
        ids, labels, positions = [], [], []
        for i in row:
            example_ids = examples["input_ids"][i]
            ids += example_ids
            labels += [IGNORE_INDEX] + list(examples["labels"][i][1:])
            positions += range(len(example_ids))
        packed["input_ids"].append(ids)
        packed["labels"].append(labels)
        packed["position_ids"].append(positions)
        packed["n_examples"].append(len(row))
    return packed


def pack_dataset(ds, budget):
    """A datasets.Dataset of packed rows built from a tokenized one; and packing statistics."""
    import datasets

    if ds is None:
        return None, {}
    examples = ds.select_columns(["input_ids", "labels"]).to_dict()  # one read; the mask is rebuilt by packing
    lengths = [len(ids) for ids in examples["input_ids"]]
    rows = pack_lengths(lengths, budget)
    packed = datasets.Dataset.from_dict(pack_examples(examples, rows))
    tokens = sum(lengths)
    stats = {"packed_rows": len(rows), "examples": len(lengths), "token_budget": budget,
             "fill": round(tokens / (len(rows) * budget), 4) if rows else 0.0}
    return packed.remove_columns("n_examples"), stats


class PackedCollator:
    """Puts a micro-batch of packed rows end to end into one row of shape [1, tokens]: no padding.

    Position ids restart at every example, so rows joined this way are still told apart.
    use_cache is off: a model given a cache (Llama makes one unless told not to) skips the
    boundary detection and would let examples attend to each other.
    """

    def __call__(self, features):
        import torch

        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for feature in features:
            for key in batch:
                batch[key] += list(feature[key])
        return {**{key: torch.tensor([values], dtype=torch.long) for key, values in batch.items()}, "use_cache": False}
