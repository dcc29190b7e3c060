"""Model loading shared by the scripts: precision, quantization, placement, LoRA targets."""

import os

from platy.cli import UserError, error_detail, say, world_size
from platy.quantized import (
    LOFTQ_OFFSET,
    checked_layout,
    keep_8bit_scales,
    keep_cpu_4bit_layout,
    read_loftq_offsets,
    rebuild_loftq_base,
)

QUANTIZATIONS = ("4bit", "8bit", "none")
# an adapter's run_config.json names its base: data from whoever sent the adapter, never a reason to run code
REMOTE_CODE_NEEDS_BASE = (
    "--trust_remote_code runs the base model's own code: name that base with --base_model (the one an "
    "adapter's run_config.json records is not trusted to run code)"
)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision):
    """auto: bf16 on GPUs that support it, else fp16 on CUDA; fp32 on CPU and Apple GPUs."""
    import torch

    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "fp32"
    if precision == "fp16" and not cuda:
        raise UserError("--precision fp16: fp16 mixed precision needs a CUDA GPU; use bf16 or fp32 here")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError("--precision bf16: this GPU has no bf16 support; use fp16 or fp32")
    return precision


def torch_dtype(precision):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def quantization_config(quantization, precision, double_quant=False, quant_storage=None):
    """BitsAndBytesConfig for 4-bit NF4 (QLoRA) or 8-bit, None for plain LoRA.

    quant_storage (a precision such as bf16) packs the 4-bit codes into that float dtype
    instead of uint8: FSDP shards float tensors only, so FSDP + QLoRA needs it equal to the
    compute dtype.
    """
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = {} if quant_storage is None else {"bnb_4bit_quant_storage": torch_dtype(quant_storage)}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=bool(double_quant),
        bnb_4bit_compute_dtype=torch_dtype(precision),
        **storage,
    )


def bitsandbytes_missing(quantization):
    """True when loading with `quantization` needs bitsandbytes and it is not installed."""
    import importlib.util

    # found, not imported: its import alone takes seconds
    return quantization != "none" and importlib.util.find_spec("bitsandbytes") is None


def loading_quantization(adapter, load_4bit, load_8bit=None):
    """(quantization, as_trained) to load a base with: an explicit --load_4bit / --load_8bit wins;
    with an adapter and neither set, the base is quantized as in training, since the adapter's
    answers are those of that base."""
    if adapter is not None and load_4bit is None and load_8bit is None:
        return adapter.trained_quantization(), True
    return ("8bit" if load_8bit else "4bit" if load_4bit else "none"), False


def load_config(base_model, trust_remote_code=False, *, flag, local_only=False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except Exception as err:
        detail = error_detail(err)
        raise UserError(
            f"{flag} {base_model}: cannot load its config ({detail}); check the name or path "
            "(offline machines need a local folder)"
        ) from err


def load_tokenizer(base_model, trust_remote_code=False, *, flag):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except Exception as err:
        detail = error_detail(err)
        raise UserError(f"{flag} {base_model}: cannot load its tokenizer ({detail})") from err


def meta_model(config, trust_remote_code=False):
    """The model built on the meta device: its layers and shapes, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_module_names(model):
    """Names (last path component) of the Linear layers of a (meta) model."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})


ALL_LINEAR = "all-linear"


def all_linear_targets(model):
    """The names (last path component) of every Linear layer of the decoder: attention and MLP, not the
    output head (lm_head), which LoRA leaves to the base."""
    import torch

    head = model.get_output_embeddings()
    heads = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if mod is head}
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod is not head
        }
        - heads
    )


def resolve_target_modules(targets, model, base_model):
    """--lora_target_modules for this model: all-linear resolved to its decoder's Linear layers, names checked."""
    if targets == [ALL_LINEAR]:
        return all_linear_targets(model)
    if ALL_LINEAR in targets:
        raise UserError(f"--lora_target_modules: {ALL_LINEAR} stands alone; drop the other names or drop it")
    check_target_modules(targets, linear_module_names(model), base_model)
    return targets


def parse_target_modules(value):
    """Accepts a list, '[gate_proj, down_proj, up_proj]', 'gate_proj,down_proj,up_proj' or all-linear."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = str(value).strip().strip("[]()").split(",")
    names = [item.strip().strip("'\"") for item in items]
    names = [n for n in names if n]
    if not names:
        raise UserError(
            "--lora_target_modules is empty; name the Linear layers to adapt, e.g. '[gate_proj, up_proj, down_proj]'"
        )
    return names


def check_target_modules(targets, linear_names, base_model):
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise UserError(
            f"--lora_target_modules: {base_model} has no Linear layer named {', '.join(missing)}; "
            f"its Linear layers are: {', '.join(linear_names)}"
        )


def mps_available():
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def generation_device(device="auto"):
    """cuda, Apple's mps, or cpu (auto: the first available), and the precision used there."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if device.startswith("cuda"):
        return device, ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")
    return device, ("fp16" if device.startswith("mps") else "fp32")


