"""The size of a run before it starts: parameters, GPU memory per process, tokens per step.

These are estimates from the model's shapes (built on the meta device, no weights), for
choosing GPUs and a parallel strategy; the real peak also depends on sequence lengths,
allocator fragmentation and library versions. Rules used (bytes per parameter):
- 16-bit weights 2; fp32 4; NF4 0.5 plus one fp32 scale per 64-weight block (with
  double quantization one 8-bit scale per block plus one fp32 per 256 blocks); int8 1.
  Layers that stay unquantized (embeddings, lm_head, norms) are upcast to fp32 for QLoRA
  training, except under FSDP, where every tensor of a layer must share one dtype.
- Trainable parameters (LoRA adapters are kept in fp32, full fine-tuning keeps fp32
  master weights): fp32 gradient 4 + AdamW's two moments 8.
- Activations per layer of a micro batch: about tokens x (17 x hidden + 6 x intermediate)
  bytes at 16-bit (attention through SDPA / FlashAttention, so no seq x seq scores kept),
  scaled for fp32; with gradient checkpointing only each layer's input is kept, plus one
  layer recomputed in backward; plus fp32 logits and their gradient over the vocabulary, counted
  at every token (the lm_head runs only where a label is predicted: fewer when prompts are masked).
- Sharding: ZeRO-2 splits gradients and optimizer states over all processes; ZeRO-3 and
  FSDP split weights too; one process spreading the layers over its GPUs splits all of it.
"""

from platy.train.speed import checkpointed_count

GIB = 1024**3
CUDA_OVERHEAD_GIB = 1.0  # CUDA context, kernels and allocator slack per process

# Shapes from the published config.json of the seed systems' bases, for planning on a
# machine that has neither the weights nor the hub. All are Llama-architecture models.
LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
YI_34B = dict(
    hidden_size=7168,
    intermediate_size=20480,
    num_hidden_layers=60,
    num_attention_heads=56,
    num_key_value_heads=8,
    vocab_size=64000,
    max_position_embeddings=4096,
)
PUBLISHED_SHAPES = {
    "meta-llama/Llama-2-7b-hf": (LLAMA2_7B, "published config"),
    "meta-llama/Llama-2-13b-hf": (
        dict(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
        "published config",
    ),
    "meta-llama/Llama-2-70b-hf": (
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
        "published config",
    ),
    "01-ai/Yi-34B": (YI_34B, "published config"),
    "chargoddard/Yi-34B-Llama": (YI_34B, "Yi-34B's published config, Llama layer names"),
    # private at the time of the seed: Llama-2-7B's shape is assumed (an enlarged
    # Korean vocabulary, if it has one, is not counted)
    "kyujinpy/KO-Platypus2-7B-ex": (LLAMA2_7B, "assumed: Llama-2-7B's shape"),
}


def published_config(base_model):
    """(LlamaConfig, where the shape comes from) for a known base model id, else None."""
    for name, (shape, source) in PUBLISHED_SHAPES.items():
        if name.lower() == str(base_model).lower():
            from transformers import LlamaConfig

            return LlamaConfig(**shape), f"{source} of {name}"
    return None


def parameter_counts(model, lora_targets, lora_r):
    """Counts from a meta-device model: total, quantizable (Linear layers but lm_head), LoRA."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    quantizable = lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf != "lm_head":  # transformers keeps the output layer unquantized
            quantizable += module.weight.numel()
        if leaf in lora_targets:
            lora += lora_r * (module.in_features + module.out_features)
    return {"total": total, "quantizable": quantizable, "lora": lora}


def weight_bytes(counts, quantization, compute_bytes, double_quant, upcast_unquantized):
    other = counts["total"] - counts["quantizable"]
    if quantization == "none":
        return counts["total"] * compute_bytes
    if quantization == "4bit":
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    else:
        per_weight = 1.0
    return counts["quantizable"] * per_weight + other * (4 if upcast_unquantized else compute_bytes)


def activation_bytes(config, micro_batch_size, cutoff_len, compute_bytes, gradient_checkpointing):
    tokens = micro_batch_size * cutoff_len
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    one_layer = tokens * (17 * hidden + 6 * intermediate) * compute_bytes / 2
    logits = tokens * config.vocab_size * (compute_bytes + 8)
    # gradient_checkpointing: the fraction of layers checkpointed (True: all); those keep only their input
    checkpointed = checkpointed_count(float(gradient_checkpointing), layers)
    kept = (layers - checkpointed) * one_layer
    if checkpointed:
        return checkpointed * tokens * hidden * compute_bytes + kept + one_layer + logits
    return kept + logits


def estimate(
    config,
    counts,
    *,
    finetuning,
    quantization,
    compute_bytes,
    double_quant,
    micro_batch_size,
    cutoff_len,
    gradient_checkpointing,
    strategy,
    world_size,
    gpus_per_process=1,
):
    """GiB per GPU, by component, for one training process under `strategy`."""
    if finetuning == "full":
        weights = counts["total"] * 4  # fp32 master weights, bf16/fp16 compute
        trainable = counts["total"]
    else:
        weights = weight_bytes(counts, quantization, compute_bytes, double_quant, upcast_unquantized=strategy != "fsdp")
        trainable = counts["lora"]
    trainable_weights = 0 if finetuning == "full" else trainable * 4
    states = trainable * (4 + 8)  # gradient + AdamW moments
    activations = activation_bytes(config, micro_batch_size, cutoff_len, compute_bytes, gradient_checkpointing)
    if strategy == "zero2":
        states /= world_size
    elif strategy in ("zero3", "fsdp"):
        weights, trainable_weights, states = (x / world_size for x in (weights, trainable_weights, states))
    elif strategy == "model_parallel":
        weights, trainable_weights, states, activations = (
            x / gpus_per_process for x in (weights, trainable_weights, states, activations)
        )
    parts = {
        "weights": weights / GIB,
        "trainable_and_optimizer": (trainable_weights + states) / GIB,
        "activations": activations / GIB,
        "cuda_overhead": CUDA_OVERHEAD_GIB,
    }
    parts["total"] = sum(parts.values())
    return {k: round(v, 2) for k, v in parts.items()}


STRATEGY_WORDS = {
    "single": "one process, one device",
    "ddp": "data parallel: every GPU holds the whole model",
    "zero2": "DeepSpeed ZeRO-2: gradients and optimizer states sharded, weights on every GPU",
    "zero3": "DeepSpeed ZeRO-3: weights, gradients and optimizer states sharded",
    "fsdp": "FSDP full shard: weights, gradients and optimizer states sharded",
    "model_parallel": "one process, layers spread over its GPUs",
}


def human(n):
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)
