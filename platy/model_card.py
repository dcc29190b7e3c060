"""The model card (README.md) of a merged model: base, data, hyperparameters, template, merge method."""

from pathlib import Path

from platy.data.rows import HUB_ID

METHOD_TEXT = {
    "dequant": "the base was rebuilt exactly as it was quantized in training ({quant}), dequantized, and the LoRA "
    "update added to those weights, the weights the adapter was trained against",
    "peft": "the LoRA update was added to the original base weights",
}


def model_card(merge_run, adapter, info):
    """The README.md of a merged model folder: what it is, how it was trained and merged, how to load it."""
    run = adapter.run_config or {}
    data = run.get("data", {})
    template = run.get("resolved", {}).get("template", {})
    quant = quantization_words(merge_run.layout)
    table = "\n".join(f"| {name} | {value} |" for name, value in hyperparameters(run, adapter, quant))
    training = training_summary(run, merge_run.peft_model_path)
    prompts = prompt_text(template)
    name = merge_run.output_dir.name
    base = merge_run.base
    base_text = base_link(base)
    return f"""---
base_model: {base}
library_name: transformers
tags:
- lora
- platypus
---

# {name}

**{name}** is {base_text} fine-tuned with LoRA on instruction data and merged into
standalone {info["dtype"]} weights.

## Model details

* **Base model:** {base_text}
* **Training data:** {data.get("path", "not recorded")} (fingerprint `{data.get("fingerprint", "n/a")}`)
* **Fine-tuning:** {"; ".join(training)}
* **Merge method:** `{info["method"]}`: {METHOD_TEXT[info["method"]].format(quant=quant)}
* **Weights:** {info["dtype"]}, {len(info["shards"])} safetensors shard(s)

## Hyperparameters

| Hyperparameter | Value |
| --- | --- |
{table}

## Prompt template ({template.get("name", "unknown")})

{prompts}

## How it was made

```bash
{info["command"]}
```

Merged on {info["date"]}; `merge_config.json` and `run_config.json` in this folder record the
merge and the full training configuration.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/{name}")
tokenizer = AutoTokenizer.from_pretrained("path/to/{name}")
```
{gguf_section(info.get("gguf"), template)}"""


def quantization_words(layout):
    """How the base was quantized in training, in words ("4bit nf4, double quantization"), or "none"."""
    if not layout:
        return "none"
    words = f"{layout.get('quantization')} {layout.get('quant_type', '')}".strip()
    return words + (", double quantization" if layout.get("double_quant") else "")


def hyperparameters(run, adapter, quant):
    """(name, value) rows of the card's table: the recorded training flags and the adapter's LoRA settings."""
    flags = run.get("flags", {})
    resolved = run.get("resolved", {})
    rows = [
        ("learning rate", flags.get("learning_rate")),
        ("batch size", flags.get("batch_size")),
        ("micro batch size", flags.get("micro_batch_size")),
        ("warmup steps", flags.get("warmup_steps")),
        ("epochs", flags.get("num_epochs")),
        ("max steps", flags.get("max_steps")),
        ("weight decay", flags.get("weight_decay")),
        ("lr scheduler", flags.get("lr_scheduler")),
        ("lora alpha", adapter.config.get("lora_alpha")),
        ("lora rank", adapter.config.get("r")),
        ("lora dropout", adapter.config.get("lora_dropout")),
        ("lora target modules", ", ".join(sorted(adapter.config.get("target_modules") or []))),
        ("lora target modules as given", target_words(flags.get("lora_target_modules"))),
        ("lora scale", resolved.get("lora_scale")),
        ("rsLoRA (scale alpha / sqrt(r))", flags.get("use_rslora") or None),
        ("DoRA", flags.get("use_dora") or None),
        ("lora initialisation", None if flags.get("init_lora_weights") in (None, "default") else init_words(run)),
        ("LoRA+ learning-rate ratio (B / A)", flags.get("loraplus_lr_ratio")),
        ("NEFTune noise alpha", flags.get("neftune_noise_alpha")),
        ("optimizer", flags.get("optim")),
        ("cutoff length", flags.get("cutoff_len")),
        ("train on inputs", flags.get("train_on_inputs")),
        ("group by length", flags.get("group_by_length")),
        ("add eos token", flags.get("add_eos_token")),
        ("prompt template", resolved.get("template", {}).get("name")),
        ("base quantization in training", quant),
        ("precision", resolved.get("precision")),
    ]
    return [(name, value) for name, value in rows if value not in (None, "")]


