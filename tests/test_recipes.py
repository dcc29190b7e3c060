"""The recipes of the seed systems: published numbers in the plan, every recipe run on CPU, scale-out."""

import json
import os
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SAMPLE, assert_user_error, run_cli

RECIPES = REPO / "recipes"

# What each system published (shared/seeds; Platypus2-70B's learning rate from the issue, which
# quotes the Platypus2 paper), in finetune.py's flag names. test_the_table_matches_the_seeds
# checks these against the seeds' tables (tests/fixtures/seeds/hyperparameters).
PLATYPUS = dict(
    batch_size=16,
    micro_batch_size=1,
    num_epochs=1,
    warmup_steps=100,
    weight_decay=0.0,
    lr_scheduler="cosine",
    lora_r=16,
    lora_alpha=16,
    lora_dropout=0.05,
    cutoff_len=4096,
    lora_target_modules={"gate_proj", "up_proj", "down_proj"},
    train_on_inputs=False,
    group_by_length=False,
    add_eos_token=False,
    prompt_template_name="alpaca",
)
PUBLISHED = {
    # the base in 8-bit, as Platypus's published finetune.py loads it (load_in_8bit)
    "platypus2-13b": dict(
        PLATYPUS,
        learning_rate=4e-4,
        quantization="8bit",
        base_model="meta-llama/Llama-2-13b-hf",
        data_path="garage-bAInd/Open-Platypus",
    ),
    "platypus2-70b": dict(
        PLATYPUS,
        learning_rate=3e-4,
        quantization="8bit",
        base_model="meta-llama/Llama-2-70b-hf",
        data_path="garage-bAInd/Open-Platypus",
    ),
    "platyi-34b-llama-q": dict(
        PLATYPUS,
        learning_rate=3e-4,
        warmup_steps=100,
        quantization="4bit",
        base_model="chargoddard/Yi-34B-Llama",
        data_path="garage-bAInd/Open-Platypus",
    ),
    "platyi-34b-q": dict(
        PLATYPUS,
        learning_rate=4e-4,
        warmup_steps=0,
        quantization="4bit",
        base_model="01-ai/Yi-34B",
        data_path="garage-bAInd/Open-Platypus",
    ),
    "ko-platypus2-13b": dict(
        PLATYPUS, learning_rate=4e-4, base_model="meta-llama/Llama-2-13b-hf", data_path="kyujinpy/KOpen-platypus"
    ),
    "kot-platypus2-7b": dict(
        batch_size=64,
        micro_batch_size=1,
        num_epochs=15,
        learning_rate=1e-5,
        cutoff_len=4096,
        lr_scheduler="linear",
        base_model="kyujinpy/KO-Platypus2-7B-ex",
        data_path="kyujinpy/KoCoT_2000",
    ),
    # batch 14 per GPU on 8 GPUs: checked through the accumulation, see below
    "dolphin-orca-platypus-llama-70b": dict(
        lora_r=16,
        lora_alpha=16,
        learning_rate=3e-4,
        lr_scheduler="cosine",
        num_epochs=1,
        quantization="4bit",
        base_model="meta-llama/Llama-2-70b-hf",
    ),
}
SHAPE_PARAMETERS = {  # parameter counts of the published shapes (meta-device build)
    "meta-llama/Llama-2-13b-hf": "13.02 B",
    "meta-llama/Llama-2-70b-hf": "68.98 B",
    "01-ai/Yi-34B": "34.39 B",
    "chargoddard/Yi-34B-Llama": "34.39 B",
    "kyujinpy/KO-Platypus2-7B-ex": "6.74 B",
}


