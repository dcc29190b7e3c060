r"""Fuse a LoRA / QLoRA adapter into the base weights and export a standalone Hugging Face model.

    # base model and template come from the adapter's run_config.json
    python merge.py --peft_model_path ./outputs/platypus-qlora --output_dir ./outputs/merged --verify

    # Platypus's spelling, explicit base, bfloat16 output in 2 GB shards
    python merge.py --base_model_name_or_path meta-llama/Llama-2-13b-hf \
        --peft_model_path ./Platypus2-13B-lora --output_dir ./Platypus2-13B --dtype bfloat16 --max_shard_size 2GB

Methods: `dequant` rebuilds the base exactly as it was quantized in training, dequantizes
it and adds the adapter to those weights (the weights the adapter was trained against);
`peft` adds the adapter to the original 16-bit weights. `auto` (default): dequant for an
adapter trained on a 4-bit or 8-bit base, peft otherwise. The merge streams tensor by
tensor: memory holds about one tensor plus the adapter, whatever the model size.
"""

import datetime
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from platy import cli
from platy.cli import UserError, say
from platy.files import swap_into_place, write_json
from platy.merging import DTYPES, METHODS, Adapter, merge_stream, output_config, parse_size, resolve_local_base


def merge(
    base_model_name_or_path: str = None,
    peft_model_path: str = None,
    output_dir: str = None,
    device: str = "auto",
    method: str = "auto",
    dtype: str = "float16",
    max_shard_size: str = "auto",
    verify: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    base_model: str = None,
    lora_weights: str = None,
):
    """Flags:

    Args:
        base_model_name_or_path: Base model (hub id or folder); default: the one the adapter's
            run_config.json records. Alias: --base_model.
        peft_model_path: The adapter folder (finetune.py's output_dir or a checkpoint-N).
            Alias: --lora_weights.
        output_dir: Where the merged model goes; must be new or empty unless --overwrite.
        device: Where the merge arithmetic runs: auto (cuda if present), cpu or cuda.
        method: auto, dequant or peft (see above).
        dtype: float16 (default), bfloat16 or float32 for the exported weights.
        max_shard_size: Largest safetensors shard, e.g. 5GB or 500MB; auto: the size of the
            base model's largest shard.
        verify: Compare the merged model's logits with base + adapter on a few prompts.
        overwrite: Replace a non-empty output_dir (only once the new model is complete).
        trust_remote_code: Allow model code from the hub for --verify.
        base_model: Alias of --base_model_name_or_path.
        lora_weights: Alias of --peft_model_path.
    """
    setup = validate(dict(locals()))
    adapter = setup["adapter"]
    setup["output_dir"].parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{setup['output_dir'].name}.partial-{os.getpid()}-", dir=setup["output_dir"].parent)
    )
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes a private folder; the model is for everyone who may read here
    try:
        stats = write_weights(setup, adapter, tmp)
        write_companions(setup, adapter, tmp, stats)
        swap_into_place(tmp, setup["output_dir"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(
        f"Merged model ({setup['method']} merge, {setup['dtype']}): {setup['output_dir']} "
        f"({len(stats['shards'])} shard(s), {stats['bytes'] / 1e9:.3f} GB, {stats['merged_modules']} modules merged)"
    )
    if verify:
        report = verify_merge(setup, adapter)
        say(
            f"Verify: largest |logit difference| {report['max_abs_diff']:.2e} over {report['positions']} positions "
            f"of {report['prompts']} prompts; greedy next-token agreement {100 * report['agreement']:.1f}%"
        )
        # rounding of the exported dtype alone stays well below these
        tolerance = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.5}[setup["dtype"]]
        if report["agreement"] < 0.99 or report["max_abs_diff"] > tolerance:
            hint = (
                " (expected with --method peft for an adapter trained on a quantized base: --method dequant "
                "reproduces it)"
                if setup["method"] == "peft" and setup["layout"]
                else ""
            )
            say(f"Warning: the merged model does not reproduce base + adapter exactly{hint}")


def remove_stale_partials(output_dir):
    """Clean up after a merge that was killed (kill -9, power loss): its process is gone.

    A partial folder is removed. A previous model moved aside (.NAME.old-PID) goes back into
    place if the kill came before the new model arrived, else it is removed.
    """
    for path in sorted(output_dir.parent.glob(f".{output_dir.name}.*")):
        match = re.fullmatch(rf"\.{re.escape(output_dir.name)}\.(partial|old)-(\d+)(-.*)?", path.name)
        if not match or Path(f"/proc/{match[2]}").exists():
            continue
        if match[1] == "old" and not output_dir.exists():
            path.rename(output_dir)
            say(f"Restored {output_dir} from {path}, left by an interrupted merge")
        else:
            say(f"Removing {path}, left by an interrupted merge")
            shutil.rmtree(path, ignore_errors=True)


def pick(value, alias, name, alias_name):
    if value and alias and value != alias:
        raise UserError(f"--{name} {value} and --{alias_name} {alias} disagree; give one of them")
    return value or alias


def validate(flags):
    flags = cli.coerce_bools(merge, flags)
    peft_path = pick(flags["peft_model_path"], flags["lora_weights"], "peft_model_path", "lora_weights")
    if not peft_path:
        raise UserError("--peft_model_path is required (the adapter folder written by finetune.py)")
    if not flags["output_dir"]:
        raise UserError("--output_dir is required (where the merged model goes)")
    if flags["method"] not in METHODS:
        raise UserError(f"--method {flags['method']}: choose one of {', '.join(METHODS)}")
    if str(flags["dtype"]) not in DTYPES:
        raise UserError(f"--dtype {flags['dtype']}: choose float16, bfloat16 or float32")
    if flags["device"] not in ("auto", "cpu", "cuda") and not str(flags["device"]).startswith("cuda:"):
        raise UserError(f"--device {flags['device']}: choose auto, cpu or cuda")
    if flags["trust_remote_code"] and not flags["verify"]:
        raise UserError("--trust_remote_code only matters for --verify (the merge itself runs no model code)")
    max_bytes = None if flags["max_shard_size"] == "auto" else parse_size(flags["max_shard_size"])
    out = Path(flags["output_dir"]).expanduser().resolve()
    remove_stale_partials(out)  # first: a restored previous model must count as what is there
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not flags["overwrite"]:
        raise UserError(f"--output_dir {out} is not empty; choose a new folder or pass --overwrite")
    adapter = Adapter(Path(peft_path).expanduser())
    adapter_dir = adapter.folder.resolve()
    if out == adapter_dir or out in adapter_dir.parents or adapter_dir in out.parents:
        raise UserError(
            f"--output_dir {out} would replace or nest in the adapter folder {adapter_dir}; choose a folder outside it"
        )
    recorded_base = adapter.base_model()
    base = pick(flags["base_model_name_or_path"], flags["base_model"], "base_model_name_or_path", "base_model")
    if not base:
        if not recorded_base:
            raise UserError("--base_model_name_or_path is required: the adapter records no base model")
        base = recorded_base
    elif recorded_base and not same_model(base, recorded_base):
        say(f"Note: the adapter was trained on {recorded_base}; merging into {base} as asked")
    layout = adapter.quantization_layout
    method = flags["method"]
    if method == "auto":
        method = "dequant" if layout else "peft"
    if method == "dequant" and not layout:
        raise UserError(
            "--method dequant: the adapter's run_config.json records no quantized base (trained without "
            "quantization, or not by finetune.py); use --method peft"
        )
    import torch

    device = flags["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU here; use --device cpu")
    base_path = resolve_local_base(base)
    if Path(base_path).resolve() in (out, *out.parents):
        raise UserError(f"--output_dir {out} would replace the base model folder; choose another folder")
    if max_bytes is None:
        from platy.merging import base_checkpoint

        max_bytes = max(p.stat().st_size for p in base_checkpoint(base_path))

    return {
        **flags,
        "base": base,
        "base_path": base_path,
        "adapter": adapter,
        "layout": layout,
        "method": method,
        "dtype": DTYPES[str(flags["dtype"])],
        "max_bytes": max_bytes,
        "output_dir": out,
        "device": device,
        "peft_model_path": str(adapter.folder),
    }


def same_model(a, b):
    from platy.modeling import resolve_base_model

    def where(name):
        try:
            path = Path(resolve_base_model(name)).expanduser()
        except UserError:  # a folder that moved: compare names only
            return name
        return path.resolve() if path.exists() else name

    return a == b or where(a) == where(b)


def write_weights(setup, adapter, folder):
    return merge_stream(
        setup["base_path"],
        adapter,
        setup["method"],
        setup["layout"],
        setup["dtype"],
        folder,
        setup["max_bytes"],
        setup["device"],
    )


def write_companions(setup, adapter, folder, stats):
    """config.json, generation config, tokenizer, a model card, and how the merge was made."""
    import json

    (folder / "config.json").write_text(json.dumps(output_config(setup["base_path"], setup["dtype"]), indent=2) + "\n")
    base = Path(setup["base_path"])
    if (base / "generation_config.json").is_file():
        shutil.copy(base / "generation_config.json", folder / "generation_config.json")
    tokenizer_source = adapter.folder if (adapter.folder / "tokenizer_config.json").is_file() else base
    for path in tokenizer_source.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens_map")) or path.name in ("chat_template.jinja",):
            shutil.copy(path, folder / path.name)
    merge_info = {
        "method": setup["method"],
        "dtype": setup["dtype"],
        "base_model": setup["base"],
        "adapter": setup["peft_model_path"],
        "shards": stats["shards"],
        "merged_modules": stats["merged_modules"],
        "quantization_layout": {k: v for k, v in (setup["layout"] or {}).items() if k != "modules"} or None,
        "command": " ".join(["python", "merge.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
    }
    write_json(folder / "merge_config.json", merge_info)
    if adapter.run_config:
        write_json(folder / "run_config.json", adapter.run_config)
    (folder / "README.md").write_text(model_card(setup, adapter, merge_info), encoding="utf-8")


METHOD_TEXT = {
    "dequant": "the base was rebuilt exactly as it was quantized in training ({quant}), dequantized, and the LoRA "
    "update added to those weights, the weights the adapter was trained against",
    "peft": "the LoRA update was added to the original base weights",
}


def model_card(setup, adapter, info):
    run = adapter.run_config or {}
    flags = run.get("flags", {})
    data = run.get("data", {})
    layout = setup["layout"] or {}
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
    name = setup["output_dir"].name
    base = setup["base"]
    from platy.data.rows import HUB_ID

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
        training.append(f"merged from an intermediate checkpoint ({setup['peft_model_path']})")
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


def verify_merge(setup, adapter, prompts=None):
    """Largest logit difference and greedy agreement: merged model vs base + adapter as trained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from platy.modeling import load_model_with_adapter, resolve_precision
    from platy.prompts import Prompter

    run = adapter.run_config or {}
    quantization = adapter.trained_quantization()
    recorded = run.get("resolved", {}).get("precision")
    # the compute precision of training where this machine can run it (a GPU run's bf16 on a GPU)
    precision = recorded if recorded and torch.cuda.is_available() else resolve_precision("auto")
    placement = "auto" if torch.cuda.is_available() else {"": "cpu"}
    reference = load_model_with_adapter(
        setup["base_path"],
        quantization,
        precision,
        adapter.folder,
        "--peft_model_path",
        bool((setup["layout"] or {}).get("double_quant")),
        setup["trust_remote_code"],
        placement,
    )
    merged = AutoModelForCausalLM.from_pretrained(
        str(setup["output_dir"]),
        dtype=getattr(torch, setup["dtype"]),
        device_map=placement,
        trust_remote_code=setup["trust_remote_code"],
    )
    tokenizer = AutoTokenizer.from_pretrained(str(setup["output_dir"]))
    template = run.get("resolved", {}).get("template", {}).get("name", "alpaca")
    prompter = Prompter(template if template else "alpaca")
    prompts = prompts or [
        prompter.generate_prompt(q)
        for q in (
            "What is the boiling point of water at sea level?",
            "Is 91 a prime number?",
            "Explain Newton's second law in one sentence.",
            "다음 두 수의 합을 구하시오: 12, 30",
        )
    ]
    reference.eval()
    merged.eval()
    worst, agree, positions = 0.0, 0, 0
    with torch.no_grad():
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt")
            a = reference(**ids.to(reference.device)).logits.float()
            b = merged(**ids.to(merged.device)).logits.float().to(a.device)
            worst = max(worst, (a - b).abs().max().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            positions += a.shape[1]
    return {"max_abs_diff": worst, "agreement": agree / positions, "positions": positions, "prompts": len(prompts)}


if __name__ == "__main__":
    cli.run(merge)
