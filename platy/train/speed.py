"""Speed settings of training: partial activation checkpointing, fused kernels, torch.compile."""

import importlib.util
import math

from platy.cli import FALSE_WORDS, TRUE_WORDS, UserError


def checkpoint_fraction(value):
    """--gradient_checkpointing as the fraction of decoder layers to checkpoint: true 1, false 0, or a number."""
    if isinstance(value, bool):
        return float(value)
    word = str(value).strip().lower()
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
            f"--gradient_checkpointing {value!r}: give true, false, or the fraction of layers to "
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
