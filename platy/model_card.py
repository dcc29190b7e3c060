"""The model cards (README.md): of an adapter folder (finetune.py) and of a merged model (merge.py): base,
data, method, hyperparameters, template, how it was made and how to use it."""

import json
import os
import shlex
from pathlib import Path

from platy.data.rows import HUB_ID
from platy.quantized import LOFTQ_OFFSET
from platy.record import RunRecord

METHOD_TEXT = {
    "dequant": "the base was rebuilt exactly as it was quantized in training ({quant}), dequantized, and the LoRA "
    "update added to those weights, the weights the adapter was trained against",
    "peft": "the LoRA update was added to the original base weights",
}


def model_card(merge_run, adapter, info):
    """The README.md of a merged model folder: what it is, how it was trained and merged, how to load it."""
    run = adapter.record or RunRecord.from_dict({})  # no run_config.json: every row "not recorded"
    template = run.template or {}
    quant = quantization_words(merge_run.layout)
    table = "\n".join(f"| {name} | {value} |" for name, value in hyperparameters(run, adapter.config, quant))
    method = method_name(merge_run.layout)
    training = training_summary(run, merge_run.peft_model_path, method)
    prompts = prompt_text(template)
    name = merge_run.output_dir.name
    base = merge_run.base
    base_text = base_link(base)
    return f"""---
{front_matter(base, "transformers", method)}
---

# {name}

**{name}** is {base_text} fine-tuned with {method} on instruction data and merged into
standalone {info["dtype"]} weights.

## Model details

* **Base model:** {base_text}
* **Training data:** {data_text(run)}
* **Fine-tuning:** {"; ".join(training)}
* **Merge method:** `{info["method"]}`: {METHOD_TEXT[info["method"]].format(quant=quant)}
* **Weights:** {info["dtype"]}, {len(info["shards"])} safetensors shard(s)
* **Fidelity (`--verify`):** {verify_text(info.get("verify"))}

## Hyperparameters

| Hyperparameter | Value |
| --- | --- |
{table}

{prompt_section(run, template, prompts)}

## How it was made

```bash
{info["command"]}
```

Merged on {info["date"]}; `merge_config.json` and `run_config.json` in this folder record the
merge and the full training configuration.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({shown_path(merge_run.output_dir)!r})
tokenizer = AutoTokenizer.from_pretrained({shown_path(merge_run.output_dir)!r})
```
{gguf_section(info.get("gguf"), merge_run.output_dir)}"""


def adapter_card(record, folder):
    """The README.md of finetune.py's output folder: what the adapter is, how it was trained, how to use it.
    record: the run's RunRecord."""
    lora = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    layout = record.quantization_layout
    quant = quantization_words(layout)
    method = method_name(layout)
    base = record.flag("base_model", "")
    table = "\n".join(f"| {name} | {value} |" for name, value in hyperparameters(record, lora, quant))
    result = record.result or {}
    losses = [f"{result['global_step']} optimizer steps"] if result.get("global_step") else []
    if result.get("eval_loss") is not None:
        first = result.get("first_eval_loss")
        losses.append(
            f"eval loss {first:.4f} -> {result['eval_loss']:.4f}" if first else f"eval loss {result['eval_loss']:.4f}"
        )
    command = record.command or "not recorded (trained through the library, not finetune.py)"
    name = Path(folder).name
    where = shlex.quote(shown_path(folder))
    return f"""---
{front_matter(base, "peft", method)}
---

# {name}

A {method} adapter for {base_link(base)}, trained with `finetune.py` on {objective_words(record)}.

* **Base model:** {base_link(base)} ({quant_sentence(layout)})
* **Training data:** {data_text(record)}{objective_line(record)}
* **Result:** {"; ".join(losses) or "not recorded"}
* **{template_line(record)}

## Hyperparameters

| Hyperparameter | Value |
| --- | --- |
{table}

## How it was made

```bash
{command}
```

`run_config.json` records every flag, the resolved settings, the data and library versions;
`log_history.json` the logged losses.

## Use

```bash
# fuse it into standalone fp16 weights, checking them against base + adapter
python merge.py --peft_model_path {where} --output_dir {where}-merged --verify
# or generate with base + adapter directly (the base loads as it was trained)
python inference.py --lora_weights {where} --prompt "What is 12 + 30?"
```
"""


def shown_path(folder):
    """The folder as the card's commands name it: relative to where the command that wrote the card ran when it
    is below there (the user runs the next command from the same place), else absolute."""
    folder = Path(folder).resolve()
    try:
        return f"./{folder.relative_to(Path.cwd().resolve()).as_posix()}"
    except ValueError:
        return str(folder)


