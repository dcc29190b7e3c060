"""The tokenizing engine: rows -> ExampleTokenizer -> Arrow record batches, on one process per core."""

import itertools
import multiprocessing
import os
import signal
import sys

from platy.cli import error_detail
from platy.data.examples import IGNORE_INDEX

TOKENIZE_BATCH = 2000  # rows per call of the tokenizer: large enough to keep its threads busy
PROCESS_BATCH = 500  # rows per task of a tokenizing process: small enough to keep every process busy to the end
PARALLEL_ROWS = 10000  # from this many rows on, tokenize in one process per core (Linux, 2 cores or more)
_WORK = None  # (text columns, ExampleTokenizer) for the processes forked by tokenize_in_processes


def tokenize_rows(rows, example_tokenizer, num_proc=None):
    """Tokenize rows into a datasets.Dataset held in memory; drop examples with no response token left.

    Returns (dataset, stats); (None, stats) for no rows. Dropped examples are counted, never
    trained on: a batch with no trainable token gives a NaN loss. See token_chunks for how the
    work is spread.
    """
    batches, stats = [], empty_stats()
    for arrays, stats in counted(  # noqa: B007 (stats: the running totals, read after the loop)
        token_chunks(rows, example_tokenizer, num_proc)
    ):
        batches.append(record_batch(arrays))
    return (tokenized_dataset(batches) if rows else None), stats


def empty_stats():
    return {"rows": 0, "kept": 0, "dropped_cut_away": 0, "truncated": 0, "tokens": 0, "label_tokens": 0, "max_len": 0}


def counted(chunks):
    """(arrays, stats so far) for each of token_chunks' chunks; the last stats are the whole split's."""
    stats = empty_stats()
    for arrays, counts in chunks:
        for key, value in counts.items():
            stats[key] = max(stats[key], value) if key == "max_len" else stats[key] + value
        yield arrays, stats


