"""bitsandbytes' quantized weights as training saw them.

A base quantized at load time (QLoRA, 8-bit) is replayed from its checkpoint with the layout training
recorded, so a merge and a rebuilt 4-bit base hold the very weights the adapter was trained against;
LoftQ's iterations quantize each weight minus a low-rank offset, saved beside the adapter
(LOFTQ_OFFSET); and loaded bitsandbytes layers are kept computing as they did in training.

Below merging and modeling; above base_weights.
"""

import json
from pathlib import Path

from platy.base_weights import base_tensors, resolve_local_base
from platy.cli import UserError
from platy.record import RunRecord

# The values a recorded quantization layout (modeling.quantization_layout) may hold: each is checked before
# it picks a torch dtype by name or sizes a bitsandbytes call, since run_config.json comes with the adapter.
LAYOUT_VALUES = {
    "quantization": ("4bit", "8bit"),
    "load_dtype": ("float16", "bfloat16", "float32"),
    "quant_type": ("nf4", "fp4"),
    "quant_storage": ("uint8", "float16", "bfloat16", "float32"),
    "blocksize": (32, 64, 128, 256, 512, 1024, 2048, 4096),
    "double_quant": (True, False),
}
LAYOUT_4BIT = ("quant_type", "quant_storage", "blocksize", "double_quant")  # recorded where modules are 4-bit


def layout_problem(layout):
    """What is wrong with a recorded quantization layout (None: every value is one training writes)."""
    if not isinstance(layout, dict):
        return f"is {type(layout).__name__}, not an object"
    modules = layout.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        return "'modules' is not a list of module names"
    required = ["quantization", "load_dtype"]
    if layout.get("quantization") == "4bit" and modules:
        required += LAYOUT_4BIT
    for key in required:
        value = layout.get(key)
        # type first: True == 1 and 64.0 == 64, but neither is what training writes
        if not any(type(value) is type(allowed) and value == allowed for allowed in LAYOUT_VALUES[key]):
            return f"'{key}' is {json_text(value)}, not one of {', '.join(json_text(v) for v in LAYOUT_VALUES[key])}"
    return None


def json_text(value):
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def checked_layout(layout, label):
    """layout (None stays None), or a UserError naming label (the adapter's flag and folder) and the bad value."""
    if layout is not None and (problem := layout_problem(layout)):
        raise UserError(
            f"{label}: run_config.json's quantization_layout {problem}; it is not what finetune.py writes: "
            "copy the adapter again"
        )
    return layout


def quantize_4bit_as_loaded(weight, layout, offset=None):
    """(codes, quant state) of a weight quantized as bitsandbytes did when training loaded it; with a LoftQ
    offset (L, R), of the weight minus L @ R, as LoftQ's iterations quantized it."""
    import bitsandbytes.functional as bnbf
    import torch

    if offset is not None:
        weight = weight.to(torch.float32) - dense_offset(offset).to(weight.device)
    loaded = weight.to(getattr(torch, layout["load_dtype"])).contiguous()
    return bnbf.quantize_4bit(
        loaded,
        blocksize=layout["blocksize"],
        compress_statistics=layout["double_quant"],
        quant_type=layout["quant_type"],
        quant_storage=getattr(torch, layout["quant_storage"]),
    )


def dense_offset(offset):
    """L @ R in float32, computed in float64 on the CPU: the same bits in training and in every merge,
    whatever device either runs on (the 4-bit codes of weight - offset must come out identical)."""
    import torch

    low, high = offset
    return (low.to("cpu", torch.float64) @ high.to("cpu", torch.float64)).to(torch.float32)


def rebuild_quantized(weight, layout, offset=None):
    """The weight as training saw it: quantized as bitsandbytes did at load time (or as LoftQ's iterations
    did, with their offset), dequantized."""
    import bitsandbytes.functional as bnbf
    import torch

    if layout["quantization"] == "4bit":
        return bnbf.dequantize_4bit(*quantize_4bit_as_loaded(weight, layout, offset)).to(torch.float32)
    loaded = weight.to(getattr(torch, layout["load_dtype"]))
    codes, stats, _ = bnbf.int8_vectorwise_quant(loaded.to(torch.float16).contiguous())
    return bnbf.int8_vectorwise_dequant(codes, stats).to(torch.float32)


def set_4bit_weight(layer, codes, state):
    """A Linear4bit's weight replaced by other 4-bit codes and their quant state."""
    layer.weight.data, layer.weight.quant_state = codes, state
    if getattr(layer, "quant_state", None) is not None:  # bitsandbytes restores the weight's from it
        layer.quant_state = state


# LoftQ with --loftq_iter > 1 quantizes each adapted weight after subtracting a rank-r offset: the
# offset's factors ({module}.L, {module}.R), saved beside the adapter, rebuild that 4-bit base
LOFTQ_OFFSET = "loftq_offset.safetensors"