def device_map():
    """Where the weights go.

    Under torchrun every rank holds a whole copy on its own device (a quantized model must
    not be spread across devices in distributed mode). Without torchrun, several GPUs
    share one big model layer by layer.
    """
    import torch

    if torch.cuda.is_available():
        if world_size() > 1:
            return {"": int(os.environ.get("LOCAL_RANK", "0"))}
        return "auto" if torch.cuda.device_count() > 1 else {"": 0}
    return {"": "cpu"}


SHARDED = "sharded"


def load_model(
    base_model,
    quantization,
    precision,
    double_quant=False,
    trust_remote_code=False,
    placement=None,
    load_precision=None,
    quant_storage=None,
    attn_implementation=None,
    *,
    flag,
):
    """A causal LM as training and inference load it.

    placement overrides device_map(); SHARDED passes no device map, so FSDP or DeepSpeed
    ZeRO-3 place the weights. load_precision (default: precision) is the dtype the weights
    are held in: full fine-tuning keeps fp32 master weights and computes in precision.
    `flag` names the flag that gave base_model, for the error messages.
    """
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(load_precision or precision)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if placement != SHARDED:
        kwargs["device_map"] = placement or device_map()
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    qconfig = quantization_config(quantization, precision, double_quant, quant_storage)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    except (OSError, ValueError) as err:
        detail = error_detail(err)
        raise UserError(f"{flag} {base_model}: cannot load the model ({detail})") from err
    keep_cpu_4bit_layout(model)
    keep_8bit_scales(model)
    return model


def load_model_with_adapter(
    base_model,
    quantization,
    precision,
    adapter_folder,
    flag,
    double_quant=False,
    trust_remote_code=False,
    placement=None,
    *,
    base_flag,
    vocabulary=None,
):
    """The base loaded as load_model does, with a LoRA adapter applied unmerged (peft); the base alone
    where adapter_folder is None. vocabulary: the adapter's tokenizer's length; a base with fewer
    embedding rows (a chat template's tokens were added in training) grows to it first.

    An adapter whose shapes do not fit the base is a UserError naming `flag` (the adapter's) and
    `base_flag` (the base's).
    """
    from peft import PeftModel

    model = load_model(base_model, quantization, precision, double_quant, trust_remote_code, placement, flag=base_flag)
    if adapter_folder is None:
        return model
    check_adapter(adapter_folder, flag)
    apply_loftq_offsets(
        model, base_model, adapter_folder, quantization, precision, base_flag, f"{flag} {adapter_folder}"
    )
    if vocabulary and vocabulary > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocabulary, mean_resizing=False)  # the adapter holds the new rows
    try:
        return PeftModel.from_pretrained(model, str(adapter_folder))
    except (RuntimeError, ValueError, KeyError) as err:
        if isinstance(err, RuntimeError) and "size mismatch" not in str(err):
            raise  # out of memory and the like are not a mismatch
        raise UserError(
            f"{flag} {adapter_folder} does not fit {base_flag} {base_model} "
            f"({error_detail(err, last=True)}); use the base model the adapter was trained on"
        ) from err


def apply_loftq_offsets(model, base_model, adapter_folder, quantization, precision, base_flag, label):
    """The base an adapter with LoftQ offsets was trained on, where it is loaded in 4-bit; a note where the
    load is not 4-bit (the adapter then runs on the original weights, as any QLoRA adapter there)."""
    from platy.record import RunRecord

    record = RunRecord.read(adapter_folder)
    offsets = read_loftq_offsets(adapter_folder, label, record)
    if not offsets:
        return
    if quantization != "4bit":
        say(
            f"Note: {label} trained on a 4-bit base that LoftQ requantized ({LOFTQ_OFFSET}); loaded "
            f"{'in 8-bit' if quantization == '8bit' else 'unquantized'}, it runs on the original weights"
        )
        return
    layout = checked_layout(record.quantization_layout if record else None, label)
    rebuild_loftq_base(
        model, base_model, offsets, layout or quantization_layout(model, "4bit", precision), base_flag, label
    )


def check_adapter(folder, flag):
    """An adapter folder against its manifest (sizes and sha256) and its files' structure."""
    from platy.integrity import check_folder

    check_folder(folder, f"{flag} {folder}", "copy the adapter again, or use one of its checkpoint-N folders")


def quantization_layout(model, quantization, precision):
    """How the base was quantized in training, so merge.py can rebuild exactly those weights.

    Names the quantized Linear modules (transformers leaves some, such as lm_head, in full
    precision) and the 4-bit block parameters.
    """
    if quantization == "none":
        return None
    kinds = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}
    modules = {name: m for name, m in model.named_modules() if type(m).__name__ == kinds[quantization]}
    layout = {
        "quantization": quantization,
        "load_dtype": str(torch_dtype(precision)).replace("torch.", ""),
        "modules": sorted(modules),
    }
    if quantization == "4bit" and modules:
        state = next(iter(modules.values())).weight.quant_state
        layout.update(
            quant_type=state.quant_type,
            blocksize=state.blocksize,
            double_quant=bool(state.nested),
            quant_storage=str(next(iter(modules.values())).weight.dtype).replace("torch.", ""),
        )
    return layout