def token_chunks(rows, example_tokenizer, num_proc=None):
    """token_arrays of each batch of rows (TOKENIZE_BATCH, or PROCESS_BATCH in processes), in order.

    num_proc (default: default_processes) spreads the batches over processes forked from this
    one (Linux only), so the Python work around the tokenizer (reading its ids, building
    examples) runs on every core too, not only the tokenizer.
    """
    from tqdm.auto import tqdm

    if num_proc is None:
        num_proc = default_processes(len(rows))
    if num_proc > 1 and len(rows) > PROCESS_BATCH and sys.platform.startswith("linux"):
        results, size = tokenize_in_processes(rows, example_tokenizer, num_proc), PROCESS_BATCH
    else:
        results, size = (token_arrays(part) for part in tokenized_batches(rows, example_tokenizer)), TOKENIZE_BATCH
    yield from tqdm(
        results,
        total=-(-len(rows) // size),
        desc="Tokenizing",
        unit="batch",
        leave=False,
        disable=len(rows) < PARALLEL_ROWS,
    )


def default_processes(rows, sharing=1):
    """Tokenizing processes for this many rows: one per core this process may use (its CPU
    affinity: Slurm's and taskset's limits), shared among `sharing` processes that tokenize at
    the same time (the ranks of a node without a token cache), at most 8; one below
    PARALLEL_ROWS rows."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, sharing))) if rows >= PARALLEL_ROWS else 1


def tokenize_in_processes(rows, example_tokenizer, num_proc):
    """token_arrays of each batch, in order, from num_proc forked processes (the rows and the
    tokenizer are inherited, not pickled; the arrays come back as numpy). A few batches are in
    flight at a time. Where the processes cannot start or one dies (the out-of-memory killer,
    say), the rest is tokenized in this process, with a note."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from platy.cli import say

    global _WORK
    example_tokenizer.clean("\n")  # decided here once, not in every process
    _WORK = (text_columns(rows), example_tokenizer)
    starts = iter(range(0, len(rows), PROCESS_BATCH))
    done = 0  # rows whose arrays were handed on
    try:
        with ProcessPoolExecutor(
            num_proc, mp_context=multiprocessing.get_context("fork"), initializer=_single_threaded
        ) as pool:
            pending = deque(pool.submit(_tokenize_batch, start) for start in itertools.islice(starts, 2 * num_proc))
            while pending:
                result = pending.popleft().result()
                following = next(starts, None)
                if following is not None:
                    pending.append(pool.submit(_tokenize_batch, following))
                yield result
                done = min(done + PROCESS_BATCH, len(rows))
    except (BrokenProcessPool, OSError, AssertionError) as err:  # AssertionError: a daemonic process may not fork
        say(
            f"Note: tokenizing in {num_proc} processes failed ({error_detail(err) or 'a process died'}); "
            f"tokenizing the remaining {len(rows) - done:,} rows in this process"
        )
        yield from (token_arrays(part) for part in tokenized_batches(rows[done:], example_tokenizer))
    finally:
        _WORK = None


def _single_threaded():
    # one process per core already: the tokenizer's own threads would only compete (and a thread
    # pool the parent started does not survive the fork)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # the parent alone answers Ctrl-C and SIGTERM (the scripts' handlers would raise in here too)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _tokenize_batch(start):
    columns, example_tokenizer = _WORK
    return token_arrays(example_tokenizer.compact(column_slice(columns, start, PROCESS_BATCH)))


def token_arrays(part):
    """numpy arrays offsets, input_ids and labels (int32, flat) of a compact batch's kept examples
    (those with a response token left), and its counts for tokenize_rows' stats.

    The ids are read from Python once; the labels are the ids with each example's masked prefix
    set to IGNORE_INDEX."""

    import numpy as np

    keep = [i for i, n in enumerate(part["n_response"]) if n > 0]
    ids, masked = part["input_ids"], part["masked"]
    if len(keep) < len(ids):
        ids, masked = [ids[i] for i in keep], [masked[i] for i in keep]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    labels = flat.copy()
    n_masked = n_first = 0  # masked ids; examples whose first id is a label (never a target)
    for start, spans in zip(offsets[:-1].tolist(), masked):
        for begin, end in spans:
            labels[start + begin : start + end] = IGNORE_INDEX
            n_masked += end - begin
        n_first += not spans or spans[0][0] > 0
    rows = len(part["input_ids"])
    counts = {
        "rows": rows,
        "kept": len(ids),
        "dropped_cut_away": rows - len(ids),
        "truncated": sum(part["truncated"]),
        "tokens": len(flat),
        # labels are shifted inside the model: a label at position 0 is never a target
        "label_tokens": len(flat) - n_masked - n_first,
        "max_len": int(lengths.max(initial=0)),
    }
    return {"offsets": offsets.astype(np.int32), "input_ids": flat, "labels": labels}, counts


def text_columns(rows):
    columns = {key: [row.get(key, "") for row in rows] for key in ("instruction", "input", "output")}
    if any("messages" in row for row in rows):
        columns["messages"] = [row.get("messages") for row in rows]
    return columns


def column_slice(columns, start, size):
    """Rows start .. start + size of text columns, as the column batch ExampleTokenizer takes."""
    return {key: values[start : start + size] for key, values in columns.items()}


def tokenized_batches(rows, example_tokenizer):
    """example_tokenizer's compact output for each batch of TOKENIZE_BATCH rows, tokenized in this process."""
    columns = text_columns(rows)
    for start in range(0, len(rows), TOKENIZE_BATCH):
        yield example_tokenizer.compact(column_slice(columns, start, TOKENIZE_BATCH))


def token_schema():
    """The Arrow schema of tokenized data: lists of int32 ids and labels, int8 attention mask."""
    import pyarrow as pa

    return pa.schema(
        {"input_ids": pa.list_(pa.int32()), "attention_mask": pa.list_(pa.int8()), "labels": pa.list_(pa.int32())}
    )


def record_batch(arrays):
    """token_arrays' numpy arrays as one Arrow record batch (a batch of rows stays far below 32-bit
    offsets)."""
    import numpy as np
    import pyarrow as pa

    offsets = pa.array(arrays["offsets"])
    columns = {
        "input_ids": arrays["input_ids"],
        "attention_mask": np.ones(len(arrays["input_ids"]), dtype=np.int8),
        "labels": arrays["labels"],
    }
    return pa.RecordBatch.from_arrays(
        [pa.ListArray.from_arrays(offsets, pa.array(values)) for values in columns.values()], schema=token_schema()
    )


def tokenized_dataset(batches=(), table=None):
    """A datasets.Dataset of record_batch's batches (or of an Arrow table of that schema); typed, so
    an empty one is valid too. Dataset.from_dict would instead convert every id through a Python
    object and hash all the data for a fingerprint, which took as long as tokenizing."""
    import uuid

    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    if table is None:
        table = InMemoryTable(pa.Table.from_batches(list(batches), schema=token_schema()))
    features = datasets.Features(
        {
            key: datasets.List(datasets.Value(str(column.type.value_type)))
            for key, column in zip(table.column_names, table.schema)
        }
    )
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=uuid.uuid4().hex)
