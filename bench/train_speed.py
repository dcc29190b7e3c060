"""Training throughput side by side: this toolkit's defaults and fastest settings, the original
Platypus settings, and TRL's SFTTrainer (QLoRA defaults, and padding-free), on the same synthetic data.

    python bench/train_speed.py                                  # tiny model, CPU, 4-bit
    python bench/train_speed.py --arch smollm2-135m --cutoff_len 512 --steps 24   # a real model, CPU
    python bench/train_speed.py --arch llama2-7b --cutoff_len 4096 --steps 20    # on a GPU
    python bench/train_speed.py --arch llama3-8b --cutoff_len 4096 --steps 20

The model is randomly initialised with the named architecture's shapes (built once and
cached under $PLATY_CACHE/bench-models), or for smollm2-135m the real SmolLM2-135M-Instruct
(builtin:smollm2-135m); LoRA r 16 on gate/up/down. The rows are synthetic with an
Open-Platypus-like length spread (bench/synthetic.py), tokenized with the model's tokenizer
(the random shapes carry the embedded tiny model's). Each configuration runs --steps optimizer
steps in a process of its own (so peak memory is its own); the first --untimed_steps of them
(kernel compilation, the allocator's growth, lazy set-up) are left out of the tokens and the time:
  (a0) toolkit-default: finetune.py's defaults (4-bit, micro batch 1, no packing, --precision auto,
                     --gradient_checkpointing auto) with the global batch of TRL's default (8);
  (a) toolkit:       --packing true, --micro_batch_tokens (default 2 x cutoff_len), no
                     activation checkpointing (--fast_checkpointing to change), SDPA
                     (FlashAttention 2 when flash-attn is installed), 4-bit (not quantized
                     for smollm2-135m: --fast_quantization to change);
  (a+) toolkit-liger: (a) with --liger (Liger's fused kernels; CUDA and liger-kernel only,
                     skipped with a note elsewhere); its mean loss is printed beside (a)'s, the
                     check that the kernels leave the loss unchanged;
  (b) platypus:      micro batch 1, padding, activation checkpointing on every layer, global batch 8;
  (c) trl:           TRL SFTTrainer with QLoRA and its defaults (prompt-completion rows, batch 8,
                     checkpointing on), in the precision --precision auto picks here;
  (d) trl-pad-free:  the same with padding_free=True (with packing_strategy bfd, as TRL
                     requires for padding-free batches that respect max_length).
(c) and (d) need trl (requirements-bench.txt); without it they are skipped with a note.

Printed per configuration, and appended to BENCHMARKS.md with the date, the device and the
library versions (--record_run false to leave it alone): trained (non-pad) tokens per
second, peak memory (GPU: max allocated; CPU: the process's peak resident memory), MFU, and
the ratio of each to (c); the loss curves (each configuration's training loss at a quarter, half,
three quarters and the end of its steps, with the tokens trained by then); then, for the
toolkit's configurations, the plan's memory estimate (what --dry_run prints for the same flags)
beside the measured peak. --results_file writes
the same figures as JSON, each configuration as soon as it has run (bench/gpu_check.py
renders BENCHMARKS.md's section from that file).
MFU = F x tokens/s / peak FLOP/s, with F = 4 N_frozen + 6 N_lora + 6 L d s FLOPs per token
(N_frozen: frozen linear weights incl. lm_head, no embedding; N_lora: LoRA weights; L
layers, d hidden size, s = sum of squared example lengths / sum of lengths). The peak is
the GPU's dense bf16 figure (H100/H200 989 TFLOP/s, A100 312) or --peak_tflops; on a CPU
MFU is shown only when --peak_tflops is given.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from platy import tiny  # noqa: E402
from platy.cli import UserError, entry_defaults, run, say, script_entry  # noqa: E402
from platy.files import cache_root, write_json  # noqa: E402
from platy.flags import from_signature  # noqa: E402
from platy.train import sizing  # noqa: E402
from platy.train.speed import cpu_precision, liger_unavailable  # noqa: E402

from synthetic import synthetic_rows  # noqa: E402

REAL_MODELS = tiny.PACKAGED_MODELS  # real weights: an --arch of these is the built-in model of that name
SHAPES = {
    "tiny": tiny.TINY_MODELS["tiny-llama"],
    "llama2-7b": sizing.LLAMA2_7B,
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}
CONFIGS = ("toolkit-default", "toolkit", "toolkit-liger", "platypus", "trl", "trl-pad-free")
LABELS = {
    "toolkit-default": "(a0) toolkit defaults",
    "toolkit": "(a) toolkit fastest",
    "toolkit-liger": "(a+) toolkit fastest with Liger",
    "platypus": "(b) original Platypus",
    "trl": "(c) TRL QLoRA defaults",
    "trl-pad-free": "(d) TRL padding-free",
}
TARGETS = ["gate_proj", "up_proj", "down_proj"]
LORA_R = 16
BATCH = 8  # the global batch of the unpacked configurations: TRL's default per-device batch
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def main(
    arch: str = "tiny",
    steps: int = 5,
    untimed_steps: int = 0,
    rows: int = 2000,
    cutoff_len: int = 1024,
    micro_batch_tokens: int = None,
    fast_checkpointing: float = 0.0,
    fast_quantization: str = None,
    peak_tflops: float = None,
    configs: str = ",".join(CONFIGS),
    seed: int = 0,
    record_run: bool = True,
    results_file: str = None,
    only: str = None,
    result_file: str = None,
):
    """Args:
    arch: Model: tiny, llama2-7b or llama3-8b (random weights of those shapes), or smollm2-135m (real weights).
    steps: Optimizer steps of every configuration.
    untimed_steps: The first optimizer steps of each configuration left out of the tokens and time.
    rows: Synthetic rows to draw the training examples from.
    cutoff_len: Longest example in tokens.
    micro_batch_tokens: Token budget of a micro-step in (a) (default 2 x cutoff_len).
    fast_checkpointing: --gradient_checkpointing of (a): 0 (off), a fraction, or 1.
    fast_quantization: --quantization of (a): 4bit, 8bit or none (default: none for smollm2-135m, whose
        135M weights fit anywhere and run faster unquantized on a CPU; 4bit for the random shapes).
    peak_tflops: The device's peak FLOP/s in TFLOP/s for MFU (default: known GPUs only).
    configs: Which configurations to run, comma-separated (toolkit-default, toolkit, toolkit-liger, platypus,
        trl, trl-pad-free).
    seed: Seed of the synthetic rows.
    record_run: Append the figures to BENCHMARKS.md (with the date, device and versions).
    results_file: Also write the figures as JSON here (rewritten after every configuration).
    only: (internal) run one configuration in this process.
    result_file: (internal) where that run writes its figures.
    """
    if arch not in (*SHAPES, *REAL_MODELS):
        raise UserError(f"--arch {arch}: choose one of {', '.join([*SHAPES, *REAL_MODELS])}")
    wanted = [c.strip() for c in str(configs).split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CONFIGS]
    if unknown:
        raise UserError(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    budget = micro_batch_tokens or 2 * cutoff_len
    if not 0 <= untimed_steps < steps:
        raise UserError(f"--untimed_steps {untimed_steps}: give 0 up to --steps - 1 ({steps - 1})")
    timing = (steps, untimed_steps)
    fast = (fast_checkpointing, fast_quantization or ("none" if arch in REAL_MODELS else "4bit"))
    if only:
        return run_one(only, arch, timing, rows, cutoff_len, budget, fast, seed, result_file)
    model_dir = bench_model(arch)
    lengths = example_lengths(model_dir, rows, seed, cutoff_len)
    s = sum(n * n for n in lengths) / sum(lengths)
    flops_per_token = model_flops_per_token(model_dir, s)
    peak = peak_tflops or detect_peak_tflops()
    weights = "real weights" if arch in REAL_MODELS else "random weights"
    summary = (
        f"{arch} ({weights}), LoRA r {LORA_R} on {', '.join(TARGETS)}; (a) {fast[1]}, the others 4-bit; "
        f"{rows} synthetic rows, "
        f"cutoff_len {cutoff_len}, {steps} optimizer steps each{timed_words(steps, untimed_steps)}; "
        f"s = {s:.0f} tokens; "
        f"F = {flops_per_token / 1e6:.2f} MFLOP/token; peak {peak or 'unknown'} TFLOP/s."
    )
    say(f"{summary} Model: {model_dir}")
    figures = {"summary": summary, "flops_per_token": flops_per_token, "peak_tflops": peak, "results": {}}
    figures["skipped"] = skipped = {}
    results = figures["results"]
    for name in wanted:
        if name.startswith("trl") and not has_trl():
            skipped[name] = "trl is not installed (pip install -r requirements-bench.txt)"
        elif name == "toolkit-liger" and liger_unavailable():
            skipped[name] = liger_unavailable()
        else:
            results[name] = run_child(name, arch, timing, rows, cutoff_len, budget, fast, seed)
        if name in skipped:
            say(f"{LABELS[name]}: skipped, {skipped[name]}")
        if results_file:
            write_json(Path(results_file), figures)
    lines = report(results, flops_per_token, peak)
    if record_run and results:
        record(lines, summary)


def timed_words(steps, untimed_steps):
    return f", the last {steps - untimed_steps} timed" if untimed_steps else ""


def has_trl():
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def run_child(name, arch, timing, rows, cutoff_len, budget, fast, seed):
    steps, untimed_steps = timing
    fast_checkpointing, fast_quantization = fast
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable,
            __file__,
            "--only",
            name,
            "--arch",
            arch,
            "--steps",
            str(steps),
            "--untimed_steps",
            str(untimed_steps),
            "--rows",
            str(rows),
            "--cutoff_len",
            str(cutoff_len),
            "--micro_batch_tokens",
            str(budget),
            "--fast_checkpointing",
            str(fast_checkpointing),
            "--fast_quantization",
            fast_quantization,
            "--seed",
            str(seed),
            "--result_file",
            str(out),
        ]
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            say(f"{LABELS[name]}: failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            return None
        result = json.loads(out.read_text())
        say(
            f"{LABELS[name]}: {result['tokens']:,} tokens in {result['seconds']:.1f} s "
            f"(process {time.time() - started:.0f} s)"
        )
        return result


def report(results, flops_per_token, peak):
    """The results table and the (a)/(b) and Liger lines, printed; returned for the record."""
    speed = {name: r["tokens"] / r["seconds"] for name, r in results.items() if r}
    lines = [
        "| configuration | tokens/s | peak memory (GiB) | MFU | tokens/s vs (c) | memory vs (c) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    base = results.get("trl")
    for name, r in results.items():
        if r is None:
            lines.append(f"| {LABELS[name]} | failed | | | | |")
            continue
        mfu = f"{100 * flops_per_token * speed[name] / (peak * 1e12):.1f}%" if peak else "n/a"
        vs = (
            (f"{speed[name] / speed['trl']:.2f}x", f"{r['peak_gib'] / base['peak_gib']:.2f}x")
            if base
            else ("n/a", "n/a")
        )
        lines.append(f"| {LABELS[name]} | {speed[name]:,.0f} | {r['peak_gib']:.2f} | {mfu} | {vs[0]} | {vs[1]} |")
    a, liger = results.get("toolkit"), results.get("toolkit-liger")
    if a and results.get("platypus"):
        lines += ["", f"(a)/(b) tokens per second: {speed['toolkit'] / speed['platypus']:.2f}x"]
    if results.get("toolkit-default") and base:
        lines += [
            "",
            f"(a0)/(c), the toolkit's defaults against TRL's: tokens per second "
            f"{speed['toolkit-default'] / speed['trl']:.2f}x, peak memory "
            f"{results['toolkit-default']['peak_gib'] / base['peak_gib']:.2f}x",
        ]
    if a and liger:
        lines += [
            "",
            f"Liger leaves the loss unchanged? mean loss over the run: (a) {a['loss']:.6f}, "
            f"(a+) {liger['loss']:.6f}, difference {abs(a['loss'] - liger['loss']):.2e}",
        ]
    lines += curve_lines(results)
    lines += estimate_lines(results)
    say("\n" + "\n".join(lines))
    return lines


def curve_lines(results):
    """Each configuration's training loss at a quarter, half, three quarters and the end of its steps, with
    the tokens trained by then: the configurations differ in batch size, learning rate and schedule, so the
    curves are read against tokens, not steps."""
    lines = []
    for name, r in results.items():
        curve = (r or {}).get("curve") or []
        if not curve:
            continue
        points = [curve[max(0, round(len(curve) * q) - 1)] for q in (0.25, 0.5, 0.75, 1.0)]
        lines.append(f"| {LABELS[name]} | " + " | ".join(f"{loss:.3f} ({tokens:,})" for tokens, loss in points) + " |")
    if lines:
        lines = [
            "",
            "Loss curves: training loss (tokens trained) at a quarter, half, three quarters and the end of the steps",
            "",
            "| configuration | 1/4 | 1/2 | 3/4 | end |",
            "| --- | --- | --- | --- | --- |",
            *lines,
        ]
    return lines


def estimate_lines(results):
    """The plan's memory estimate (as --dry_run prints it for the same flags) beside the measured peak,
    a line per configuration. The estimate counts 1 GiB of CUDA context and allocator slack, which the
    measured peak (memory allocated by tensors) leaves out."""
    lines = []
    for name, r in results.items():
        if not r:
            continue
        estimate = r.get("estimate_gib")
        if estimate is None:
            lines.append(f"- {LABELS[name]}: no plan (TRL's own run); measured peak {r['peak_gib']:.2f} GiB")
            continue
        tensors = estimate["total"] - estimate["cuda_overhead"]
        lines.append(
            f"- {LABELS[name]}: plan {estimate['total']:.2f} GiB ({tensors:.2f} GiB without the CUDA overhead: "
            f"weights {estimate['weights']:.2f}, trainable and optimizer {estimate['trainable_and_optimizer']:.2f}, "
            f"activations {estimate['activations']:.2f}); measured peak {r['peak_gib']:.2f} GiB "
            f"({r['peak_gib'] / tensors:.2f}x the plan's tensors)"
        )
    if lines:
        lines = ["", "Memory: the dry-run plan's estimate against the measured peak", *lines]
    return lines


RUNS_HEADING = "## Training throughput runs, as bench/train_speed.py recorded them"


def record(lines, summary, run=None, path=ROOT / "BENCHMARKS.md"):
    """Append this run (date, device, library versions, command line, summary and table) to
    BENCHMARKS.md, under a heading of its own that the first recorded run adds. `run` gives the
    date, device, versions and command of a run made elsewhere (default: this process's)."""
    from platy.files import write_text

    run = run or this_run()
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if RUNS_HEADING not in text:
        text += (
            f"\n{RUNS_HEADING}\n\nEach run of the benchmark appends its figures here (--record_run false "
            "to leave this file alone), newest last.\n"
        )
    text += (
        f"\n### {run['date']}, {run['device']}\n\n`{run['command']}` ({', '.join(run['versions'])}). "
        f"{summary}\n\n" + "\n".join(lines) + "\n"
    )
    write_text(path, text)
    say(f"Recorded in {path}")


def this_run():
    """The date, device, library versions and command line of this process, as record() writes them."""
    import datetime

    from platy.reporting import library_versions

    versions = library_versions(extra=("trl", "liger-kernel", "flash-attn", "deepspeed"))
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name(),
        "versions": [f"{package} {version}" for package, version in versions.items() if version],
        "command": " ".join(["python bench/train_speed.py", *sys.argv[1:]]),
    }