def launch(name, env):
    """Start a recipe the way a user does; returns the running process."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        ["bash", str(RECIPES / f"{name}.sh")],
        cwd=env.get("CWD", REPO),
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_all(jobs, workers):
    """{name: (returncode, stdout, stderr)} for {name: env}, a few at a time."""

    def one(item):
        name, env = item
        proc = launch(name, env)
        out, err = proc.communicate(timeout=600)
        return name, (proc.returncode, out, err)

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, jobs.items()))


def printed_flags(stdout):
    """The `name=value` pairs of the printed run configuration."""
    block = re.split(r"Run configuration[^\n]*:\n", stdout, maxsplit=1)[1].split("Plan", 1)[0]
    return dict(re.findall(r"(\w+)=('[^']*'|\[[^\]]*\]|\S+)", block))


def assert_published(flags, published, name):
    for key, want in published.items():
        got = flags[key]
        if isinstance(want, set):
            got = set(re.findall(r"'(\w+)'", got)) if isinstance(got, str) else set(got)
        elif isinstance(got, str):
            got = got.strip("'")
            got = {"True": True, "False": False}.get(got, got)
            if isinstance(want, (int, float)) and not isinstance(want, bool):
                got = float(got)
        assert got == want, (name, key, got, want)


RECORDER = """#!/usr/bin/env bash
# stands in for python: records the command a recipe launches instead of running it
if [ "$1" = "-c" ]; then exit 1; fi  # probes (GPU count, flash-attn) find nothing
printf '%s\\0' "$@" > "$RECORD"
env | grep -E '^(WORLD_SIZE|LOCAL_WORLD_SIZE|RANK)=' > "$RECORD.env"
"""


def recorded_launch(name, tmp_path, env):
    """The recipe's bash runs for real; its finetune.py command is recorded: (recipe stdout, argv, env)."""
    recorder = tmp_path / "python"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    record = tmp_path / f"{name}.args"
    result = run_cli(
        ["bash", str(RECIPES / f"{name}.sh")], cwd=tmp_path, env={**env, "PYTHON": str(recorder), "RECORD": str(record)}
    )
    assert result.returncode == 0, (name, result.stderr[-2000:])
    argv = record.read_text().split("\0")[:-1]
    launched_env = dict(line.split("=", 1) for line in Path(f"{record}.env").read_text().split())
    return result.stdout, argv, launched_env


def dry_run_in_process(argv, env, monkeypatch, capsys):
    """finetune.py's dry run on the recorded command line, in this process (no interpreter start per recipe)."""
    from platy import cli

    assert Path(argv[0]) == REPO / "finetune.py"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cli.call(cli.script_entry("finetune"), argv[1:])
    return capsys.readouterr().out


def check_plan(name, out, world, nodes):
    flags = printed_flags(out)
    assert_published(flags, PUBLISHED[name], name)
    batch, micro = int(flags["batch_size"]), int(flags["micro_batch_size"])
    accumulation = batch // (micro * world)
    assert f"batch: global {batch} = micro batch {micro} x gradient accumulation {accumulation} x {world}" in out, name
    assert f"processes: {world} = {nodes} node(s) x {world // nodes} per node" in out, name
    assert f"tokens per optimizer step: up to {batch * 4096:,}" in out, name
    base = PUBLISHED[name]["base_model"]
    assert re.search(rf"shape from (published config|assumed|Yi-34B's published config)[^)]* of {base}\)", out), name
    assert f"{SHAPE_PARAMETERS[base]} parameters" in out, name
    memory = re.search(
        r"GPU memory per process \(on GPUs computing in bf16;[^)]*\): weights ([\d.]+) GiB.* = ([\d.]+) GiB", out
    )
    assert memory and 0 < float(memory[1]) < float(memory[2]), (name, out[-1500:])
    assert "Dry run: nothing was loaded or written" in out
    return flags, float(memory[1])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_dry_run_prints_the_published_numbers_and_the_plan(name, tmp_path, monkeypatch, capsys):
    """DRY_RUN=1 for 2 nodes x 4 GPUs: the seeds' values, accumulation, tokens per step, memory; nothing loaded."""
    recipe_out, argv, env = recorded_launch(name, tmp_path, {"DRY_RUN": "1", "NPROC": "4", "NNODES": "2"})
    assert "Recipe " in recipe_out and "assumes:" in recipe_out and PUBLISHED[name]["base_model"] in recipe_out
    assert env == {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "RANK": "0"}
    out = dry_run_in_process(argv, env, monkeypatch, capsys)
    flags, weights = check_plan(name, out, world=8, nodes=2)
    assert {p.name for p in tmp_path.iterdir()} == {"python", f"{name}.args", f"{name}.args.env"}, (
        "a dry run writes nothing"
    )
    if name == "dolphin-orca-platypus-llama-70b":
        assert "micro batch 1 x gradient accumulation 14 x 8" in out  # 14 per GPU
        assert flags["deepspeed"].endswith("configs/zero2.json'") and "DeepSpeed ZeRO-2" in out
        assert re.search(r"data_path='garage-bAInd/Open-Platypus:1.0,\S+dolphin:0.01,\S+OpenOrca:0.01'", out)
        assert 30 < weights < 45, "4-bit 70B weights: about a quarter of the 16-bit ones"
    if name == "platypus2-70b":
        assert 60 < weights < 70, "8-bit 70B weights: about half the 16-bit ones"


