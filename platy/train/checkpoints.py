"""Checkpoint folders: which are complete, which to resume from, and how they appear and go.

A checkpoint is written into output_dir/.staging/checkpoint-N and renamed to
output_dir/checkpoint-N only when every rank has finished writing it, so a folder named
checkpoint-N is always complete; a kill during the write leaves only the staging folder,
which the next run removes. Old checkpoints are renamed away before they are deleted.
Each checkpoint's manifest.json (platy/integrity.py), written last, lists every file's
size and sha256: a checkpoint damaged or cut short later (a copy, a failing disk) is
found before a resume reads it.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from platy.cli import UserError, say
from platy.files import ADAPTER_FILES, DELETING, STAGING, swap_into_place, sync_folder
from platy.integrity import folder_problem
from platy.outputs import own_checkpoint


def checkpoint_steps(output_dir):
    """(step, path) of every folder named checkpoint-N, highest step first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found, reverse=True)


def missing_parts(folder):
    """What a Trainer checkpoint lacks to continue a run exactly ([] when complete)."""
    folder = Path(folder)
    missing = [] if (folder / "trainer_state.json").is_file() else ["trainer_state.json"]
    if not any((folder / name).is_file() for name in ADAPTER_FILES) and not any(folder.glob("*.safetensors")):
        missing.append("adapter weights")
    if not any(folder.glob("global_step*")):  # DeepSpeed keeps optimizer and schedule in global_stepN/
        missing += [n for n in ("optimizer.pt", "scheduler.pt") if not (folder / n).is_file()]
    return missing


def checkpoint_problem(folder, hashes=True):
    """What keeps a checkpoint from continuing a run exactly (None: nothing): a missing part, a file not as
    its manifest records it (sizes always, sha256 unless hashes=False), a torn weight or state file."""
    missing = missing_parts(folder)
    if missing:
        return f"incomplete ({', '.join(missing)} missing)"
    return folder_problem(folder, hashes)


def latest_checkpoint(output_dir, hashes=False):
    """The highest-numbered sound checkpoint-N in output_dir, or None; one line names what was skipped.

    hashes=False (the messages of a stopped run) compares sizes only; a resume hashes the files too.
    """
    skipped, found = [], None
    for _, path in checkpoint_steps(output_dir):
        problem = checkpoint_problem(path, hashes)
        if problem is None:
            found = str(path)
            break
        skipped.append(f"skipping {path.name}: {problem}")
    if skipped:
        say(f"Note: {'; '.join(skipped)}; {f'using {found} instead' if found else 'no sound checkpoint left'}")
    return found


def checkpoint_step(folder):
    return json.loads((Path(folder) / "trainer_state.json").read_text()).get("global_step", 0)


@dataclass(frozen=True)
class Resume:
    """Where --resume_from_checkpoint starts: a Trainer checkpoint (continues the run) or an adapter folder."""

    kind: str  # "checkpoint" or "adapter"
    path: str

    @property
    def checkpoint(self):
        return self.kind == "checkpoint"

    @property
    def adapter(self):
        return self.kind == "adapter"

    def recorded(self):
        """As run_config.json records it: [kind, path]."""
        return (self.kind, self.path)


def written_here(checkpoint, output_dir):
    """Whether a checkpoint was written by runs of this output_dir, as far as the file system tells: a
    checkpoint-N folder right inside it, itself no link. Its manifest cannot tell more: anyone can write one."""
    checkpoint = Path(checkpoint).expanduser().absolute()
    return (
        checkpoint.name.startswith("checkpoint-")
        and checkpoint.name.removeprefix("checkpoint-").isdigit()
        and not checkpoint.is_symlink()
        and checkpoint.parent.resolve() == Path(output_dir).expanduser().resolve()
    )


