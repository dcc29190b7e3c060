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
    flags = run.get("flags", {})
    data = run.get("data", {})
    layout = merge_run.layout or {}
    quant = (
        (
            f"{layout.get('quantization')} {layout.get('quant_type', '')}".strip()
            + (", double quantization" if layout.get("double_quant") else "")
        )
        if layout
        else "none"
    )
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
        ("cutoff length", flags.get("cutoff_len")),
        ("train on inputs", flags.get("train_on_inputs")),
        ("group by length", flags.get("group_by_length")),
        ("add eos token", flags.get("add_eos_token")),
        ("prompt template", run.get("resolved", {}).get("template", {}).get("name")),
        ("base quantization in training", quant),
        ("precision", run.get("resolved", {}).get("precision")),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows if value not in (None, ""))
    template = run.get("resolved", {}).get("template", {})
    result = run.get("result", {})
    name = merge_run.output_dir.name
    base = merge_run.base
    is_hub_id = HUB_ID.match(base) and "/" in base and not Path(base).exists()
    base_text = f"[{base}](https://huggingface.co/{base})" if is_hub_id else f"`{base}`"
    train = data.get("train", {})
    training = ["LoRA adapter trained with `finetune.py`"]
    if result.get("global_step"):
        training.append(f"{result['global_step']} optimizer steps")
    if train.get("kept"):
        training.append(
            f"{train['kept']:,} training examples, {train.get('label_tokens', 0):,} response tokens (labels) per epoch"
        )
    if not result:
        training.append(f"merged from an intermediate checkpoint ({merge_run.peft_model_path})")
    prompts = ""
    if template:
        prompts = (
            f"With an input:\n\n```\n{template.get('prompt_input', '')}\n```\n\n"
            f"Without one:\n\n```\n{template.get('prompt_no_input', '')}\n```\n\n"
            f"The answer follows `{template.get('response_split', '')}`."
        )
    else:
        prompts = "Not recorded (the adapter has no run_config.json)."
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
"""
