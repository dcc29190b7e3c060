"""Faults during training: preemption, kill -9, non-finite steps, full disks, a dead rank; and files
damaged or cut short after they were written (checkpoints, adapters, base and merged models).

Faults during a run are injected by tests/faults/sitecustomize.py (PLATY_FAULT) into real command lines;
damaged files are copies of one finished run's, changed with `cut` and `flip`.
"""

import json
import os
import re
import shutil
import signal
import sys
import time
import zipfile
from pathlib import Path

import pytest

from platy import integrity
from platy.files import RUN_CONFIG
from platy.integrity import MANIFEST
from platy.train import checkpoints

from conftest import REPO, assert_user_error, build_model, faulty, finetune, merge_cli, run_cli, write_rows

RUN = ("--max_steps", 4, "--save_steps", 1)
EMPTY_SAFETENSORS = (8).to_bytes(8, "little") + b"{}      "  # a header holding no tensor, as the format pads it


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def largest_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def last_line(result):
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run that nothing interrupts (checkpoints 2 to 4 kept): copies of it are damaged below."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = finetune(out, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(finished_run):
    """The adapter of the uninterrupted run: every resumed run must end with it."""
    return adapter(finished_run)


def test_sigterm_saves_a_checkpoint_and_resume_ends_with_the_same_adapter(tmp_path, uninterrupted):
    out = tmp_path / "out"
    stopped = finetune(out, "--max_steps", 4, "--save_steps", 100, env=faulty("sigterm_after_step=2"))
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert last_line(stopped).startswith("finetune.py: preempted: stopped at optimizer step 2 of 4")
    assert "--resume_from_checkpoint auto" in last_line(stopped)
    assert checkpoints.missing_parts(out / "checkpoint-2") == []
    assert not (out / "adapter_model.safetensors").exists() and not (out / "run_config.json").exists()
    assert json.loads((out / "preempted.json").read_text())["global_step"] == 2

    resumed = finetune(out, "--max_steps", 4, "--save_steps", 100, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-2'}" in resumed.stdout
    assert "Note: resuming" not in resumed.stdout  # same settings, nothing to point out
    assert largest_difference(adapter(out), uninterrupted) <= 1e-5
    assert not (out / "preempted.json").exists()
    history = json.loads((out / "log_history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]


def test_kill_during_a_checkpoint_write_keeps_the_last_complete_one(tmp_path, uninterrupted):
    out = tmp_path / "out"
    killed = finetune(out, *RUN, "--save_total_limit", 1, env=faulty("sigkill_in_write=checkpoint-3/optimizer.pt"))
    assert killed.returncode == -signal.SIGKILL
    # the limit of 1 deleted checkpoint-1 only once checkpoint-2 was complete; the torn checkpoint-3
    # exists only in the staging folder, never under its own name
    assert [p.name for _, p in checkpoints.checkpoint_steps(out)] == ["checkpoint-2"]
    assert checkpoints.missing_parts(out / "checkpoint-2") == []
    assert (out / checkpoints.STAGING / "checkpoint-3").is_dir()
    assert checkpoints.latest_checkpoint(out) == str(out / "checkpoint-2")

    resumed = finetune(out, *RUN, "--save_total_limit", 1, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Removing .staging left by an interrupted run" in resumed.stdout
    assert f"Resuming from {out / 'checkpoint-2'}" in resumed.stdout
    assert largest_difference(adapter(out), uninterrupted) <= 1e-5
    assert not (out / checkpoints.STAGING).exists()
    assert [p.name for _, p in checkpoints.checkpoint_steps(out)] == ["checkpoint-4"]


def test_kill_during_the_final_save_leaves_no_torn_adapter(tmp_path, uninterrupted):
    out = tmp_path / "out"
    killed = finetune(out, *RUN, env=faulty("sigkill_in_write=final/adapter_model"))
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists() and not (out / "run_config.json").exists()
    # checkpoint-4 holds the whole run: resuming exports it instead of training a step too many
    resumed = finetune(out, *RUN, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-4 already holds all 4 steps" in resumed.stdout
    assert largest_difference(adapter(out), uninterrupted) == 0
    assert json.loads((out / "run_config.json").read_text())["result"]["global_step"] == 4
    assert "### Instruction:" in (out / "chat_template.jinja").read_text(), "the tokenizer's template is Alpaca's"


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_llama):
    """A model whose embedding of byte 0xE2 is NaN, and data where one row holds that byte."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_model(tmp_path_factory.mktemp("poisoned"), "llama", tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    poison = tokenizer.convert_tokens_to_ids("<0xE2>")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("nan")
    model.save_pretrained(folder)
    assert poison in tokenizer("a snowman \u2603")["input_ids"]
    rows = [
        {"instruction": f"Add {a} and {a + 3}.", "input": "", "output": f"{a} + {a + 3} = {2 * a + 3}"}
        for a in range(15)
    ]
    rows.insert(9, {"instruction": "Draw a snowman \u2603.", "input": "", "output": "\u2603"})
    return folder, write_rows(tmp_path_factory.mktemp("poisoned-data") / "rows.json", rows)


def test_a_nonfinite_loss_stops_the_run_at_its_step(tmp_path, poisoned):
    model, data = poisoned
    out = tmp_path / "out"
    result = finetune(out, "--max_steps", -1, "--save_steps", 1, base_model=model, data_path=data)
    assert result.returncode == 3, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith("finetune.py: error: non-finite loss at optimizer step ")
    step = int(line.split("optimizer step ")[1].split(";")[0])
    assert step > 1  # (seed 42 puts the poisoned row after the first step)
    assert f"the last good checkpoint is {out / f'checkpoint-{step - 1}'}" in line
    assert checkpoints.latest_checkpoint(out) == str(out / f"checkpoint-{step - 1}")
    assert not (out / f"checkpoint-{step}").exists() and not (out / "adapter_model.safetensors").exists()
    import torch

    assert all(torch.isfinite(t).all() for t in adapter(out / f"checkpoint-{step - 1}").values())


def test_skip_nonfinite_steps_drops_and_counts_them(tmp_path, poisoned):
    import torch

    model, data = poisoned
    out = tmp_path / "out"
    result = finetune(out, "--max_steps", -1, "--skip_nonfinite_steps", "true", base_model=model, data_path=data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipped optimizer step" in result.stdout
    history = json.loads((out / "log_history.json").read_text())
    assert max(r.get("nonfinite_steps_skipped", 0) for r in history) == 1
    assert all(torch.isfinite(t).all() for t in adapter(out).values())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history if "loss" in r)


def test_a_full_disk_ends_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    result = finetune(out, *RUN, env=faulty("enospc_in_write=checkpoint-2/optimizer.pt"))
    assert result.returncode == 74, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith("finetune.py: error: writing checkpoint-2 failed: No space left on device")
    assert f"the last complete checkpoint, {out / 'checkpoint-1'}, is intact" in line
    assert "Traceback" not in result.stderr
    assert [p.name for _, p in checkpoints.checkpoint_steps(out)] == ["checkpoint-1"]
    assert checkpoints.missing_parts(out / "checkpoint-1") == []
    assert not (out / checkpoints.STAGING).exists()


def test_an_unwritable_output_dir_is_refused_before_loading(tmp_path):
    result = finetune("/proc/platy-cannot-write-here", *RUN)
    assert result.returncode == 2
    assert last_line(result).startswith(
        "finetune.py: error: --output_dir /proc/platy-cannot-write-here cannot be written"
    )
    assert "Loading" not in result.stdout


def test_sigterm_while_the_model_loads_exits_75_and_says_nothing_was_saved(tmp_path):
    out = tmp_path / "out"
    stopped = finetune(out, *RUN, env=faulty("sigterm_in_load"))
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert last_line(stopped) == (
        "finetune.py: preempted: SIGTERM received: stopped; nothing was saved (no checkpoint was written yet). "
        "Run the same command again"
    )
    assert "Traceback" not in stopped.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_second_sigterm_stops_at_once_with_the_preemption_status(monkeypatch):
    from platy import cli
    from platy.train import trainer as training

    clock = [100.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    request = training.StopRequest()
    request.handle(signal.SIGTERM, None)
    clock[0] += 5
    with pytest.raises(cli.Terminated):  # stop now, and still a preemption (exit 75), not an interruption
        request.handle(signal.SIGTERM, None)


def test_a_stop_under_way_keeps_torchruns_signal_ignored(monkeypatch):
    """Processes that agreed to stop ignore SIGTERM (torchrun signals the others once one exits): leaving the
    training loop must not put back a handler that would replace their reason with a preemption."""
    from platy.train import trainer as training

    before = signal.getsignal(signal.SIGTERM)
    with training.StopRequest() as request:
        assert signal.getsignal(signal.SIGTERM) == request.handle
    assert signal.getsignal(signal.SIGTERM) == before  # nothing under way: the previous handler is back
    try:
        with training.StopRequest():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as Trainer.agree_on_writes does before raising
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_only_rank_0_probes_a_new_output_dir(tmp_path, monkeypatch):
    from platy.cli import UserError
    from platy.train.config import check_writable

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    monkeypatch.setenv("RANK", "1")  # another process of a torchrun job: it neither creates nor removes folders
    check_writable(blocked / "new" / "out")
    check_writable(tmp_path / "new" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match=f"--output_dir {blocked / 'new' / 'out'} cannot be written"):
        check_writable(blocked / "new" / "out")


TORCHRUN_FLAGS = (
    "--batch_size",
    "4",
    "--micro_batch_size",
    "1",
    "--max_steps",
    "6",
    "--warmup_steps",
    "0",
    "--logging_steps",
    "1",
    "--cutoff_len",
    "256",
    "--save_steps",
    "1",
)


def torchrun(output_dir, *extra, env=None, port):
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(REPO / "finetune.py"),
        "--base_model",
        "builtin:tiny-llama",
        "--data_path",
        str(REPO / "data" / "sample_platypus.json"),
        "--output_dir",
        str(output_dir),
        *TORCHRUN_FLAGS,
        *map(str, extra),
    ]
    started = time.time()
    result = run_cli(args, env=env, timeout=300)
    return result, time.time() - started


def test_torchrun_preemption_and_a_killed_rank(tmp_path):
    out = tmp_path / "out"
    # both ranks get SIGTERM (as from a scheduler): they agree on the step, save it and stop;
    # fine-tuning.sh gives back the preemption status that torchrun turns into 1
    stopped = run_cli(
        ["bash", str(REPO / "fine-tuning.sh"), "--output_dir", str(out), *TORCHRUN_FLAGS],
        env={**faulty("sigterm_after_step=2"), "TINY": "1", "NPROC": "2", "MASTER_PORT": "29561"},
        timeout=300,
    )
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "finetune.py: preempted: stopped at optimizer step 2 of 6" in stopped.stderr
    assert checkpoints.latest_checkpoint(out) == str(out / "checkpoint-2")

    # kill -9 of rank 1 two steps after resuming: the whole job ends, with one clear line from rank 0
    killed, seconds = torchrun(
        out, "--resume_from_checkpoint", "auto", env=faulty("sigkill_after_step=2", rank=1), port=29562
    )
    assert killed.returncode != 0 and seconds < 120
    assert "finetune.py: error: another process of this job stopped" in killed.stderr
    assert "Traceback" not in killed.stderr.split("finetune.py: error:")[0]
    assert checkpoints.latest_checkpoint(out) == str(out / "checkpoint-3")

    finished, _ = torchrun(out, "--resume_from_checkpoint", "auto", port=29563)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-3'}" in finished.stdout
    assert json.loads((out / "run_config.json").read_text())["result"]["global_step"] == 6


def test_torchrun_ranks_agree_on_a_failed_save_and_on_the_export(tmp_path):
    """A disk full on rank 1 while it writes its part of checkpoint-2: both processes stop together with rank
    1's reason (rank 0 never waits for it); then the finished checkpoint-1 is exported by rank 0 alone. The
    output folder is new and nested: only rank 0 probes it."""
    out = tmp_path / "new" / "nested" / "out"
    failed, seconds = torchrun(
        out, "--max_steps", 2, env=faulty("enospc_in_write=checkpoint-2/rng_state_1", rank=1), port=29571
    )
    assert failed.returncode != 0 and seconds < 120, failed.stderr[-3000:]
    told = "finetune.py: error: writing checkpoint-2 failed on process 1: No space left on device"
    assert failed.stderr.count(told) == 1, failed.stderr[-3000:]
    assert f"the last complete checkpoint, {out / 'checkpoint-1'}, is intact" in failed.stderr
    assert "another process of this job stopped" not in failed.stderr
    assert re.search(r"rank\s*:\s*0.*\n.*exitcode\s*:\s*74", failed.stderr), failed.stderr[-3000:]
    assert checkpoints.latest_checkpoint(out) == str(out / "checkpoint-1")
    assert not (out / checkpoints.STAGING).exists()

    # checkpoint-1 holds every step of a one-step run whose final save never came: rank 0 exports it, and
    # rank 1, lagging, does not take the exported run_config.json for a run that ended in another way
    lagging = faulty("slow_tokenizer=10", rank=1)
    exported, _ = torchrun(out, "--max_steps", 1, "--resume_from_checkpoint", "auto", env=lagging, port=29572)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stdout.count("checkpoint-1 already holds all 1 steps of this run") == 1
    assert json.loads((out / RUN_CONFIG).read_text())["result"]["exported_from"] == str(out / "checkpoint-1")
    assert largest_difference(adapter(out), adapter(out / "checkpoint-1")) == 0
    assert not (out / checkpoints.STAGING).exists()


def test_ddp_timeout_reaches_the_trainer_and_is_checked(tmp_path):
    """A dead NCCL peer holds the other GPUs for --ddp_timeout seconds (10 minutes by default, not torch's 30)."""
    from platy.train import config
    from platy.train.arguments import training_arguments
    from platy.train.flags import TRAIN_FLAGS
    from platy.train.recipe import Recipe

    flags = {**TRAIN_FLAGS.defaults(), "base_model": "builtin:tiny-llama", "output_dir": str(tmp_path / "out")}
    flags.update(data_path=str(REPO / "data" / "sample_platypus.json"), dry_run=True)
    assert training_arguments(Recipe.from_flags(flags).run, has_val=False, steps=1).ddp_timeout == 600
    run = Recipe.from_flags({**flags, "ddp_timeout": 90}).run
    assert training_arguments(run, has_val=False, steps=1).ddp_timeout == 90
    assert "--ddp_timeout must be a positive integer, got 0" in config.check_flags({**flags, "ddp_timeout": 0})


def test_signals_close_together_are_one_request(monkeypatch):
    from platy.train import trainer as training

    clock = [100.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    request = training.StopRequest()
    request.handle(signal.SIGINT, None)  # Ctrl-C in a terminal ...
    clock[0] += 0.5
    request.handle(signal.SIGTERM, None)  # ... and torchrun passing it on: still one request
    assert request.requested and request.signum == signal.SIGINT
    clock[0] += 5
    with pytest.raises(KeyboardInterrupt):  # a later one means: stop now
        request.handle(signal.SIGINT, None)


def test_rotation_keeps_the_newest_and_never_leaves_a_partial_checkpoint(tmp_path):
    for step in (1, 2, 3):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt"):
            (folder / name).write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(EMPTY_SAFETENSORS)
        (folder / "run_config.json").write_text('{"flags": {"base_model": "builtin:tiny-llama"}}')  # the run's own
        os.utime(folder, (step, step))
    (tmp_path / "checkpoint-9").mkdir()  # incomplete (say, copied by hand): never latest, never deleted
    (tmp_path / "checkpoint-9" / "trainer_state.json").write_text("{}")
    assert checkpoints.missing_parts(tmp_path / "checkpoint-9") == ["adapter weights", "optimizer.pt", "scheduler.pt"]
    assert checkpoints.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    checkpoints.rotate(tmp_path, 2, newest=tmp_path / "checkpoint-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-9"]
    checkpoints.rotate(tmp_path, 1, newest=tmp_path / "checkpoint-2")  # a resumed older run: its newest stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-9"]


def test_checkpoints_reach_the_disk_before_their_renames_and_deletions(tmp_path, monkeypatch):
    """fsync every file and folder of a checkpoint before it is renamed into place, and the output folder
    before a predecessor is deleted: after a power loss no checkpoint-N is an empty shell of a deleted one."""
    events, real = [], {"fsync": os.fsync, "rename": os.rename, "replace": os.replace, "rmtree": shutil.rmtree}

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real["fsync"](fd)

    def renamer(how):
        def rename(source, target, **kwargs):
            events.append(("rename", str(source)))
            return real[how](source, target, **kwargs)

        return rename

    def rmtree(path, **kwargs):
        events.append(("delete", str(path)))
        return real["rmtree"](path, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", renamer("rename"))
    monkeypatch.setattr(os, "replace", renamer("replace"))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    staged, old = tmp_path / checkpoints.STAGING / "checkpoint-2", tmp_path / "checkpoint-1"
    files = (staged / "adapter_model.safetensors", staged / "sub" / "state.pt")
    for path in (*files, old / "optimizer.pt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"written")
    checkpoints.publish(staged, tmp_path / "checkpoint-2")
    moved = events.index(("rename", str(staged)))
    assert all(events.index(("fsync", str(path))) < moved for path in (*files, staged / "sub", staged)), events
    assert ("fsync", str(tmp_path)) in events[moved:]  # the rename itself is on disk
    events.clear()
    checkpoints.retire(old)
    doomed = str(tmp_path / f"{checkpoints.DELETING}checkpoint-1")
    assert events == [("rename", str(old)), ("fsync", str(tmp_path)), ("delete", doomed)]


def test_the_adapter_record_is_written_before_its_manifest_and_listed_in_it(tmp_path, finished_run):
    recorded = integrity.read_manifest(finished_run)["files"]
    assert recorded[RUN_CONFIG] == integrity.file_digest(finished_run / RUN_CONFIG)
    copy = tmp_path / "adapter"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    record = (copy / RUN_CONFIG).read_text()
    assert '"seed": 42' in record
    (copy / RUN_CONFIG).write_text(record.replace('"seed": 42', '"seed": 43'))  # same size, another record
    told = f"{RUN_CONFIG} is damaged: its sha256 differs from the one in {MANIFEST}"
    assert_user_error(merge_cli(copy, tmp_path / "merged"), "merge.py", told)


@pytest.mark.parametrize(
    "header, told",
    [
        (None, "its header claims 100 MB, more than the 100 MB safetensors reads"),
        (b"[" * 100_000, "its header nests too deeply to be a table of tensors"),
        (b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}    ', "the header entry of w is malformed"),
        (b'{"w": {"dtype": "F32", "shape": {"a": 1}, "data_offsets": [0, 4]}}', "the header entry of w is malformed"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]', "its header is not valid JSON"),
    ],
    ids=["huge", "nested", "dtype-list", "shape-table", "bad-json"],
)
def test_every_malformed_safetensors_header_is_one_line_naming_the_file(tmp_path, header, told):
    from platy.cli import UserError

    path = tmp_path / "model.safetensors"
    if header is None:  # a claim just over safetensors' limit, in a (sparse) file long enough to hold it
        with open(path, "wb") as handle:
            handle.write((integrity.SAFETENSORS_HEADER_LIMIT + 1).to_bytes(8, "little"))
            handle.truncate(integrity.SAFETENSORS_HEADER_LIMIT + 64)
    else:
        path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(UserError) as raised:
        integrity.check_safetensors(path, "--base_model base", "download it again")
    assert str(raised.value) == f"--base_model base: model.safetensors is damaged: {told}; download it again"


def test_resuming_with_other_settings_is_pointed_out(tmp_path, capsys):
    from platy.train import config

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    saved = {"flags": {"batch_size": 16, "learning_rate": 4e-4, "seed": 42}, "data": {"fingerprint": "abc"}}
    (folder / "run_config.json").write_text(json.dumps(saved))
    config.note_changed_settings(str(folder), {"batch_size": 32, "learning_rate": 4e-4, "seed": 42}, "def")
    out = capsys.readouterr().out
    assert "Note: resuming from checkpoint-2 with settings that differ from its run" in out
    assert "batch_size 16 -> 32" in out and "the data rows (another fingerprint)" in out
    assert "learning_rate" not in out and "seed" not in out


# ---- files damaged or cut short after they were written (platy/integrity.py) ----


def cut(path, keep=0.5):
    """Keep the first half of a file, as an interrupted download or copy leaves it."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def flip(path, at=None):
    """Change one byte (by default the middle one, inside the data), as a failing disk or copy does."""
    data = bytearray(Path(path).read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def flip_in_member(path):
    """Change one byte inside the largest member of a torch.save archive (its zip directory stays whole)."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = Path(path).read_bytes()
    offset = member.header_offset
    start = offset + 30 + int.from_bytes(data[offset + 26 : offset + 28], "little")
    start += int.from_bytes(data[offset + 28 : offset + 30], "little")
    flip(path, start + member.file_size // 2)


def unfinished_copy(run, tmp_path):
    """The finished run as if it had stopped after its last checkpoint: no run_config.json marker."""
    out = tmp_path / "out"
    shutil.copytree(run, out)
    (out / RUN_CONFIG).unlink()
    return out


def test_auto_resume_skips_damaged_checkpoints_and_ends_with_the_same_adapter(tmp_path, finished_run, uninterrupted):
    out = unfinished_copy(finished_run, tmp_path)
    flip(out / "checkpoint-4" / "optimizer.pt")  # inside a tensor: only its sha256 tells
    cut(out / "checkpoint-3" / MANIFEST)
    resumed = finetune(out, *RUN, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notes = [line for line in resumed.stdout.splitlines() if line.startswith("Note: skipping")]
    assert notes == [
        "Note: skipping checkpoint-4: optimizer.pt is damaged: its sha256 differs from the one in manifest.json; "
        "skipping checkpoint-3: manifest.json is damaged (its content does not match its checksum); "
        f"using {out / 'checkpoint-2'} instead"
    ]
    assert f"Resuming from {out / 'checkpoint-2'}" in resumed.stdout
    assert largest_difference(adapter(out), uninterrupted) <= 1e-5
    # the checkpoints written again and the final adapter carry sound manifests
    assert [p.name for _, p in checkpoints.checkpoint_steps(out)] == ["checkpoint-4", "checkpoint-3", "checkpoint-2"]
    assert all(checkpoints.checkpoint_problem(p) is None for _, p in checkpoints.checkpoint_steps(out))
    assert (out / MANIFEST).is_file() and integrity.folder_problem(out) is None


def without_manifest_flipped_optimizer(checkpoint):
    (checkpoint / MANIFEST).unlink()
    flip_in_member(checkpoint / "optimizer.pt")


@pytest.mark.parametrize(
    "damage, told",
    [
        (lambda c: cut(c / "optimizer.pt"), "optimizer.pt is cut short: 153 KB of 306 KB"),
        (lambda c: flip(c / "adapter_model.safetensors"), "adapter_model.safetensors is damaged: its sha256 differs"),
        (lambda c: flip(c / MANIFEST), "manifest.json is damaged"),
        (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
        (lambda c: (c / "scheduler.pt").unlink(), "the checkpoint is incomplete (scheduler.pt missing)"),
        # a checkpoint without its manifest: the CRC-32 of each archive member stands in for the sha256
        (
            lambda c: ((c / MANIFEST).unlink(), flip_in_member(c / "optimizer.pt")),
            "optimizer.pt is damaged: its member",
        ),
    ],
    ids=["cut-optimizer", "flipped-adapter", "flipped-manifest", "missing-rng", "missing-scheduler", "no-manifest"],
)
def test_a_damaged_checkpoint_named_for_resume_is_refused(tmp_path, finished_run, damage, told):
    out = unfinished_copy(finished_run, tmp_path)
    checkpoint = out / "checkpoint-4"
    damage(checkpoint)
    before = sorted(p.name for p in out.iterdir())
    result = finetune(out, *RUN, "--resume_from_checkpoint", checkpoint)
    assert_user_error(result, "finetune.py", f"--resume_from_checkpoint {checkpoint}: ", told)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing removed


def test_an_unreadable_state_file_is_named_when_the_trainer_reads_it(tmp_path):
    import torch

    from platy.cli import UserError
    from platy.train.trainer import states_readable

    torch.save({"lr": 1.0}, tmp_path / "scheduler.pt")
    # a whole zip with sound CRCs that is no torch archive: it passes every check but loading
    with zipfile.ZipFile(tmp_path / "rng_state.pth", "w") as archive:
        archive.writestr("notes.txt", "not a torch archive")
    with pytest.raises(UserError, match=rf"^--resume_from_checkpoint {tmp_path}: rng_state.pth cannot be read \("):
        with states_readable(str(tmp_path)):
            torch.load(tmp_path / "rng_state.pth", weights_only=True)


def test_a_cut_base_model_is_refused_before_anything_is_written(tmp_path, finished_run, tiny_llama):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    cut(base / "model.safetensors")
    told = f"--base_model {base}: model.safetensors is cut short: 1.12 MB of 2.23 MB; download or copy"
    merged = merge_cli(finished_run, tmp_path / "merged", "--base_model", base)
    assert_user_error(merged, "merge.py", told)
    inference = run_cli([sys.executable, str(REPO / "inference.py"), "--base_model", base, "--prompt", "Hi"])
    assert_user_error(inference, "inference.py", told)
    trained = finetune(tmp_path / "trained", base_model=base)
    assert_user_error(trained, "finetune.py", told)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no merged model, no partial folder, no run


def sharded_copy(model, folder):
    """The model split into two safetensors shards with their index, as the hub holds large models."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(str(Path(model) / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for number, part in enumerate((names[::2], names[1::2]), start=1):
        shard = f"model-{number:05d}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / integrity.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def moved_tensor(index):
    """Change one byte of the index: its first tensor now points at the other shard."""
    data = bytearray(index.read_bytes())
    data[data.index(b"00001-of") + 4] = ord("2")
    index.write_bytes(bytes(data))


SHARD_2 = "model-00002-of-00002.safetensors"


def index_path(base):
    return base / integrity.SAFETENSORS_INDEX


@pytest.mark.parametrize(
    "damage, told",
    [
        (
            lambda b: (b / "model-00002-of-00002.safetensors").unlink(),
            "lists 1 missing weight file(s), e.g. model-0000",
        ),
        (lambda b: cut(index_path(b)), "model.safetensors.index.json is damaged (not a readable weight map)"),
        (lambda b: moved_tensor(index_path(b)), "model.safetensors.index.json places "),
        (lambda b: flip(b / "model-00001-of-00002.safetensors", at=20), "model-00001-of-00002.safetensors is damaged"),
    ],
    ids=["absent-shard", "cut-index", "flipped-index", "flipped-shard-header"],
)
def test_a_damaged_sharded_base_is_refused_by_merge(tmp_path, finished_run, tiny_llama, damage, told):
    base = sharded_copy(tiny_llama, tmp_path / "base")
    damage(base)
    result = merge_cli(finished_run, tmp_path / "merged", "--base_model", base)
    assert_user_error(result, "merge.py", f"--base_model {base}: ", told)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize(
    "damage, told",
    [
        (cut, "adapter_model.safetensors is cut short: 74.5 KB of 149 KB"),
        (flip, "adapter_model.safetensors is damaged: its sha256 differs from the one in manifest.json"),
    ],
    ids=["cut", "flipped"],
)
def test_a_damaged_adapter_is_refused_by_merge(tmp_path, finished_run, damage, told):
    folder = tmp_path / "adapter"
    shutil.copytree(finished_run, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    damage(folder / "adapter_model.safetensors")
    result = merge_cli(folder, tmp_path / "merged")
    assert_user_error(result, "merge.py", f"--peft_model_path {folder}: {told}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def check(folder):
    return run_cli([sys.executable, str(REPO / "merge.py"), "--check", str(folder)])


def test_merge_records_each_shard_sha256_and_check_finds_a_damaged_copy(tmp_path, finished_run):
    out = tmp_path / "merged"
    merged = merge_cli(finished_run, out, "--max_shard_size", "600KB", "--method", "peft")
    assert merged.returncode == 0, merged.stderr[-3000:]
    recorded = json.loads((out / "merge_config.json").read_text())["checksums"]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 2 and {*shards, integrity.SAFETENSORS_INDEX, "config.json", RUN_CONFIG} <= set(recorded)
    # every file the merge wrote but the record of the checksums and the card that --verify rewrites
    assert sorted(recorded) == sorted(p.name for p in out.iterdir() if p.name not in ("merge_config.json", "README.md"))
    assert any(name.startswith("tokenizer") for name in recorded)
    assert all(integrity.file_digest(out / name) == record for name, record in recorded.items())
    good = check(out)
    assert good.returncode == 0, good.stderr[-2000:]
    assert f"Checked {out}: {len(recorded)} file(s)" in good.stdout and "sha256 match merge_config.json" in good.stdout
    unchecked = "not checked: README.md (the card, rewritten by --verify), merge_config.json (it holds the checksums)"
    assert good.stdout.strip().endswith(unchecked)
    assert check(finished_run / "checkpoint-4").returncode == 0  # a checkpoint against its manifest

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    flip(copy / shards[1])
    told = f"{copy}: {shards[1]} is damaged: its sha256 differs from the one in merge_config.json"
    assert_user_error(check(copy), "merge.py", told)
    cut(copy / shards[0])
    assert_user_error(check(copy), "merge.py", f"{copy}: {shards[0]} is cut short: ")
    for companion in ("config.json", "tokenizer_config.json"):  # not only the weights
        shutil.copytree(out, copy, dirs_exist_ok=True)
        flip(copy / companion)
        told = f"{copy}: {companion} is damaged: its sha256 differs from the one in merge_config.json"
        assert_user_error(check(copy), "merge.py", told)