def target_words(targets):
    """all-linear as typed (the resolved names are the row above); nothing when names were given."""
    return "all-linear" if targets == ["all-linear"] else None


def init_words(run):
    """--init_lora_weights, with what the merge had to know about it."""
    init = run["flags"]["init_lora_weights"]
    loftq = run.get("resolved", {}).get("loftq")
    if loftq:
        return (
            f"{init} (quantization error of the adapted layers {loftq['relative_error_before']:.4f} -> "
            f"{loftq['relative_error_after']:.4f} at the start)"
        )
    if init == "gaussian":
        return init
    return f"{init} (saved converted for the unchanged base: rank 2r)"


def training_summary(run, adapter_path):
    """The card's "Fine-tuning" line, in parts: steps and examples when the run finished."""
    result = run.get("result", {})
    train = run.get("data", {}).get("train", {})
    parts = ["LoRA adapter trained with `finetune.py`"]
    if result.get("global_step"):
        parts.append(f"{result['global_step']} optimizer steps")
    if train.get("kept"):
        parts.append(
            f"{train['kept']:,} training examples, {train.get('label_tokens', 0):,} response tokens (labels) per epoch"
        )
    if not result:
        parts.append(f"merged from an intermediate checkpoint ({adapter_path})")
    return parts


def prompt_text(template):
    if not template:
        return "Not recorded (the adapter has no run_config.json)."
    return (
        f"With an input:\n\n```\n{template.get('prompt_input', '')}\n```\n\n"
        f"Without one:\n\n```\n{template.get('prompt_no_input', '')}\n```\n\n"
        f"The answer follows `{template.get('response_split', '')}`."
    )


def base_link(base):
    """A hub id links to its page; a local base is shown as its path."""
    is_hub_id = HUB_ID.match(base) and "/" in base and not Path(base).exists()
    return f"[{base}](https://huggingface.co/{base})" if is_hub_id else f"`{base}`"


def gguf_section(files, template):
    """How to run the GGUF files (llama.cpp, Ollama, LM Studio) and, after --verify, how close each is."""
    if not files:
        return ""
    rows = []
    for gguf_type, entry in files.items():
        check = entry.get("verify")
        figures = (
            f"{check['max_abs_diff']:.2e} | {100 * check['agreement']:.1f}% | {check['verdict'].upper()}"
            if check
            else "not checked (merge with --verify) | | "
        )
        rows.append(f"| `{entry['file']}` | {gguf_type} | {entry['bytes'] / 1e6:,.1f} MB | {figures} |")
    first = next(iter(files.values()))["file"]
    question = "Is 91 a prime number?"
    prompt = (template or {}).get("prompt_no_input", "{instruction}").replace("{instruction}", question)
    prompt = prompt.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f"""
## Run the GGUF files (llama.cpp, Ollama, LM Studio)

| file | type | size | largest logit difference to the merged model | greedy agreement | verdict |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

The differences were measured by loading each file back with transformers' GGUF loader
(`--verify`).

```bash
# llama.cpp, with the prompt template the model was trained on
llama-cli -m {first} -no-cnv -e -p "{prompt}" -n 256
# Ollama: the Modelfile in this folder holds the template and the stop tokens
ollama create {Path(first).stem} -f Modelfile
ollama run {Path(first).stem} "{question}"
```

LM Studio: copy a `.gguf` file into its models folder (or load it with `lms import`).
"""