def read_loftq_offsets(folder, label, record=None):
    """{module: (L, R)}: the rank-r offsets LoftQ subtracted from each adapted weight before quantizing
    it (--loftq_iter > 1), saved beside the adapter; {} for every other adapter. label names the folder;
    record: its RunRecord where the caller has read it already. The file and the run's recorded
    iterations must agree: neither a missing file nor one left by an earlier run in the same folder is
    ever applied silently."""
    path = Path(folder) / LOFTQ_OFFSET
    record = record if record is not None else RunRecord.read(folder)
    iterations = None if record is None else record.loftq_iterations
    if not path.is_file():
        if iterations and iterations > 1:
            raise UserError(
                f"{label}: {LOFTQ_OFFSET} is missing, and the adapter was trained with --loftq_iter {iterations} "
                "on the 4-bit base that file rebuilds; copy it from the run's output_dir"
            )
        return {}
    if iterations == 1:
        raise UserError(
            f"{label}: {LOFTQ_OFFSET} does not belong to this adapter (its run_config.json records no LoftQ "
            "iterations: a file left by an earlier run); delete it"
        )
    from safetensors.torch import load_file

    factors = {}
    for key, tensor in load_file(str(path)).items():
        module, _, part = key.rpartition(".")
        factors.setdefault(module, {})[part] = tensor
    torn = [m for m, parts in factors.items() if set(parts) != {"L", "R"} or parts["L"].shape[1] != parts["R"].shape[0]]
    if torn or not factors:
        raise UserError(f"{label}: {LOFTQ_OFFSET} is incomplete ({torn[0] if torn else 'no offsets'}); copy it again")
    return {module: (parts["L"], parts["R"]) for module, parts in factors.items()}


def write_loftq_offsets(offsets, folder):
    """The LoftQ offsets that rebuild the 4-bit base an adapter was trained on, into its folder (if any)."""
    if offsets:
        from safetensors.torch import save_file

        factors = {f"{module}.{part}": t for module, pair in offsets.items() for part, t in zip("LR", pair)}
        save_file(factors, str(Path(folder) / LOFTQ_OFFSET))


def rebuild_loftq_base(model, base_model, offsets, layout, base_flag, label):
    """A loaded 4-bit base (plain or inside a peft model) as LoftQ's iterations requantized it: each weight
    with an offset quantized again from the base checkpoint minus the offset, as training and the merge do,
    with the quantization layout recorded in training. label names the folder the offsets came from."""
    where = base_tensors(resolve_local_base(base_model, base_flag), base_flag)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module, offset in offsets.items():
        name, shape = f"{module}.weight", [offset[0].shape[0], offset[1].shape[1]]
        try:
            layer = root.get_submodule(module)
        except AttributeError:
            layer = None
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if type(layer).__name__ != "Linear4bit" or name not in where or list(where[name].entries[name][1]) != shape:
            raise UserError(
                f"{label}: its LoftQ offset of {module} {tuple(shape)} does not fit {base_flag} {base_model}; "
                "use the base model the adapter was trained on"
            )
        weight = where[name].read(name).to(layer.weight.device)
        set_4bit_weight(layer, *quantize_4bit_as_loaded(weight, layout, offset))


def keep_cpu_4bit_layout(model):
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first eval-mode forward under no_grad (an evaluation
    pass) repacks each Linear4bit weight for a kernel that has no backward: later training
    steps then lose the gradient through the frozen weights without an error, and
    dequantizing gives wrong weights. Keeping the standard layout costs CPU speed only.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def keep_8bit_scales(model):
    """Keep each 8-bit weight's row scales with its codes when peft's DoRA layer rebuilds it on the CPU.

    To compute its norms, peft's DoRA layer dequantizes a CPU Linear8bitLt weight and moves it back
    with Int8Params.to(), which returns codes marked as not yet taken into the layer's state and
    without their scales (bitsandbytes 0.50); the layer's next forward would then replace its scales
    with None and fail. The hook gives the rebuilt weight the scales the layer already holds.
    """

    def restore_scales(module, _args):
        weight, state = module.weight, module.state
        if getattr(weight, "CB", None) is not None and weight.SCB is None and state.SCB is not None:
            weight.SCB = state.SCB

    for module in model.modules():
        if is_bnb_8bit(module):
            module.register_forward_pre_hook(restore_scales)


def compute_8bit_as_trained(model):
    """Make an evaluating model's 8-bit layers compute as training computed them (call after eval()).

    bitsandbytes trains an 8-bit layer on the CPU with its dequantized weight, and evaluates it by
    rounding the activations to int8 as well (LLM.int8), which moves logits by about 1e-2. A layer
    left in training mode computes with exactly the weights training saw; it has no dropout or other
    training-only behaviour. On a GPU both modes round the activations, as training did.
    """
    for module in model.modules():
        if is_bnb_8bit(module):
            module.training = True  # this layer alone: peft's wrapper around it holds the LoRA dropout


def compute_in_fp32(model):
    """A model whose base was loaded (and quantized) in bf16 or fp16 made to compute in fp32 with the weights
    training computed with: each 4-bit layer becomes a Linear holding its dequantized weight, rounded to the
    loaded dtype as training's bf16 or fp16 compute dequantized it (and as the merge replays it; the layer's
    own fp32 path would skip that rounding); every other float weight and buffer (norms, embeddings, the
    head, the adapter, rotary tables) is upcast, as peft's prepare_model_for_kbit_training upcasts them."""
    import bitsandbytes.functional as bnbf
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Linear4bit" and type(child).__module__.startswith("bitsandbytes"):
                weight = bnbf.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                dense = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=child.bias is not None)
                dense.weight.data = weight
                if child.bias is not None:
                    dense.bias.data = child.bias.data.float()
                setattr(parent, name, dense.to(weight.device))
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor.data = tensor.data.float()


def is_bnb_8bit(module):
    """bitsandbytes' own 8-bit layer (peft's LoRA wrapper around it has the same class name)."""
    return type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes")