def check_trusted(value, checkpoint, output_dir, trusted):
    """A checkpoint from elsewhere is code: DeepSpeed reads its global_stepN/*.pt with plain pickle, which
    runs whatever a crafted file holds (the Trainer's own states go through torch's restricted unpickler,
    whose guard is all that stands between a crafted file and this process)."""
    if trusted or written_here(checkpoint, output_dir):
        return
    raise UserError(
        f"--resume_from_checkpoint {value}: not a checkpoint-N folder of --output_dir {output_dir}; resuming "
        "unpickles its optimizer, RNG and DeepSpeed state files (DeepSpeed's with plain pickle), which can run "
        "code. Pass --trust_checkpoint if you trust where it came from, or start from its adapter alone (an "
        "adapter folder is data)"
    )


def resolve_resume(value, output_dir, trusted=False):
    """None (a new run), or the Resume that --resume_from_checkpoint names. A checkpoint that runs of
    output_dir did not write is refused unless trusted (--trust_checkpoint); an adapter folder is data."""
    if value in (None, "", False):
        return None
    if value == "auto":
        path = latest_checkpoint(output_dir, hashes=True)
        if path is None:
            raise UserError(
                f"--resume_from_checkpoint auto: no complete, undamaged checkpoint in {output_dir}; "
                "drop the flag to start a new run"
            )
        check_trusted(f"auto ({path})", path, output_dir, trusted)
        return Resume("checkpoint", path)
    named = Path(str(value)).expanduser()
    path = named.resolve()
    if not path.is_dir():
        raise UserError(
            f"--resume_from_checkpoint {value}: folder not found; give a checkpoint-N folder, "
            "an adapter folder, or 'auto'"
        )
    if (path / "trainer_state.json").is_file():
        missing = missing_parts(path)
        if missing:
            raise UserError(
                f"--resume_from_checkpoint {value}: the checkpoint is incomplete ({', '.join(missing)} "
                "missing), so optimizer and schedule would restart silently; use an earlier checkpoint-N, "
                "or the folder as an adapter-only start by copying its adapter files elsewhere"
            )
        if problem := folder_problem(path):
            raise UserError(
                f"--resume_from_checkpoint {value}: {problem}; resume from an earlier checkpoint-N, or pass "
                "auto to take the newest undamaged one"
            )
        check_trusted(value, named, output_dir, trusted)
        return Resume("checkpoint", str(path))
    if any((path / name).is_file() for name in ADAPTER_FILES):
        if problem := folder_problem(path):
            raise UserError(f"--resume_from_checkpoint {value}: {problem}; copy the adapter again or retrain it")
        return Resume("adapter", str(path))
    raise UserError(
        f"--resume_from_checkpoint {value}: holds neither a Trainer checkpoint (trainer_state.json) "
        "nor an adapter (adapter_model.safetensors)"
    )


def remove_leftovers(output_dir):
    """Partial writes of a killed run: never taken as a checkpoint, removed at the next start."""
    out = Path(output_dir)
    for path in [out / STAGING, *out.glob(f"{DELETING}*")]:
        if path.exists():
            say(f"Removing {path.name} left by an interrupted run in {out}")
            shutil.rmtree(path, ignore_errors=True)


def publish(staged, final):
    """Rename a fully written checkpoint into place; a same-named older one is moved away first."""
    final = Path(final)
    swap_into_place(staged, final, aside=final.with_name(f"{DELETING}{final.name}"))


def retire(path):
    """Delete a checkpoint without ever leaving a half-deleted checkpoint-N behind: renamed away, the rename
    on disk, then deleted."""
    path = Path(path)
    doomed = path.with_name(f"{DELETING}{path.name}")
    os.replace(path, doomed)
    sync_folder(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate(output_dir, keep, newest):
    """Keep the `keep` most recently written checkpoints (0: all); `newest` is always kept."""
    if not keep:
        return
    others = [
        path
        for _, path in checkpoint_steps(output_dir)
        if path.resolve() != Path(newest).resolve() and own_checkpoint(path) and not missing_parts(path)
    ]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for path in others[keep - 1 :]:
        retire(path)
