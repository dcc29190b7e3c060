"""What each LoRA knob costs, side by side with the plain run it changes: start-up time, step
time, peak memory, trainable weights and optimizer state.

    python bench/lora_costs.py                       # 14M-parameter random Llama, CPU, a few minutes
    python bench/lora_costs.py --arch llama2-7b      # on a GPU
    python bench/lora_costs.py --only dora-4bit,loftq5-4bit

Each knob trains --steps optimizer steps (batch 4, micro batch 2, --cutoff_len tokens, the
synthetic Open-Platypus-like rows of bench/train_speed.py) in a process of its own, so its peak
memory is its own (GPU: max allocated; CPU: the process's peak resident memory above what it held
after importing torch, transformers and peft). The first step is left out of the step time; the
plain run is measured again at the end, the spread of two runs of the same thing on this machine.
"start" is finetune.py's preparation (load, quantize, tokenize and the adapter's initialisation:
where PiSSA, OLoRA and LoftQ spend their SVDs). "optimizer state" adds up the bytes of every
tensor the optimizer keeps. The baseline of each row is plain LoRA on the same base (4-bit NF4,
8-bit or unquantized), Platypus's r 16 on gate/up/down with AdamW; the ratios are to it.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import train_speed  # noqa: E402

# name: (base quantization, finetune.py flags beyond Platypus's)
KNOBS = {
    "lora-4bit": ("4bit", {}),
    "all-linear-4bit": ("4bit", {"lora_target_modules": "all-linear"}),
    "rslora-4bit": ("4bit", {"use_rslora": True}),
    "dora-4bit": ("4bit", {"use_dora": True}),
    "loftq-4bit": ("4bit", {"init_lora_weights": "loftq"}),
    "loftq5-4bit": ("4bit", {"init_lora_weights": "loftq", "loftq_iter": 5}),
    "loraplus-4bit": ("4bit", {"loraplus_lr_ratio": 16}),
    "neftune-4bit": ("4bit", {"neftune_noise_alpha": 5}),
    "adamw_torch-4bit": ("4bit", {"optim": "adamw_torch"}),
    "adamw_bnb_8bit-4bit": ("4bit", {"optim": "adamw_bnb_8bit"}),
    "paged_adamw_8bit-4bit": ("4bit", {"optim": "paged_adamw_8bit"}),
    "paged_adamw_32bit-4bit": ("4bit", {"optim": "paged_adamw_32bit"}),
    "all-linear-8bit-optim-4bit": ("4bit", {"lora_target_modules": "all-linear", "optim": "adamw_bnb_8bit"}),
    "dora-8bit": ("8bit", {"use_dora": True}),
    "lora-8bit": ("8bit", {}),
    "lora-none": ("none", {}),
    "dora-none": ("none", {"use_dora": True}),
    "pissa_niter_4-none": ("none", {"init_lora_weights": "pissa_niter_4"}),
    "pissa-none": ("none", {"init_lora_weights": "pissa"}),
    "olora-none": ("none", {"init_lora_weights": "olora"}),
}
# a model big enough that the per-step costs show on a CPU, small enough for a few minutes there
train_speed.SHAPES.setdefault(
    "small",
    dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1024,
    ),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small", choices=sorted(train_speed.SHAPES))
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--cutoff_len", type=int, default=256)
    parser.add_argument("--only", default=None, help="comma-separated knob names (default: all)")
    parser.add_argument("--result_file", default=None, help=argparse.SUPPRESS)  # a child's single knob
    args = parser.parse_args()
    if args.result_file:
        measure(args.only, args.arch, args.steps, args.cutoff_len, args.result_file)
        return
    names = args.only.split(",") if args.only else list(KNOBS)
    unknown = [n for n in names if n not in KNOBS]
    if unknown:
        sys.exit(f"--only {unknown[0]}: choose from {', '.join(KNOBS)}")
    train_speed.random_model(args.arch)  # built once, before the children race to build it
    results = {}
    for name in names:
        results[name] = child(name, args)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    if not args.only:  # the baseline again at the end: how far two runs of the same thing differ here
        results["lora-4bit, again"] = child("lora-4bit", args)
    table(results)


def child(name, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--only", name, "--result_file", str(out), "--arch", args.arch]
        command += ["--steps", str(args.steps), "--cutoff_len", str(args.cutoff_len)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            return {"failed": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}
        return json.loads(out.read_text())


def measure(name, arch, steps, cutoff_len, result_file):
    import torch

    from platy.train.flags import TRAIN_FLAGS
    from platy.train.recipe import Recipe

    quantization, knobs = KNOBS[name]
    with tempfile.TemporaryDirectory() as out:
        flags = TRAIN_FLAGS.defaults()
        flags.update(base_model=str(train_speed.random_model(arch)), data_path=str(train_speed.data_file(400, 0)))
        flags.update(output_dir=out, max_steps=steps, cutoff_len=cutoff_len, batch_size=4, micro_batch_size=2)
        flags.update(warmup_steps=0, logging_steps=1, save_steps=10**6, report_to="none", val_set_size=0)
        flags.update(quantization=quantization, **knobs)
        imported = resident_mib()  # torch, transformers and peft loaded; no model yet
        started = time.perf_counter()
        prepared = Recipe.from_flags(flags).setup()
        start = time.perf_counter() - started
        trainer = prepared.trainer
        clock = train_speed.step_clock(1)
        trainer.add_callback(clock)
        clock.start(trainer.state)
        trainer.train()
        clock.stop(trainer.state)
        state = getattr(trainer.optimizer, "optimizer", trainer.optimizer).state  # inside accelerate's wrapper
        state_bytes = sum(
            t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t)
        )
        trainable, _ = trainer.model.get_nb_trainable_parameters()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    result = {
        "start_s": start,
        "step_s": clock.seconds / (steps - 1),
        "peak_mib": peak,
        "above_imports_mib": peak - (0 if torch.cuda.is_available() else imported),
        "trainable": trainable,
        "optimizer_state_mib": state_bytes / 2**20,
    }
    Path(result_file).write_text(json.dumps(result))


def resident_mib():
    """This process's resident memory now (Linux), MiB."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def table(results):
    """Markdown: each knob beside the plain LoRA run on its base. Memory is the peak above what the
    process held after its imports (CPU), or the peak allocated (GPU)."""
    print("\n| knob | start s | step s | x step | peak memory MiB | x memory | trainable | optimizer state MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "failed" in r:
            print(f"| {name} | failed: {r['failed']} | | | | | | |")
            continue
        base = results.get(f"lora-{KNOBS[name.split(',')[0]][0]}") or r
        if "failed" in base:
            base = r
        print(
            f"| {name} | {r['start_s']:.1f} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} | "
            f"{r['above_imports_mib']:.0f} | {r['above_imports_mib'] / base['above_imports_mib']:.2f} | "
            f"{r['trainable']:,} | {r['optimizer_state_mib']:.2f} |"
        )


if __name__ == "__main__":
    main()