def device_name():
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    return f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


# ---- the model, the data and the FLOPs ---------------------------------------------------


def bench_model(arch):
    """The folder of --arch's model: the built-in real model, or random weights of the shapes."""
    if arch in REAL_MODELS:
        return tiny.ensure_model(arch, flag="--arch")
    return random_model(arch)


def random_model(arch):
    """A folder holding a randomly initialised model of the architecture (bf16 on disk), built once."""
    return tiny.build_once(cache_root() / "bench-models" / arch, lambda folder: build_random_model(arch, folder))


def build_random_model(arch, folder):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny.ensure_model())
    # positions restart per example, but rows of up to 2 x cutoff_len tokens still need room
    config = LlamaConfig(
        **{**SHAPES[arch], "max_position_embeddings": 8192},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # a 7B model in fp32 would need twice the memory to build
    try:
        # the random initialisation of 7B weights takes minutes on a CPU and about a second on a GPU
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def data_file(rows, seed):
    from platy.files import write_text

    path = cache_root() / "bench-data" / f"rows-{rows}-{seed}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(synthetic_rows(rows, seed)))
    return path


def example_lengths(model_dir, rows, seed, cutoff_len):
    """Token counts of the training examples (the tokenized rows, as finetune.py builds them)."""
    from transformers import AutoTokenizer

    from platy.data.examples import ExampleTokenizer, prepare_tokenizer
    from platy.data.tokenize import tokenize_rows
    from platy.prompts import Prompter

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    ds, _ = tokenize_rows(
        json.loads(data_file(rows, seed).read_text()), ExampleTokenizer(tokenizer, Prompter("alpaca"), cutoff_len)
    )
    return [len(ids) for ids in ds["input_ids"]]


def model_flops_per_token(model_dir, s):
    """F = 4 N_frozen + 6 N_lora + 6 L d s: frozen weights need forward and input gradients, LoRA
    weights also weight gradients, attention scores and values cost 6 L d s per token."""
    from transformers import AutoConfig

    from platy.modeling import meta_model

    config = AutoConfig.from_pretrained(model_dir)
    d, layers = config.hidden_size, config.num_hidden_layers
    counts = sizing.parameter_counts(meta_model(config), set(TARGETS), LORA_R)
    frozen = counts["quantizable"] + d * config.vocab_size  # the Linear layers with lm_head, no embedding
    return 4 * frozen + 6 * counts["lora"] + 6 * layers * d * s


def detect_peak_tflops():
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ---- one configuration, in its own process ----------------------------------------------


def run_one(name, arch, timing, rows, cutoff_len, budget, fast, seed, result_file):
    import torch

    steps, untimed_steps = timing
    runner = run_trl if name.startswith("trl") else run_toolkit
    with tempfile.TemporaryDirectory() as out:
        trainer, estimate = runner(name, bench_model(arch), data_file(rows, seed), out, steps, cutoff_len, budget, fast)
        clock = step_clock(untimed_steps)
        trainer.add_callback(clock)
        clock.start(trainer.state)
        trainer.train()
        clock.stop(trainer.state)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in logged]
    result = {
        "tokens": clock.tokens,
        "seconds": clock.seconds,
        "untimed_steps": untimed_steps,
        "peak_gib": peak,
        "steps": trainer.state.global_step,
        "loss": sum(losses) / len(losses) if losses else float("nan"),
        "curve": [(entry.get("num_input_tokens_seen", 0), entry["loss"]) for entry in logged],
        "estimate_gib": estimate,
    }
    Path(result_file).write_text(json.dumps(result))