def objective_words(record):
    return "instruction data" if record.stage == "sft" else f"preference pairs (--stage {record.stage})"


def objective_line(record):
    """The card's line on a preference run: the stage, beta (and SimPO's gamma), the reference."""
    if record.stage == "sft":
        return ""
    knobs = f"beta {record.beta}" + (f", gamma {record.flag('simpo_gamma')}" if record.stage == "simpo" else "")
    reference = record.reference or {}
    named = reference.get("model", "not recorded")
    if reference.get("adapter"):
        named += f" `{reference['adapter']}` (sha256 {reference['adapter_sha256'][:12]})"
    return f"\n* **Objective:** {record.stage}, {knobs}; reference: {named}"


def front_matter(base, library, method):
    """The card's YAML header; base_model only for a hub id (a local or builtin base names no hub page)."""
    lines = [f"base_model: {base}"] if is_hub_id(base) else []
    tags = ["lora", "qlora"] if method == "QLoRA" else ["lora"]
    return "\n".join([*lines, f"library_name: {library}", "tags:", *(f"- {t}" for t in [*tags, "platypus"])])


def method_name(layout):
    """QLoRA for an adapter trained on a 4-bit base, else LoRA."""
    return "QLoRA" if layout and layout.get("quantization") == "4bit" else "LoRA"


def quant_sentence(layout):
    return f"loaded in {quantization_words(layout)} for training" if layout else "not quantized in training"


def data_text(record):
    """The training data as the card shows it: a file's name (not where it lay on the training machine), a
    data set id as it is, and the fingerprint."""
    path = record.data_path
    if not path:
        return "not recorded"
    if is_hub_id(path):
        shown = f"[{path}](https://huggingface.co/datasets/{path})"
    else:  # a file, or a mix spec of files and ids
        shown = "`" + ",".join(p if is_hub_id(p.split(":")[0]) else os.path.basename(p) for p in path.split(",")) + "`"
    return f"{shown} (fingerprint `{record.data_fingerprint or 'n/a'}`)"


def verify_text(verify):
    if not verify:
        return "not checked (merge with `--verify` to compare it with base + adapter)"
    tolerance = verify["tolerance"]
    return (
        f"**{verify['verdict']}**: largest logit difference {verify['max_abs_diff']:.2e} "
        f"(tolerance {tolerance['max_abs_diff']:.2g} = {tolerance['derivation']}), greedy next-token agreement "
        f"{100 * verify['agreement']:.1f}% (at least {100 * tolerance['agreement']:g}%) over "
        f"{verify['positions']} positions of {verify['prompts']} prompts"
    )


def quantization_words(layout):
    """How the base was quantized in training, in words ("4bit nf4, double quantization"), or "none"."""
    if not layout:
        return "none"
    words = f"{layout.get('quantization')} {layout.get('quant_type', '')}".strip()
    return words + (", double quantization" if layout.get("double_quant") else "")


def hyperparameters(run, lora, quant):
    """(name, value) rows of the card's table: the recorded training flags (run: the RunRecord) and the
    adapter's LoRA settings (its adapter_config.json, as a dict)."""
    flags = run.flags
    rows = [
        ("learning rate", flags.get("learning_rate")),
        ("batch size", flags.get("batch_size")),
        ("micro batch size", flags.get("micro_batch_size")),
        ("warmup steps", flags.get("warmup_steps")),
        ("epochs", flags.get("num_epochs")),
        ("max steps", flags.get("max_steps")),
        ("weight decay", flags.get("weight_decay")),
        ("lr scheduler", flags.get("lr_scheduler")),
        ("lora alpha", lora.get("lora_alpha")),
        ("lora rank", lora.get("r")),
        ("lora dropout", lora.get("lora_dropout")),
        ("lora target modules", ", ".join(sorted(lora.get("target_modules") or []))),
        ("lora target modules as given", target_words(flags.get("lora_target_modules"))),
        ("lora scale", run.lora_scale),
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
        ("prompt template", run.template_name),
        ("base quantization in training", quant),
        ("precision", run.precision),
    ]
    return [(name, value) for name, value in rows if value not in (None, "")]


def target_words(targets):
    """all-linear as typed (the resolved names are the row above); nothing when names were given."""
    return "all-linear" if targets == ["all-linear"] else None


def init_words(run):
    """--init_lora_weights, with what the merge had to know about it."""
    init = run.init_lora_weights
    loftq = run.loftq
    if loftq:
        steps = loftq.get("iterations", 1)
        rebuilt = f"; the 4-bit base it trained on is rebuilt from {LOFTQ_OFFSET}" if steps > 1 else ""
        return (
            f"{init} ({steps} iteration{'s' if steps > 1 else ''}: quantization error of the adapted layers "
            f"{loftq['relative_error_before']:.4f} -> {loftq['relative_error_after']:.4f} at the start{rebuilt})"
        )
    if init == "gaussian":
        return init
    return f"{init} (saved converted for the unchanged base: rank 2r)"


