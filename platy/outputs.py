"""Output folders: where finetune.py and merge.py may write, and what --overwrite may retire.

A run or a merge writes only into a new or empty folder, or into one that holds this toolkit's own earlier
output of the same kind, recognised by its record: a run by its run_config.json (or a checkpoint-N's, or the
manifest of its adapter, or what a killed run leaves), a merged model by its merge_config.json. --overwrite
replaces only that output: a run's record and the checkpoint-N folders that hold one; a merged model as a
whole. Never, --overwrite or not, does either write into a folder it reads (the base model, the adapter),
inside one or above one, nor into the file system root, the home folder or the toolkit's own folder, or a
folder above one of them.
"""

import json
import re
from pathlib import Path

from platy.cli import REPO_ROOT, UserError
from platy.files import DELETING, MERGE_CONFIG, PREEMPTED, STAGING
from platy.integrity import Damaged, read_manifest
from platy.record import RunRecord

RUN, MERGE = "run", "merge"  # the kinds of output
SCRIPTS = {RUN: "finetune.py", MERGE: "merge.py"}
FIX = "choose a new or empty folder"
CHECKPOINT = re.compile(r"checkpoint-[0-9]+")


def check_output_dir(output_dir, kind, overwrite, reads=(), continuing=False):
    """output_dir resolved, once it is sure that `kind`'s output may go there; else a UserError naming the rule
    and the fix. reads: (what, folder) of every folder the command reads (check_apart); continuing: a run
    resumed from its own checkpoint in output_dir."""
    out = Path(output_dir).expanduser().resolve()
    script = SCRIPTS[kind]
    if what := never_written(out):
        raise UserError(f"--output_dir {out} is {what}: {script} writes only into a folder of its own; {FIX}")
    check_apart(out, kind, reads)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; give a folder")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names and kind == RUN:
        check_run_folder(out, names, overwrite, continuing)
    elif names:
        check_merge_folder(out, names, overwrite)
    return out


def never_written(out):
    """How a message names out when it is the root, the home folder, the toolkit's folder or above one of
    them (None: none of these)."""
    if out == Path(out.anchor):
        return "the file system root"
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home folder known (no HOME, no password entry)
        home = None
    for what, folder in (("the home folder", home), ("the toolkit's folder", Path(REPO_ROOT).resolve())):
        if folder is not None and out == folder:
            return what
        if folder is not None and out in folder.parents:
            return f"above {what} {folder}"
    return None


def check_apart(output_dir, kind, reads):
    """output_dir is neither a folder the command reads nor inside or above one: writing there could replace
    the files being read. reads: (what, folder) pairs; a folder that is not local (a hub id) is skipped."""
    out = Path(output_dir).expanduser().resolve()
    for what, folder in reads:
        if not folder or not Path(folder).expanduser().is_dir():
            continue
        folder = Path(folder).expanduser().resolve()
        if out == folder:
            where = "is"
        elif out in folder.parents:
            where = "is above"
        elif folder in out.parents:
            where = "is inside"
        else:
            continue
        raise UserError(f"--output_dir {out} {where} {what} {folder}, which {SCRIPTS[kind]} reads; {FIX} outside it")


def check_run_folder(out, names, overwrite, continuing):
    """A non-empty output_dir of finetune.py: a run of its own, continued or (--overwrite) replaced."""
    if merged_model(out) or not holds_run(out):
        raise UserError(
            f"--output_dir {out} is not empty ({listing(names)}) and holds no run of finetune.py; {FIX} "
            "(--overwrite replaces only an earlier run)"
        )
    if continuing or overwrite:
        return
    if recorded_run(out):
        raise UserError(
            f"--output_dir {out} already holds a finished run; choose another folder or pass "
            f"--overwrite (to train that adapter further: --resume_from_checkpoint {out} with a new --output_dir)"
        )
    raise UserError(
        f"--output_dir {out} holds an unfinished run ({listing(names)}); continue it with "
        "--resume_from_checkpoint auto, choose another folder, or pass --overwrite"
    )


def check_merge_folder(out, names, overwrite):
    """A non-empty output_dir of merge.py: an earlier merge, replaced with --overwrite."""
    if not merged_model(out):
        raise UserError(
            f"--output_dir {out} is not empty ({listing(names)}) and holds no model merged by merge.py; {FIX} "
            "(--overwrite replaces only an earlier merge)"
        )
    if not overwrite:
        raise UserError(
            f"--output_dir {out} is not empty: it holds a model merged earlier; pass --overwrite to replace it, "
            "or choose a new folder"
        )


def listing(names, shown=3):
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def merged_model(folder):
    """Whether folder holds a model merge.py wrote: its merge_config.json names the base it was merged into."""
    try:
        record = json.loads((Path(folder) / MERGE_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "base_model" in record


def recorded_run(folder):
    """Whether folder holds the record of a run of finetune.py (a finished run's, or a checkpoint's)."""
    try:
        record = RunRecord.read(folder)
    except (OSError, ValueError, TypeError):  # damaged: not evidence of anything
        return False
    return bool(record and record.flags)


def sealed(folder):
    """Whether folder holds a sound manifest, which finetune.py writes last into an adapter or checkpoint."""
    try:
        return read_manifest(folder) is not None
    except Damaged:
        return False


def own_checkpoint(path):
    """Whether path is a checkpoint-N folder that a run of finetune.py wrote (its record or manifest is in it):
    what --overwrite and the rotation of checkpoints may retire."""
    path = Path(path)
    return bool(CHECKPOINT.fullmatch(path.name)) and path.is_dir() and (recorded_run(path) or sealed(path))


def own_checkpoints(folder):
    return [path for path in sorted(Path(folder).glob("checkpoint-*")) if own_checkpoint(path)]


def holds_run(folder):
    """Whether folder holds output of a run of finetune.py: its record, its adapter's manifest, a checkpoint of
    its own, or what a killed run leaves (the staging folder, a checkpoint being deleted, the preemption
    marker)."""
    folder = Path(folder)
    leftovers = (folder / STAGING).is_dir() or (folder / PREEMPTED).is_file() or any(folder.glob(f"{DELETING}*"))
    return recorded_run(folder) or sealed(folder) or leftovers or bool(own_checkpoints(folder))
