"""Data parallelism with torchrun on CPU (gloo), and the launcher users call."""

import json
import os
import re
import shutil
import sys

import torch
from safetensors.torch import load_file

from conftest import REPO, SAMPLE, run_cli, write_rows

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]


def test_torchrun_two_processes_keep_identical_adapters(tmp_path):
    out = tmp_path / "out"
    args = TORCHRUN + [
        str(REPO / "tests" / "ddp_driver.py"),
        "--base_model",
        "builtin:tiny-llama",
        "--data_path",
        str(SAMPLE),
        "--output_dir",
        str(out),
        "--batch_size",
        "8",
        "--micro_batch_size",
        "2",
        "--max_steps",
        "3",
        "--warmup_steps",
        "0",
        "--learning_rate",
        "1e-3",
        "--cutoff_len",
        "256",
        "--logging_steps",
        "1",
    ]
    result = run_cli(args, env={"DUMP_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(t.abs().sum() > 0 for n, t in rank0.items() if "lora_B" in n), "the adapter was trained"
    config = json.loads((out / "run_config.json").read_text())
    assert config["resolved"]["world_size"] == 2
    assert config["resolved"]["gradient_accumulation_steps"] == 2  # 8 / (2 x 2)
    assert result.stdout.count("Done:") == 1, "only rank 0 reports"
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == len(rank0)


def test_lora_knobs_under_torchrun_keep_ranks_identical_and_resume_exactly(tmp_path):
    """DoRA, LoRA+, NEFTune and an 8-bit optimizer over two processes: the ranks hold the same adapter
    and optimizer groups, and resuming checkpoint-2 under torchrun ends bit for bit where the whole run did."""
    knobs = ["--use_dora", "True", "--loraplus_lr_ratio", "16", "--neftune_noise_alpha", "5"]
    knobs += ["--optim", "adamw_bnb_8bit", "--save_steps", "2", "--max_steps", "3", "--warmup_steps", "0"]
    common = ["--base_model", "builtin:tiny-llama", "--data_path", str(SAMPLE), "--cutoff_len", "128"]
    common += ["--batch_size", "8", "--micro_batch_size", "2", "--learning_rate", "1e-3", *knobs]
    driver = [*TORCHRUN[:-1], "29537", str(REPO / "tests" / "ddp_driver.py")]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for dump in (whole, resumed):
        dump.mkdir()
    first = run_cli([*driver, *common, "--output_dir", str(tmp_path / "run")], env={"DUMP_DIR": str(whole)})
    assert first.returncode == 0, first.stderr[-4000:]
    shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / "checkpoint-2")
    again = [*driver, *common, "--output_dir", str(tmp_path / "again")]
    again += ["--resume_from_checkpoint", str(tmp_path / "checkpoint-2"), "--trust_checkpoint"]
    second = run_cli(again, env={"DUMP_DIR": str(resumed)})
    assert second.returncode == 0, second.stderr[-4000:]
    losses = [
        {r["step"]: r["loss"] for r in json.loads((tmp_path / run / "log_history.json").read_text()) if "loss" in r}
        for run in ("run", "again")
    ]
    assert "Resuming from" in second.stdout and losses[1] == losses[0]  # steps 1-2 come from the checkpoint
    ranks = [load_file(folder / f"rank{r}.safetensors") for folder in (whole, resumed) for r in (0, 1)]
    assert ranks[0] and any("magnitude" in name for name in ranks[0]), "DoRA magnitudes are trained"
    for other in ranks[1:]:
        assert other.keys() == ranks[0].keys()
        assert all(torch.equal(ranks[0][name], other[name]) for name in ranks[0])
    for rank in (0, 1):  # LoRA+ groups on every rank: B (and the magnitudes) at 16 x A's learning rate
        rates = json.loads((whole / f"rank{rank}-lr.json").read_text())
        assert {r for n, r in rates.items() if "lora_A" in n} == {1e-3}
        assert {r for n, r in rates.items() if "lora_A" not in n} == {16e-3}
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["flags"]["loraplus_lr_ratio"] == 16


def test_launcher_with_a_base_model_runs_platypus_recipe(tmp_path):
    """`BASE_MODEL=... bash fine-tuning.sh`: Platypus's hyperparameters, a whole epoch (the quick start's own
    settings apply only without BASE_MODEL: test_first_run.py)."""
    rows = write_rows(tmp_path / "rows.json", json.loads(SAMPLE.read_text())[:40])
    env = {"BASE_MODEL": "builtin:tiny-llama", "DATA_PATH": str(rows)}
    result = run_cli(["bash", str(REPO / "fine-tuning.sh")], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "outputs" / "platypus-qlora"
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "run_config.json").read_text())
    flags = config["flags"]
    assert (flags["learning_rate"], flags["batch_size"], flags["micro_batch_size"], flags["warmup_steps"]) == (
        4e-4,
        16,
        1,
        100,
    )
    assert (flags["lora_r"], flags["lora_alpha"], flags["lora_dropout"], flags["cutoff_len"]) == (16, 16, 0.05, 4096)
    assert flags["quantization"] == "4bit" and flags["lr_scheduler"] == "cosine" and flags["val_set_size"] == 0
    assert config["result"]["global_step"] == -(-40 // 16)
    assert "Done:" in result.stdout and str(out / "adapter_model.safetensors") in result.stdout


def test_launcher_uses_torchrun_for_several_processes(tmp_path):
    """The quick start on two processes: its 8 rows per step are split between them."""
    result = run_cli(
        ["bash", str(REPO / "fine-tuning.sh"), "--max_steps", "2"],
        cwd=tmp_path,
        env={"TINY": "1", "NPROC": "2", "OUTPUT_DIR": str(tmp_path / "o"), "MASTER_PORT": "29544"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((tmp_path / "o" / "run_config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["gradient_accumulation_steps"] == 1
    assert (config["flags"]["batch_size"], config["flags"]["micro_batch_size"]) == (8, 4)


def test_launcher_splits_the_quick_start_over_the_gpus_it_counts(tmp_path):
    """Without NPROC the launcher counts the GPUs (two here, as a stand-in python reports them) before the quick
    start's batch is split: 8 rows per step over two processes."""
    recorder = tmp_path / "python"
    recorder.write_text(
        '#!/usr/bin/env bash\nif [ "$1" = "-c" ]; then echo 2; exit 0; fi\nprintf "%s\\n" "$@" > "$RECORD"\n'
    )
    recorder.chmod(0o755)
    record = tmp_path / "args"
    result = run_cli(
        ["bash", str(REPO / "fine-tuning.sh")], cwd=tmp_path, env={"PYTHON": str(recorder), "RECORD": str(record)}
    )
    assert result.returncode == 0, result.stderr
    words = record.read_text().splitlines()
    assert words[:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes"]
    flags = {words[i][2:]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}  # last wins
    assert (flags["batch_size"], flags["micro_batch_size"]) == ("8", "4")


def test_launcher_works_from_a_copy_of_the_repository(tmp_path):
    """Templates and data are found next to the code, wherever it lives and runs from."""
    copy = tmp_path / "toolkit"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "outputs", "__pycache__", ".pytest_cache"))
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    result = run_cli(["bash", str(copy / "fine-tuning.sh"), "--max_steps", "1"], cwd=elsewhere, env={"TINY": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((elsewhere / "outputs" / "platypus-qlora" / "run_config.json").read_text())
    assert config["resolved"]["template"]["path"] == str(copy / "templates" / "alpaca.json")


def test_readme_quick_start_train_merge_generate(tmp_path):
    """The README's quick start, in order, on the real model (a few steps of it): fine-tuning.sh ends with the
    base and the fine-tuned model answering the held-out requests, then merge.sh --verify, then inference.py on
    the merged model; the card's commands work from where the user ran them."""
    train = run_cli(["bash", str(REPO / "fine-tuning.sh"), "--max_steps", "3"], cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert re.search(r"^\| builtin:smollm2-135m \| \d+\.\d\d \|$", train.stdout, re.M), train.stdout[-3000:]
    assert re.search(r"^\| platypus-qlora \| \d+\.\d\d \|$", train.stdout, re.M)
    assert "Answers to the first 5 prompts of platy_toolcalls:" in train.stdout
    adapter = tmp_path / "outputs" / "platypus-qlora"
    assert "python merge.py --peft_model_path ./outputs/platypus-qlora " in (adapter / "README.md").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert (adapter / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    merge = run_cli(["bash", str(REPO / "merge.sh"), "--verify"], cwd=tmp_path)
    assert merge.returncode == 0, merge.stderr[-3000:]
    merged = tmp_path / "outputs" / "platypus-merged"
    assert list(merged.glob("model*.safetensors")) and (merged / "README.md").is_file()
    tolerance = r"\(tolerance \S+ = 8 x float16 eps 0.00098 x max \|logit\| \S+\)"  # float16, the default
    assert re.search(r"Verify: PASS: largest \|logit difference\| \S+ " + tolerance, merge.stdout), merge.stdout
    assert "from_pretrained('./outputs/platypus-merged')" in (merged / "README.md").read_text()
    answer = run_cli(
        [
            sys.executable,
            str(REPO / "inference.py"),
            "--base_model",
            str(merged),
            "--prompt",
            "Set a timer for 25 minutes.",
            "--max_new_tokens",
            "24",
        ],
        cwd=tmp_path,
    )
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.strip()