def training_summary(run, adapter_path, method):
    """The card's "Fine-tuning" line, in parts: steps and examples when the run finished."""
    result = run.result or {}
    train = run.train_stats
    parts = [f"{method} adapter trained with `finetune.py`"]
    if result.get("global_step"):
        parts.append(f"{result['global_step']} optimizer steps")
    if train.get("kept"):
        parts.append(
            f"{train['kept']:,} training examples, {train.get('label_tokens', 0):,} response tokens (labels) per epoch"
        )
    if not result:
        parts.append(f"merged from an intermediate checkpoint ({adapter_path})")
    return parts


def template_line(record):
    """The adapter card's line on how prompts are laid out (the record's prompt format): the chat template,
    else the Alpaca template."""
    chat = record.prompt_format and record.prompt_format.chat
    if chat:
        ends = ", ".join(f"`{t}`" for t in chat.end_of_turn)
        return (
            f"Chat template:** {chat.name} (each turn ends with {ends}; saved with the tokenizer, so "
            "`tokenizer.apply_chat_template` and inference.py use it)"
        )
    if record.template_name is None:
        return "Prompt template:** unknown"
    return (
        f"Prompt template:** {record.template_name} (also saved as the tokenizer's chat template, so "
        "`tokenizer.apply_chat_template`, inference.py and a merged model's GGUF file lay prompts out as in training)"
    )


def prompt_section(record, template, prompts):
    """The merged card's section on prompts (the record's prompt format): the chat template's text, or the Alpaca
    template's layout."""
    chat = record.prompt_format and record.prompt_format.chat
    if not chat and not template:
        return f"## Prompt template (unknown)\n\n{prompts}\n"
    if not chat:
        return (
            f"## Prompt template ({template.get('name', 'unknown')})\n\n{prompts}\n\nThe tokenizer's chat template "
            "lays conversations out the same way (a system message is the instruction and the question its input), "
            "so `tokenizer.apply_chat_template`, vLLM, chat clients, the GGUF file and its Modelfile prompt the "
            "model as it was trained.\n"
        )
    ends = ", ".join(f"`{t}`" for t in chat.end_of_turn)
    return (
        f"## Chat template ({chat.name})\n\nTrained on conversations rendered with this template; each "
        f"assistant turn ends with {ends}, which `generation_config.json` lists as a stop token. It is saved with "
        f"the tokenizer (`tokenizer.apply_chat_template`)"
        + (f":\n\n```jinja\n{chat.text.strip()}\n```\n" if chat.text else ".\n")
    )


def prompt_text(template):
    if not template:
        return "Not recorded (the adapter has no run_config.json)."
    return (
        f"With an input:\n\n```\n{template.get('prompt_input', '')}\n```\n\n"
        f"Without one:\n\n```\n{template.get('prompt_no_input', '')}\n```\n\n"
        f"The answer follows `{template.get('response_split', '')}`."
    )


def is_hub_id(name):
    """owner/name that is not a local path: a model or data set on the hub."""
    return bool(name and HUB_ID.match(name) and "/" in name and not Path(name).exists())


def base_link(base):
    """A hub id links to its page; a local or builtin base is shown as written."""
    return f"[{base}](https://huggingface.co/{base})" if is_hub_id(base) else f"`{base}`"


def llama_cpp_prompt(folder, question):
    """The question as llama.cpp is to be given it: rendered with the merged tokenizer's chat template (the
    prompt format the model was trained with), less the BOS llama.cpp adds itself; the question alone where the
    tokenizer has no chat template."""
    from transformers import AutoTokenizer

    from platy.data.examples import without_added_bos

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        return question
    messages = [{"role": "user", "content": question}]
    return without_added_bos(
        tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def gguf_section(files, folder):
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
    prompt = llama_cpp_prompt(folder, question).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f"""
## Run the GGUF files (llama.cpp, Ollama, LM Studio)

| file | type | size | largest logit difference to the merged model | greedy agreement | verdict |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

The differences were measured by loading each file back with transformers' GGUF loader
(`--verify`).

```bash
# llama.cpp, with the prompt laid out as the model was trained
llama-cli -m {first} -no-cnv -e -p "{prompt}" -n 256
# Ollama: the Modelfile in this folder holds the template and the stop tokens
ollama create {Path(first).stem} -f Modelfile
ollama run {Path(first).stem} "{question}"
```

LM Studio: copy a `.gguf` file into its models folder (or load it with `lms import`).
"""
