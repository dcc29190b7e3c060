"""The output-folder contract: the names of what a run leaves behind, and writes a reader never sees half of.

Imports nothing of the project: every layer may use it.
"""

import json
import os
import shutil
from pathlib import Path

RUN_CONFIG = "run_config.json"  # written last by finetune.py: its presence marks a finished run
LOG_HISTORY = "log_history.json"
CURVES = "training_curves.png"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def cache_root():
    """Where built tiny models, tokenized data and embeddings are kept ($PLATY_CACHE)."""
    return Path(os.environ.get("PLATY_CACHE", Path.home() / ".cache" / "platy"))


def write_text(path, text):
    """Write through a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def swap_into_place(tmp, output_dir, aside=None):
    """Move the finished tmp folder to output_dir; an old output_dir is renamed to `aside` (default
    .NAME.old-PID beside it) and goes only once the new one is there."""
    output_dir = Path(output_dir)
    old = None
    if output_dir.exists():
        old = Path(aside) if aside else output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(old)
    Path(tmp).rename(output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_as_umask_allows(path):
    """Give a file the permissions a plain open() would: safetensors writes its files 0600, but an adapter is
    for whoever may read the folder it is in (as a merged model is)."""
    Path(path).chmod(0o666 & ~current_umask())