def step_clock(untimed):
    """A Trainer callback timing the run after its first `untimed` optimizer steps (from the start
    of train() when 0): seconds and trained tokens, the device synchronised at both ends."""
    import torch
    import transformers

    class StepClock(transformers.TrainerCallback):
        mark = None

        def now(self, state):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter(), int(state.num_input_tokens_seen)

        def start(self, state):
            if untimed == 0:
                self.mark = self.now(state)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == untimed and self.mark is None:
                self.mark = self.now(state)

        def stop(self, state):
            end = self.now(state)
            self.seconds, self.tokens = end[0] - self.mark[0], end[1] - self.mark[1]

    return StepClock()


def run_toolkit(name, model_dir, data_path, out, steps, cutoff_len, budget, fast):
    import importlib.util

    from platy.train.recipe import Recipe

    flags = entry_defaults(script_entry("finetune"))
    flags.update(
        base_model=str(model_dir),
        data_path=str(data_path),
        output_dir=out,
        max_steps=steps,
        cutoff_len=cutoff_len,
        warmup_steps=0,
        logging_steps=1,
        save_steps=10**6,
        report_to="none",
        lora_target_modules=TARGETS,
    )
    if name == "toolkit-default":  # finetune.py's defaults but the batch, TRL's, so the same rows per step
        flags.update(batch_size=BATCH)
    elif name.startswith("toolkit"):
        fast_checkpointing, fast_quantization = fast
        flags.update(
            packing=True,
            micro_batch_tokens=budget,
            micro_batch_size=1,
            batch_size=4,
            quantization=fast_quantization,
            gradient_checkpointing=fast_checkpointing,
            liger=name == "toolkit-liger",
            attn_implementation="flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa",
        )
    else:  # Platypus's published settings (micro batch 1, padding, checkpointing), TRL's global batch
        flags.update(packing=False, micro_batch_size=1, batch_size=BATCH, gradient_checkpointing=True)
    prepared = Recipe.from_flags(flags).setup()
    return prepared.trainer, prepared.run.plan["gpu_memory_gib"]


