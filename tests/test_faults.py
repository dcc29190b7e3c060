"""Faults during training: preemption, kill -9, non-finite steps, full disks, a dead rank.

Faults are injected by tests/faults/sitecustomize.py (PLATY_FAULT) into real command lines.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from platy.train import checkpoints

from conftest import REPO, build_model, finetune, run_cli, write_rows

FAULTS = str(Path(__file__).parent / "faults")
RUN = ("--max_steps", 4, "--save_steps", 1)


def faulty(fault, rank=None):
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [FAULTS, os.environ.get("PYTHONPATH")])), "PLATY_FAULT": fault}
    if rank is not None:
        env["PLATY_FAULT_RANK"] = str(rank)
    return env


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def largest_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def last_line(result):
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The adapter of a 4-step run that nothing interrupts: every resumed run must end with it."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = finetune(out, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return adapter(out)


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
        env={**faulty("sigterm_after_step=2"), "NPROC": "2", "MASTER_PORT": "29561"},
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
        for name in ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
            (folder / name).write_text("{}")
        os.utime(folder, (step, step))
    (tmp_path / "checkpoint-9").mkdir()  # incomplete (say, copied by hand): never latest, never deleted
    (tmp_path / "checkpoint-9" / "trainer_state.json").write_text("{}")
    assert checkpoints.missing_parts(tmp_path / "checkpoint-9") == ["adapter weights", "optimizer.pt", "scheduler.pt"]
    assert checkpoints.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    checkpoints.rotate(tmp_path, 2, newest=tmp_path / "checkpoint-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-9"]
    checkpoints.rotate(tmp_path, 1, newest=tmp_path / "checkpoint-2")  # a resumed older run: its newest stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-9"]


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
