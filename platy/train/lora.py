"""The LoRA start: the base loaded for training, its vocabulary grown to the tokenizer, the adapter attached
as --init_lora_weights says (PiSSA / OLoRA kept for the conversion on save, LoftQ's SVD and offsets), and
the adapter weights of --resume_from_checkpoint's adapter folder loaded.

attach(run, tokenizer) returns what it made (LoraStart) for the stages after it: the model, the
quantization layout, LoftQ's offsets and report and the initial adapter of PiSSA / OLoRA.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from platy import cli
from platy.cli import UserError, say
from platy.quantized import read_loftq_offsets, rebuild_loftq_base, set_4bit_weight
from platy.train.config import changes_base
from platy.train.plan import base_weights, lora_share, lora_words


@dataclass(frozen=True)
class LoraStart:
    """What the model stage made, for training and the saves after it."""

    model: Any
    layout: dict = None  # how the base was quantized (None: full fine-tuning)
    loftq_offsets: dict = field(default_factory=dict)  # rank-r offsets that rebuild LoftQ's requantized base
    loftq_report: dict = None  # LoftQ's quantization error before and after, for the run record
    initial_adapter: Path = None  # PiSSA / OLoRA: the adapter as initialised, for the conversion on save


def attach(run, tokenizer=None):
    """The LoraStart of the run: the base with LoRA adapters (or, for --finetuning full, every weight
    trainable) and the quantization layout to record (None for full fine-tuning). Where the tokenizer has
    grown (a chat template's control tokens added), the embeddings grow to fit and their new rows train."""
    from platy.modeling import quantization_layout
    from platy.train.speed import checkpoint_layers

    full = run.finetuning == "full"
    say(
        f"Loading {run.base_model} ({base_weights(run)}, {run.precision} compute) on {run.device}"
        + (", fp32 master weights for full fine-tuning" if full else "")
    )
    model = load_base(run)
    new_tokens = grow_vocabulary(model, tokenizer)
    checkpointed, layers = checkpoint_layers(model, run.checkpoint_fraction)
    if checkpointed and cli.is_main_process():
        say(f"Activation checkpointing on {checkpointed} of {layers} decoder layers")
    if full:
        if cli.is_main_process():
            say(f"Full fine-tuning: all {sum(p.numel() for p in model.parameters()):,} parameters trainable")
        return LoraStart(model)
    layout = quantization_layout(model, run.quantization, run.precision)
    return add_lora(run, model, layout, new_tokens)


def grow_vocabulary(model, tokenizer):
    """The ids the tokenizer has beyond the model's embedding rows, after growing the embeddings (and an
    untied lm_head) to fit; their new rows start at the mean of the old ones (transformers' default)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is None or len(tokenizer) <= rows:
        return []
    model.resize_token_embeddings(len(tokenizer))
    return list(range(rows, len(tokenizer)))


def trainable_tokens(model, new_tokens):
    """peft's trainable_token_indices for the new ids: the input embeddings' rows, and the lm_head's
    where it is not tied to them (only the new rows train; the old ones stay as they were)."""
    if not new_tokens:
        return None
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    indices = {names[model.get_input_embeddings()]: new_tokens}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        indices[names[output]] = new_tokens
    return indices


def load_base(run):
    from platy.modeling import SHARDED, load_model

    fsdp = run.strategy == "fsdp"
    return load_model(
        run.base_model_path,
        run.quantization,
        run.precision,
        run.double_quant,
        run.trust_remote_code,
        # FSDP and ZeRO-3 place (and shard) the weights themselves
        placement=SHARDED if run.strategy in ("fsdp", "zero3") else None,
        load_precision="fp32" if run.finetuning == "full" else None,
        # FSDP shards float tensors only: pack the 4-bit codes in the compute dtype
        quant_storage=run.precision if fsdp and run.quantization == "4bit" else None,
        attn_implementation=None if run.attn_implementation == "auto" else run.attn_implementation,
        flag="--base_model",
    )


def add_lora(run, model, layout, new_tokens=()):
    """The LoraStart of model wrapped with LoRA adapters (seeded, as --init_lora_weights says), loaded from
    --resume_from_checkpoint's adapter folder if given."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from platy.train.dropout import cheaper_lora_dropout

    label = f"--resume_from_checkpoint {run.resume.path}" if run.resume else None
    saved = read_loftq_offsets(run.resume.path, label) if run.resume else {}
    if saved:  # the resumed adapter trained on LoftQ's requantized base: rebuild exactly that one
        rebuild_loftq_base(model, run.base_model_path, saved, layout, "--base_model", label)
    if run.quantization != "none" and run.strategy != "fsdp":
        # upcasts norms/embeddings to fp32 for stable training; checkpointing is the Trainer's job.
        # Not under FSDP: a wrapped layer's tensors must share one dtype.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(run.seed)
    lora = LoraConfig(
        r=run.lora_r,
        lora_alpha=run.lora_alpha,
        lora_dropout=run.lora_dropout,
        target_modules=run.lora_targets,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=run.use_rslora,
        use_dora=run.use_dora,
        init_lora_weights=PEFT_INIT.get(run.init_lora_weights, run.init_lora_weights),
        trainable_token_indices=trainable_tokens(model, new_tokens),
    )
    model = get_peft_model(model, lora)
    if run.device == "cpu":  # a GPU draws its random numbers in parallel: torch's own dropout is cheap there
        cheaper_lora_dropout(model)
    if new_tokens and cli.is_main_process():
        say(
            f"New tokens {new_tokens[0]}-{new_tokens[-1]}: their embedding and lm_head rows are trained "
            "(peft trainable_token_indices)"
        )
    report, offsets = None, saved  # a resumed run's offsets are saved again with every checkpoint and adapter
    if run.init_lora_weights == "loftq":
        report, made = loftq_initialise(model, run.base_model_path, layout, run.loftq_iter, rebuilt=bool(saved))
        offsets = saved or made
    initial = None
    if changes_base(run.init_lora_weights) and cli.is_main_process():
        initial = save_initial_adapter(model)
    if run.resume and run.resume.adapter:
        load_adapter_weights(model, run.resume.path, "--resume_from_checkpoint")
        say(
            f"Loaded adapter weights from {run.resume.path}. The optimizer state and learning-rate schedule restart "
            "from step 0 (an adapter folder holds no optimizer state; resume from a checkpoint-N folder to continue "
            "them)."
        )
    elif run.init_adapter:  # a preference run on an SFT adapter: the policy starts as a trainable copy of it
        load_adapter_weights(model, run.init_adapter, "--init_adapter")
        say(f"Loaded the SFT adapter's weights from {run.init_adapter} as the starting policy")
    if cli.is_main_process():
        trainable, total = model.get_nb_trainable_parameters()
        say(
            f"{lora_words(run)} alpha={run.lora_alpha} on {', '.join(run.lora_targets)}: "
            f"{trainable:,} trainable of {total:,} parameters ({lora_share(trainable, total - trainable)})"
        )
    return LoraStart(model, layout, offsets, report, initial)


# --init_lora_weights words peft spells otherwise
PEFT_INIT = {"default": True, "loftq": True}  # loftq: the adapter starts as LoRA does, then loftq_initialise


def save_initial_adapter(model):
    """The adapter as PiSSA or OLoRA initialised it (the part of each base weight it took), saved where
    peft's conversion on save reads it; returns that folder."""
    import tempfile

    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # peft loads it back without decomposing again
    folder = Path(tempfile.mkdtemp(prefix="platy-initial-adapter-")) / "initial"
    try:
        model.save_pretrained(str(folder))
    finally:
        config.init_lora_weights = init
    return folder


def loftq_initialise(model, base_path, layout, iterations=1, rebuilt=False):
    """LoftQ on the 4-bit base: each adapter starts as the rank-r SVD of its layer's quantization error
    W - dequantize(base), W read from the base checkpoint, so base + adapter starts nearer the unquantized
    weights. With iterations = 1 the 4-bit base stays as loaded. Each further iteration quantizes
    W - (the adapter's L @ R) again and decomposes the new error (LoftQ's alternation); the offsets of the
    last quantization are returned (saved beside the adapter) so the merge and every later load rebuild
    exactly that base. rebuilt: the base is already the one a resumed run's offsets rebuilt, and only the
    start is computed. Says the error before and after; returns (that report, the offsets)."""
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora import Linear4bit

    from platy.base_weights import base_tensors
    from platy.quantized import quantize_4bit_as_loaded

    where = base_tensors(base_path, "--base_model")
    before = after = reference = 0.0
    layers, offsets = 0, {}
    prefix = "base_model.model."
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            rank, key = module.r["default"], name[len(prefix) :]
            base = module.get_base_layer()
            weight = where[f"{key}.weight"].read(f"{key}.weight").to(base.weight.device, torch.float32)
            residual = weight - bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            plain = bnbf.dequantize_4bit(*quantize_4bit_as_loaded(weight, layout)).float() if rebuilt else None
            before += (residual if plain is None else weight - plain).square().sum().item()
            offset = None
            for step in range(1 if rebuilt else iterations):
                if step:  # quantize the weight again around the adapter's current L @ R
                    codes, state = quantize_4bit_as_loaded(weight, layout, offset)
                    residual = weight - bnbf.dequantize_4bit(codes, state).float()
                left, right = low_rank(residual, rank)
                if step < iterations - 1 and not rebuilt:
                    offset = (left.contiguous().cpu(), right.contiguous().cpu())
            if offset is not None:
                set_4bit_weight(base, codes, state)
                offsets[key] = offset
            module.lora_A["default"].weight.copy_(right)
            module.lora_B["default"].weight.copy_(left / module.scaling["default"])  # adds scaling x B A
            after += (residual - left @ right).square().sum().item()
            reference += weight.square().sum().item()
            layers += 1
    report = {
        "layers": layers,
        "iterations": iterations,
        "relative_error_before": (before / reference) ** 0.5,
        "relative_error_after": (after / reference) ** 0.5,
    }
    if cli.is_main_process():
        say(
            f"LoftQ ({iterations} iteration{'s' if iterations > 1 else ''}): quantization error of the {layers} "
            f"adapted layers, ||W - base - adapter|| / ||W||: {report['relative_error_before']:.4f} (plain QLoRA "
            f"start) -> {report['relative_error_after']:.4f}"
        )
    return report, offsets


def low_rank(matrix, rank):
    """(L, R) with L @ R the best rank-r approximation of matrix (truncated SVD, the singular values split
    evenly as square roots between the two factors, as LoftQ does)."""
    import torch

    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def load_adapter_weights(model, folder, flag):
    """The adapter's weights of folder into model; a UserError naming flag where they do not fit it."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(folder, device="cpu")
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise UserError(
            f"{flag} {folder}: the adapter does not fit this model and LoRA settings "
            f"({len(missing)} LoRA weights missing, e.g. {missing[0]}); check --base_model and "
            "--lora_target_modules"
        )


def convert_to_plain_lora(model, initial, staged):
    """PiSSA / OLoRA: the adapter saved as the difference to its initial value (folder `initial`; peft's
    conversion, rank 2r), so that it applies to the unchanged base, as every LoRA adapter does."""
    try:
        model.save_pretrained(str(staged), path_initial_model_for_weight_conversion=str(initial))
    finally:
        shutil.rmtree(initial.parent, ignore_errors=True)
    say(
        f"Adapter converted for the unchanged base ({model.peft_config['default'].init_lora_weights} moved part of "
        "each adapted weight into the adapter at the start): rank doubled, merge.py and peft apply it to the base"
    )