def run_trl(name, model_dir, data_path, out, steps, cutoff_len, budget, fast):
    """TRL's SFTTrainer, its defaults except what the comparison needs fixed: the steps, max_length
    (cutoff_len), the LoRA settings and the precision --precision auto picks here (TRL's own default, bf16,
    runs slower than fp32 on a CPU without native bf16)."""
    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from platy.data.examples import prepare_tokenizer
    from platy.modeling import load_model, load_tokenizer, resolve_precision
    from platy.prompts import Prompter

    precision = resolve_precision("auto") if torch.cuda.is_available() else cpu_precision()[0]
    prompter = Prompter("alpaca")
    rows = json.loads(Path(data_path).read_text())
    ds = datasets.Dataset.from_list(
        [{"prompt": prompter.generate_prompt(r["instruction"], r["input"]), "completion": r["output"]} for r in rows]
    )
    tokenizer = prepare_tokenizer(load_tokenizer(str(model_dir), flag="--arch"))
    model = load_model(str(model_dir), "4bit", precision, flag="--arch")
    cpu = not torch.cuda.is_available()
    config = SFTConfig(
        output_dir=out,
        max_steps=steps,
        max_length=cutoff_len,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=cpu,
        # TRL refuses padding_free alone (it would not enforce max_length): its own advice is
        # padding-free with best-fit-decreasing packing, which cuts examples at max_length
        **({"padding_free": True, "packing": True, "packing_strategy": "bfd"} if name == "trl-pad-free" else {}),
    )
    lora = LoraConfig(r=LORA_R, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tokenizer, peft_config=lora)
    return trainer, None


if __name__ == "__main__":
    run(from_signature(main))
