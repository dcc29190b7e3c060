"""Speed settings of training: the CPU's compute precision, partial activation checkpointing, fused kernels,
torch.compile."""

import functools
import importlib.util
import math
import time
from pathlib import Path

from platy.cli import FALSE_WORDS, TRUE_WORDS, UserError

# /proc/cpuinfo flags of instructions that compute bf16 natively (x86 "flags", Arm "Features")
NATIVE_BF16 = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16"}
# bf16 only where its matmul measured at least this much faster than fp32: the flags say the instructions
# exist, not that this torch build uses them (AMX measured about 6x; emulated bf16 runs slower than fp32)
BF16_MIN_SPEEDUP = 1.5
# --gradient_checkpointing auto on a CPU: off where the run's estimated memory without it is at most this
# share of the memory available to each process (the estimate is rough; the rest is the margin)
CPU_MEMORY_SHARE = 0.5


def native_bf16(cpuinfo=Path("/proc/cpuinfo")):
    """The CPU's instructions that compute bf16 natively, by name (() where there are none or no
    /proc/cpuinfo to tell: Linux only)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ()
    line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), "")
    present = set(line.partition(":")[2].split())
    return tuple(name for flag, name in NATIVE_BF16.items() if flag in present)


@functools.cache
def bf16_matmul_speedup(size=512, repeats=5):
    """How many times faster a bf16 matmul runs than an fp32 one here (the best of `repeats` each, the first
    call of each dtype untimed: it builds the kernel); about 10 ms on a CPU, measured once per process."""
    import torch

    def best(a, b):
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def cpu_precision():
    """--precision auto on a CPU: (precision, why). bf16 where the CPU has native bf16 instructions and a bf16
    matmul measured faster than fp32 here; fp32 elsewhere, where bf16 is emulated and slower."""
    features = native_bf16()
    if not features:
        return "fp32", "auto: this CPU has no native bf16 (AMX-BF16 or AVX512-BF16): bf16 would run slower than fp32"
    speedup = bf16_matmul_speedup()
    named = ", ".join(features)
    if speedup < BF16_MIN_SPEEDUP:
        return "fp32", f"auto: this CPU has {named}, but a bf16 matmul measured only {speedup:.1f}x fp32 here"
    return "bf16", f"auto: this CPU computes bf16 natively ({named}); a bf16 matmul measured {speedup:.1f}x fp32"


def available_memory_gib():
    """The memory the system can give new work without swapping (GiB), or None where it cannot be read."""
    try:
        import psutil  # accelerate's dependency
    except ImportError:
        return None
    return psutil.virtual_memory().available / 2**30


def checkpoint_fraction(value):
    """--gradient_checkpointing as the fraction of decoder layers to checkpoint: true 1, false 0, or a number;
    None for auto (decided with the model's shape and the device: platy/train/plan.py)."""
    if isinstance(value, bool):
        return float(value)
    word = str(value).strip().lower()
    if word == "auto":
        return None
    if word in TRUE_WORDS:
        return 1.0
    if word in FALSE_WORDS:
        return 0.0
    try:
        fraction = float(word)
    except ValueError:
        fraction = None
    if fraction is None or not 0 <= fraction <= 1:
        raise UserError(
            f"--gradient_checkpointing {value!r}: give auto, true, false, or the fraction of layers to "
            "checkpoint, e.g. 0.5 (the first half)"
        )
    return fraction


def checkpointed_count(fraction, layers):
    """How many of `layers` decoder layers a fraction checkpoints (the memory estimate counts the same)."""
    return math.ceil(fraction * layers - 1e-9)


def checkpoint_layers(model, fraction):
    """Checkpoint the first ceil(fraction x layers) decoder layers; returns (checkpointed, layers).

    The first layers, since checkpointing any layer saves the same memory and recomputes the
    same work; non-reentrant checkpointing, as the Trainer would set it.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = checkpointed_count(fraction, len(layers))
    if count:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for layer in layers[count:]:
            layer.gradient_checkpointing = False
    return count, len(layers)


def liger_unavailable():
    """Why Liger's fused kernels cannot run here ('' when they can): they need the liger-kernel
    package and, being Triton kernels, a CUDA GPU."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "the liger-kernel package is not installed (pip install liger-kernel)"
    import torch

    if not torch.cuda.is_available():
        return "its Triton kernels need a CUDA GPU"
    return ""
