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

from platy.data.examples import IGNORE_INDEX


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


PACK_CHUNK_ROWS = 1000  # packed rows per Arrow chunk: far below 32-bit offsets


def pack_dataset(ds, budget):
    """A datasets.Dataset of packed rows (input_ids, labels, position_ids) built from a tokenized one;
    and packing statistics.

    The columns are read as numpy arrays and gathered in packed order, so a data set loaded
    memory-mapped from the token cache never passes through Python lists."""
    import itertools

    import numpy as np
    import pyarrow as pa
    from datasets.table import InMemoryTable

    from platy.data.tokenize import tokenized_dataset

    if ds is None:
        return None, {}
    table = ds.with_format("arrow")[:]  # the selected rows, in order
    offsets, ids = flat_column(table, "input_ids")
    _, labels = flat_column(table, "labels")
    lengths = np.diff(offsets)
    rows = pack_lengths(lengths.tolist(), budget)
    order = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=len(lengths))
    sizes = lengths[order]
    starts = np.cumsum(sizes) - sizes  # each example's first position in the packed tokens
    position = np.arange(int(sizes.sum())) - np.repeat(starts, sizes)
    gather = position + np.repeat(offsets[:-1][order], sizes)
    columns = {
        "input_ids": ids[gather].astype(np.int32, copy=False),
        "labels": labels[gather].astype(np.int32),
        "position_ids": position.astype(np.int32),
    }
    columns["labels"][starts] = IGNORE_INDEX  # no example is predicted from the one before it
    row_ends = np.cumsum([len(row) for row in rows])
    row_offsets = np.concatenate([[0], starts[row_ends[:-1]], [len(position)]]) if rows else np.zeros(1, np.int64)
    chunks = {key: [] for key in columns}
    for first in range(0, len(rows), PACK_CHUNK_ROWS):
        bounds = row_offsets[first : first + PACK_CHUNK_ROWS + 1]
        for key, values in columns.items():
            chunk_offsets = pa.array((bounds - bounds[0]).astype(np.int32))
            chunks[key].append(pa.ListArray.from_arrays(chunk_offsets, pa.array(values[bounds[0] : bounds[-1]])))
    packed = tokenized_dataset(
        table=InMemoryTable(
            pa.table({key: pa.chunked_array(parts, type=pa.list_(pa.int32())) for key, parts in chunks.items()})
        )
    )
    stats = {
        "packed_rows": len(rows),
        "examples": len(lengths),
        "token_budget": budget,
        "fill": round(int(lengths.sum()) / (len(rows) * budget), 4) if rows else 0.0,
    }
    return packed, stats


def flat_column(table, name):
    """(offsets, values) of a list column of an Arrow table as numpy arrays, offsets from 0."""
    import numpy as np

    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy()[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


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
