"""A new user's first runs, through the real command lines: the quick start learns and says what it shows,
reruns and requeues, closed pipes, and the messages that must say what is true (most stop before any weight
loads)."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE, assert_user_error, run_cli, write_rows

SCRIPTS = ("finetune.py", "merge.py", "inference.py", "refine.py", "evaluate.py")
TINY = {"TINY": "1"}  # the launchers' quick start on the tiny model (without it: the real model's)


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """`TINY=1 bash fine-tuning.sh` where the real quick start's run already is (docs/preference.md's order); one
    epoch of the demo's two keeps the test short (test_demo_settings_only_without_a_base_model checks the
    settings of the full quick start)."""
    cwd = tmp_path_factory.mktemp("quick")
    earlier = cwd / "outputs" / "platypus-qlora"
    earlier.mkdir(parents=True)
    flags = {"base_model": "builtin:smollm2-135m", "data_path": str(REPO / "data" / "toolcalls" / "train.json")}
    (earlier / "run_config.json").write_text(json.dumps({"flags": flags}, indent=2))
    result = run_cli(["bash", str(REPO / "fine-tuning.sh"), "--num_epochs", "1"], cwd=cwd, env=TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


def test_the_quick_start_learns_and_says_what_it_shows(quick_start):
    cwd, result = quick_start
    out = cwd / "outputs" / "platypus-qlora"
    assert "Replacing the previous quick-start run in ./outputs/platypus-qlora" in result.stdout
    first, last = map(float, re.search(r"eval loss (\d+\.\d+) -> (\d+\.\d+)", result.stdout).groups())
    assert first - last > 1.0, (first, last)
    assert "is a random tiny model" in result.stdout and "meaningless; its eval loss went" in result.stdout
    history = json.loads((out / "log_history.json").read_text())
    config = json.loads((out / "run_config.json").read_text())
    steps = config["result"]["global_step"]
    logged = [r["step"] for r in history if "loss" in r]
    assert len(logged) >= 10 and logged[-1] == steps, logged
    assert (out / "training_curves.png").stat().st_size > 10000
    assert config["flags"]["warmup_steps"] < steps / 5, "the warmup is scaled to the run"


def test_a_requeued_finished_run_exits_0_and_changes_nothing(quick_start):
    cwd, _ = quick_start
    out = cwd / "outputs" / "platypus-qlora"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    requeued = ["bash", str(REPO / "fine-tuning.sh"), "--num_epochs", "1", "--resume_from_checkpoint", "auto"]
    result = run_cli(requeued, cwd=cwd, env=TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = json.loads(before["run_config.json"])["result"]["global_step"]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"already finished: {steps} optimizer steps; nothing to do"), lines
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_merge_verify_gives_a_verdict_and_keeps_it(quick_start):
    cwd, _ = quick_start
    merged = cwd / "outputs" / "platypus-merged"
    merged.mkdir()  # an earlier quick-start merge: a rerun replaces it
    (merged / "merge_config.json").write_text(json.dumps({"base_model": "builtin:tiny-llama"}, indent=2))
    result = run_cli(["bash", str(REPO / "merge.sh"), "--verify"], cwd=cwd, env=TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Replacing the previous quick-start merge in ./outputs/platypus-merged" in result.stdout
    tolerance = r"\(tolerance \S+ = 8 x float16 eps 0.00098 x max \|logit\| \S+\)"
    assert re.search(r"Verify: PASS: largest \|logit difference\| \S+ " + tolerance, result.stdout), result.stdout
    verify = json.loads((merged / "merge_config.json").read_text())["verify"]
    assert verify["verdict"] == "PASS" and verify["tolerance"]["agreement"] == 0.99
    assert verify["tolerance"]["max_abs_diff"] == pytest.approx(8 * 2**-10 * verify["max_abs_logit"])
    card = (merged / "README.md").read_text()
    assert "**PASS**: largest logit difference" in card and "fine-tuned with QLoRA" in card


def test_an_adapter_given_as_the_base_model_points_to_lora_weights(quick_start):
    adapter = quick_start[0] / "outputs" / "platypus-qlora"
    result = run_cli([sys.executable, str(REPO / "inference.py"), "--base_model", str(adapter), "--prompt", "Hi"])
    assert_user_error(result, "inference.py", "an adapter folder, not a model", f"--lora_weights {adapter}")


@pytest.mark.parametrize(
    "flags",
    [
        {"base_model": "meta-llama/Llama-2-13b-hf", "data_path": "mine.json"},
        {"base_model": "builtin:tiny-llama", "data_path": "mine.json"},  # the quick start's base, the user's data
    ],
)
def test_a_users_finished_run_is_never_replaced(tmp_path, flags):
    user_run = tmp_path / "outputs" / "platypus-qlora"
    user_run.mkdir(parents=True)
    record = json.dumps({"flags": flags}, indent=2)
    (user_run / "run_config.json").write_text(record)
    result = run_cli(["bash", str(REPO / "fine-tuning.sh")], cwd=tmp_path, env=TINY)
    assert_user_error(result, "finetune.py", "already holds a finished run")
    assert "Replacing" not in result.stdout and (user_run / "run_config.json").read_text() == record


def test_demo_settings_only_without_a_base_model(tmp_path):
    """fine-tuning.sh alone uses recipes/demo-settings.sh; a user's base model keeps Platypus's values."""
    recorder = tmp_path / "python"
    recorder.write_text('#!/usr/bin/env bash\nif [ "$1" = "-c" ]; then exit 1; fi\nprintf "%s\\n" "$@" > "$RECORD"\n')
    recorder.chmod(0o755)

    def launched(**env):
        record = tmp_path / "args"
        result = run_cli(
            ["bash", str(REPO / "fine-tuning.sh")],
            cwd=tmp_path,
            env={"PYTHON": str(recorder), "RECORD": str(record), **env},
        )
        assert result.returncode == 0, result.stderr
        words = record.read_text().split("\n")
        return {words[i][2:]: words[i + 1] for i in range(1, len(words) - 1) if words[i].startswith("--")}

    demo, own = launched(**TINY), launched(BASE_MODEL="meta-llama/Llama-2-13b-hf")
    assert (demo["warmup_steps"], demo["learning_rate"], demo["val_set_size"]) == ("5", "1e-2", "24")
    assert (own["warmup_steps"], own["learning_rate"], own["val_set_size"]) == ("100", "4e-4", "0")
    real = launched()
    assert (real["base_model"], real["data_path"]) == ("builtin:smollm2-135m", str(REPO / "data/toolcalls/train.json"))
    assert (real["quantization"], real["lora_target_modules"], real["add_eos_token"]) == ("none", "all-linear", "True")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_into_a_closed_pipe_ends_quietly(script):
    """`script --help | head`: the reader has gone before the help is written; no traceback, status 0."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / script), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_misleading_messages_say_what_is_true(tmp_path):
    """Each message through finetune.py's command line; all stop before any weight loads."""
    finetune = [sys.executable, str(REPO / "finetune.py"), "--base_model", "builtin:tiny-llama"]
    qa = tmp_path / "qa.csv"
    qa.write_text("question,answer\nWhat is 2 + 2?,4\n")
    result = run_cli([*finetune, "--data_path", str(qa), "--output_dir", str(tmp_path / "a")])
    assert_user_error(result, "finetune.py", "the rows have answer, question", "question -> instruction")
    assert "missing 'response'" not in result.stderr

    result = run_cli([*finetune, "--data_path", str(SAMPLE), "--num_epochs", "two"])
    assert_user_error(result, "finetune.py", "--num_epochs must be a positive number, got 'two'")

    rows = write_rows(tmp_path / "rows.json", [{"instruction": "a", "output": "b"}] * 4)
    dry_run = ["--quantization", "none", "--precision", "fp32", "--dry_run", "True"]  # fp32 on any CPU
    result = run_cli([*finetune, "--data_path", str(rows), *dry_run])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "base weights not quantized (fp32)" in result.stdout
    assert "GPU memory per process (on GPUs computing in bf16; this machine has no GPU, so precision is fp32 here)" in (
        result.stdout
    )
    configuration = result.stdout.split("Plan", 1)[0]
    assert "wandb" not in configuration and "=''" not in configuration and "=None" not in configuration
