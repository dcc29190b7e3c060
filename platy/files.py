"""The output-folder contract: the names of what a run leaves behind, and writes a reader never sees half of.

Imports nothing of the project: every layer may use it.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

RUN_CONFIG = "run_config.json"  # written last by finetune.py: its presence marks a finished run
LOG_HISTORY = "log_history.json"
CURVES = "training_curves.png"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
STAGING = ".staging"  # partial checkpoints and the final adapter are written here first
DELETING = ".deleting-"  # old checkpoints being removed
PREEMPTED = "preempted.json"  # marks a run stopped by a signal, with its checkpoint
MERGE_CONFIG = "merge_config.json"  # how merge.py made a model, with the size and sha256 of each written file
# a model's tokenizer as transformers saves and reads it: the only files a merge copies from a tokenizer folder
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def cache_root():
    """Where built tiny models, tokenized data and embeddings are kept ($PLATY_CACHE)."""
    return Path(os.environ.get("PLATY_CACHE", Path.home() / ".cache" / "platy"))


def temp_beside(path):
    """A new empty file beside path with a name no one else has (.NAME.XXXXXXXX.tmp) and the permissions
    a plain open() would give it. A fixed name could be another writer's file, or a link planted there."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(handle, 0o666 & ~current_umask())
    os.close(handle)
    return Path(tmp)


def write_text(path, text):
    """Write through a temporary file and a rename: a reader never sees half a file, nor (after a crash)
    an empty one: the bytes reach the disk before the rename does."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        sync_file(tmp)
        tmp.replace(path)
        sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def swap_into_place(tmp, output_dir, aside=None):
    """Move the finished tmp folder to output_dir; an old output_dir is renamed to `aside` (default
    .NAME.old-PID beside it) and goes only once the new one is there, on disk with its files."""
    output_dir = Path(output_dir)
    sync_tree(tmp)
    old = None
    if output_dir.exists():
        old = Path(aside) if aside else output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(old)
    Path(tmp).rename(output_dir)
    sync_folder(output_dir.parent)  # the renames are durable before the predecessor is deleted
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def current_umask():
    """The process's umask (setting it is the only way to read it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_as_umask_allows(path):
    """Give a file the permissions a plain open() would: safetensors writes its files 0600, but an adapter is
    for whoever may read the folder it is in (as a merged model is)."""
    Path(path).chmod(0o666 & ~current_umask())


# A rename is atomic but not durable: after a power loss the new name may point to a file whose bytes never
# reached the disk (an empty file) while its predecessor is already gone. fsync the bytes before a rename,
# and the folder after it, before anything older is deleted.


def sync_file(path):
    """fsync one file's bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(path):
    """fsync a folder: the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder):
    """fsync every file and folder below `folder`, the folder itself last."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            sync_file(os.path.join(root, name))
        sync_folder(root)