def test_dry_run_end_to_end_checks_the_fit(tmp_path):
    """The real command line: recipe, launcher, finetune.py --dry_run, against an 80 GB GPU."""
    result = run_cli(
        ["bash", str(RECIPES / "platyi-34b-q.sh"), "--gpu_memory_gb", "80"],
        cwd=tmp_path,
        env={"DRY_RUN": "1", "NPROC": "8", "NNODES": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    check_plan("platyi-34b-q", result.stdout, world=8, nodes=1)
    assert re.search(r"fit: [\d.]+ GiB estimated fits in 80 GiB per GPU", result.stdout)
    assert not any(p for p in tmp_path.iterdir())


def test_tiny_runs_every_recipe(tmp_path):
    """TINY=1: each recipe trains the tiny model on the sample data with its own batch, LoRA and quantization,
    and the quick start's schedule (recipes/demo-settings.sh); MAX_STEPS=1 keeps the test short.

    Platypus2-13B runs as two processes meeting at a rendezvous endpoint (RDZV_ID), KoT-platypus2 as full
    fine-tuning with an overridden warmup, Dolphin exports with both merge methods.
    """
    jobs = {
        name: {"TINY": "1", "MAX_STEPS": "1", "OUTPUT_DIR": str(tmp_path / name), "CWD": str(tmp_path)}
        for name in PUBLISHED
    }
    # overrides from the environment, full fine-tuning, and the export with both merge methods
    jobs["kot-platypus2-7b"].update(FINETUNING="full", WARMUP_STEPS="0")
    jobs["dolphin-orca-platypus-llama-70b"].update(EXPORT="1")
    # two processes that meet at a c10d rendezvous endpoint (torchrun), as nodes of a multi-node job do
    jobs["platypus2-13b"].update(NPROC="2", RDZV_ID="platy-test", MASTER_PORT=str(free_port()))
    results = run_all(jobs, workers=2)
    for name, (code, _out, err) in results.items():
        assert code == 0, (name, err[-3000:])
        config = json.loads((tmp_path / name / "run_config.json").read_text())
        published = {k: v for k, v in PUBLISHED[name].items() if k not in ("base_model", "data_path", *DEMO_SCHEDULE)}
        assert_published(config["flags"], published, name)
        assert config["flags"]["warmup_steps"] == (0 if name == "kot-platypus2-7b" else DEMO_SCHEDULE["warmup_steps"])
        assert config["flags"]["learning_rate"] == DEMO_SCHEDULE["learning_rate"], name
        assert config["flags"]["base_model"] == "builtin:tiny-llama" and config["flags"]["data_path"] == str(SAMPLE)
        assert config["result"]["global_step"] == 1, "TINY caps the run at one optimizer step"
    ddp = json.loads((tmp_path / "platypus2-13b" / "run_config.json").read_text())["resolved"]
    assert ddp["world_size"] == 2 and ddp["gradient_accumulation_steps"] == 8  # 16 / (1 x 2)
    assert ddp["plan"]["strategy"] == "ddp" and results["platypus2-13b"][1].count("Done:") == 1
    kot = json.loads((tmp_path / "kot-platypus2-7b" / "run_config.json").read_text())
    assert kot["flags"]["finetuning"] == "full" and kot["flags"]["warmup_steps"] == 0
    trained = load_file(tmp_path / "kot-platypus2-7b" / "model.safetensors")
    base = load_file(Path(kot["resolved"]["base_model_path"]) / "model.safetensors")
    changed = [k for k in base if k in trained and not torch.equal(base[k], trained[k])]
    assert len(changed) == len(base), "full fine-tuning updates every weight"
    dolphin = results["dolphin-orca-platypus-llama-70b"][1]
    assert dolphin.count("Recipe Dolphin_ORCA_PlatyPus_LLaMA_70b") == 1
    for method in ("dequant", "peft"):
        merged = tmp_path / f"dolphin-orca-platypus-llama-70b-merged-{method}"
        assert json.loads((merged / "merge_config.json").read_text())["method"] == method
        assert (merged / "model.safetensors").is_file()


# what TINY=1 takes from the quick start instead of the recipe (recipes/demo-settings.sh)
DEMO_SCHEDULE = {"learning_rate": 1e-2, "warmup_steps": 5, "num_epochs": 2, "val_set_size": 24, "eval_steps": 7}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_recipe_overrides_are_refused_before_loading(tmp_path):
    result = run_cli(
        ["bash", str(RECIPES / "kot-platypus2-7b.sh")],
        cwd=tmp_path,
        env={"TINY": "1", "FINETUNING": "full", "QUANTIZATION": "4bit", "LEARNING_RATE": "-1"},
    )
    assert_user_error(result, "finetune.py", "--finetuning full", "--quantization none", "--learning_rate")


# the hyperparameter tables of ../shared/seeds/0*.txt, table rows only, kept with the tests
SEED_TABLES = Path(__file__).parent / "fixtures" / "seeds" / "hyperparameters"


def seed_tables(text):
    """Two-column markdown tables as {lower-cased name: value}."""
    return {
        k.strip().lower(): v.strip().strip("`") for k, v in re.findall(r"^\|([^|]+)\|([^|]+)\|\s*$", text, re.MULTILINE)
    }


def test_the_table_matches_the_seeds():
    text = {path.stem: path.read_text(encoding="utf-8") for path in SEED_TABLES.glob("0*.md")}
    llama_q, plain_q = text["000"].split("- PlatYi-34B-Q")
    names = {
        "learning rate": "learning_rate",
        "batch size": "batch_size",
        "microbatch  size": "micro_batch_size",
        "warmup steps": "warmup_steps",
        "weight decay": "weight_decay",
        "lr scheduler": "lr_scheduler",
        "lora alpha": "lora_alpha",
        "lora rank": "lora_r",
        "lora dropout": "lora_dropout",
        "cutoff length": "cutoff_len",
    }
    for recipe, table in (("platypus2-13b", text["003"]), ("platyi-34b-llama-q", llama_q), ("platyi-34b-q", plain_q)):
        rows = seed_tables(table)
        for seed_name, flag in names.items():
            value = rows[seed_name]
            want = PUBLISHED[recipe][flag]
            assert value == want if isinstance(want, str) else float(value) == want, (recipe, seed_name)
        assert {m.strip() for m in rows["lora target modules"].split(",")} == PUBLISHED[recipe]["lora_target_modules"]
    kot = seed_tables(text["002"])
    for seed_name, flag in (
        ("batch_size", "batch_size"),
        ("micro_batch_size", "micro_batch_size"),
        ("epochs", "num_epochs"),
        ("learning_rate", "learning_rate"),
        ("cutoff_len", "cutoff_len"),
    ):
        assert float(kot[seed_name]) == PUBLISHED["kot-platypus2-7b"][flag], seed_name
    assert kot["lr_scheduler"] == "linear" and kot["base_model"] == PUBLISHED["kot-platypus2-7b"]["base_model"]
    dolphin = seed_tables(text["001"])
    assert (dolphin["lora_rank"], dolphin["lora_alpha"], dolphin["batch_size"], dolphin["lr"]) == (
        "16",
        "16",
        "14",
        "3e-4",
    )
    assert dolphin["gpus"].startswith("8x") and dolphin["deepspeed"] == "ZERO-2"
    assert "kyujinpy/KOpen-platypus" in text["004"]


def test_sizing_counts_and_sharding():
    """Parameter counts from the published Llama-2-7B shape; what each strategy divides; FSDP's 4-bit storage."""
    from platy.modeling import meta_model, quantization_config
    from platy.train import sizing

    config, _ = sizing.published_config("meta-llama/Llama-2-7b-hf")
    counts = sizing.parameter_counts(meta_model(config), {"gate_proj", "up_proj", "down_proj"}, 16)
    assert counts["total"] == 6_738_415_616  # Llama-2-7B's published parameter count
    assert counts["lora"] == 32 * 3 * 16 * (4096 + 11008)
    common = dict(
        finetuning="lora",
        quantization="4bit",
        compute_bytes=2,
        double_quant=False,
        micro_batch_size=1,
        cutoff_len=4096,
        gradient_checkpointing=True,
        world_size=8,
    )
    ddp, zero2, fsdp = (sizing.estimate(config, counts, strategy=s, **common) for s in ("ddp", "zero2", "fsdp"))
    assert zero2["weights"] == ddp["weights"] and zero2["trainable_and_optimizer"] < ddp["trainable_and_optimizer"]
    assert fsdp["weights"] < ddp["weights"] / 8 + 0.01  # sharded, and no fp32 upcast under FSDP
    full = sizing.estimate(config, counts, strategy="ddp", **{**common, "finetuning": "full", "quantization": "none"})
    assert full["weights"] + full["trainable_and_optimizer"] == pytest.approx(16 * counts["total"] / sizing.GIB, 0.01)
    assert quantization_config("4bit", "bf16", quant_storage="bf16").bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config("4bit", "bf16").bnb_4bit_quant_storage == torch.uint8
