"""Tokenized training data cached on disk, so a second run and every DDP rank skip tokenization.

The cache key is everything the tokens depend on: the data's fingerprint and its train /
held-out split, the tokenizer (its full serialized definition), the template, cutoff_len,
train_on_inputs, add_eos_token and the version of the tokenization code. One process
builds an entry while holding a file lock; the others wait on the lock and then load the
finished entry. An entry is written to a temporary folder and renamed into place, so a
killed build never leaves a half-written one; its manifest (size and sha256 of each file,
written last) is checked before the entry is used. The folders are private (platy.caches).
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from platy.caches import CacheLock, cache_folder, private_folder
from platy.cli import error_detail, local_world_size, say
from platy.data.examples import adds_bos
from platy.data.tokenize import (
    counted,
    default_processes,
    empty_stats,
    record_batch,
    token_chunks,
    token_schema,
    tokenize_rows,
    tokenized_dataset,
)
from platy.files import cache_root
from platy.integrity import Damaged, read_manifest, records_problem, write_manifest

TOKENIZATION_VERSION = 5  # bump when ExampleTokenizer or tokenize_rows change what they produce


def tokenizer_fingerprint(tokenizer):
    """sha256 of what decides the ids: the backend's full definition (vocab, merges, normalizer,
    pre-tokenizer) where there is one, the special tokens and whether BOS is added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation and padding are per-call settings that calls leave on the backend: not part of the ids
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        definition = tokenizer.get_vocab()
    definition = json.dumps(definition, sort_keys=True)
    special = {
        "class": type(tokenizer).__name__,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "adds_bos": adds_bos(tokenizer),
    }
    return hashlib.sha256((definition + json.dumps(special, sort_keys=True)).encode()).hexdigest()


def cache_key(data_fingerprint, split, example_tokenizer):
    """The folder name of an entry; split says how the rows were divided (seed, val_set_size)."""
    parts = {
        "data": data_fingerprint,
        "split": split,
        "tokenizer": tokenizer_fingerprint(example_tokenizer.tokenizer),
        "template": example_tokenizer.prompter.template,
        "chat_template": example_tokenizer.chat_template and example_tokenizer.chat_template.text,
        "cutoff_len": example_tokenizer.cutoff_len,
        "train_on_inputs": example_tokenizer.train_on_inputs,
        "add_eos_token": example_tokenizer.add_eos_token,
        "version": TOKENIZATION_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenized_splits(row_splits, example_tokenizer, data_fingerprint, split, root=None, use_cache=True):
    """{name: (dataset or None, stats)} for the row splits, from the cache or tokenized and cached.

    Returns (splits, (where, folder)): where is 'cache' or 'tokenized' and folder the entry, or
    ('uncached', None) when use_cache is off or the cache folder cannot be written. An entry
    that cannot be read back (a crash while the disk held it only partly, say) is tokenized again.
    """
    if not use_cache:
        return uncached(row_splits, example_tokenizer), ("uncached", None)
    key = cache_key(data_fingerprint, split, example_tokenizer)
    folder = (Path(root) if root else cache_root() / "tokenized") / key
    try:
        private_folder(root) if root else cache_folder("tokenized")
        lock = CacheLock(folder.parent / f"{key}.lock").acquire()  # one builder; the others wait, then load
    except OSError as err:  # a read-only cache folder or a stuck builder (TimeoutError) costs the cache, not the run
        return without_cache(folder, err, row_splits, example_tokenizer)
    try:
        if (folder / "stats.json").is_file():
            try:
                return load_entry(folder, row_splits), ("cache", folder)
            except (OSError, ValueError, KeyError, Damaged) as err:  # pyarrow's read errors: OSError / ValueError
                say(f"Note: the token cache entry {folder} cannot be read ({error_detail(err)}); tokenizing again")
        try:
            build(folder, row_splits, example_tokenizer)
        except OSError as err:  # a full disk costs the cache, not the run
            return without_cache(folder, err, row_splits, example_tokenizer)
        return load_entry(folder, row_splits), ("tokenized", folder)
    finally:
        lock.release()


def without_cache(folder, err, row_splits, example_tokenizer):
    say(
        f"Note: the token cache in {folder.parent} cannot be used ({getattr(err, 'strerror', None) or err}); "
        "tokenizing without it (set PLATY_CACHE to a writable folder to cache)"
    )
    return uncached(row_splits, example_tokenizer), ("uncached", None)


def load_entry(folder, row_splits):
    """{name: (dataset or None, stats)} of a complete entry; raises if any file differs from the entry's
    manifest (sizes, then sha256), or a split does not hold the rows its statistics count."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise Damaged("the entry has no manifest")
    if problem := records_problem(folder, manifest["files"]):
        raise Damaged(problem)
    stats = json.loads((folder / "stats.json").read_text())
    splits = {name: (load_split(folder / f"{name}.arrow", stats[name]), stats[name]) for name in row_splits}
    for name, (dataset, counts) in splits.items():
        if counts["rows"] and len(dataset) != counts["kept"]:
            raise ValueError(f"{name}.arrow holds {len(dataset)} examples where {counts['kept']} were written")
    return splits


def uncached(row_splits, example_tokenizer):
    """Each split tokenized in memory; without a cache every process of the node tokenizes at once,
    so they share its cores."""
    return {
        name: tokenize_rows(rows, example_tokenizer, num_proc=default_processes(len(rows), local_world_size()))
        for name, rows in row_splits.items()
    }


def load_split(path, stats):
    """The saved split, memory-mapped; None for a split without rows."""
    from datasets.table import MemoryMappedTable

    if not stats["rows"]:
        return None
    return tokenized_dataset(table=MemoryMappedTable.from_file(str(path)))


def build(folder, row_splits, example_tokenizer):
    """Tokenize each split into an Arrow stream file of the entry, batch by batch as the batches are
    tokenized (the writing overlaps the tokenizing processes), then publish the entry by renaming."""
    import pyarrow as pa

    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        stats = {}
        for name, rows in row_splits.items():
            stats[name] = empty_stats()
            if not rows:
                continue
            with (
                pa.OSFile(str(staging / f"{name}.arrow"), "wb") as sink,
                pa.ipc.new_stream(sink, token_schema()) as out,
            ):
                for arrays, stats[name] in counted(token_chunks(rows, example_tokenizer)):
                    out.write_batch(record_batch(arrays))
        (staging / "stats.json").write_text(json.dumps(stats))
        write_manifest(staging)  # written last: marks a complete entry
        shutil.rmtree(folder, ignore_errors=True)  # a leftover without stats.json, or an unreadable entry
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # what an interrupted or failed build wrote
