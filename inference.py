r"""Generate answers with a base model, base + adapter, or a merged model.

    # one question, with the adapter written by finetune.py (base and template from its run_config.json)
    python inference.py --lora_weights ./outputs/platypus-qlora --prompt "What is 12 + 30?"

    # a file of prompts (JSON, JSONL, CSV or Parquet with instruction and optional input), batched
    python inference.py --base_model ./outputs/merged --prompts_file questions.jsonl --output_file answers.jsonl

    # Platypus's spelling, and an interactive loop that streams tokens
    python inference.py --base_model ./outputs/merged --csv_path q.csv --output_csv_path a.csv
    python inference.py --base_model ./outputs/merged --interactive

temperature 0 (the default) is greedy decoding; batched greedy output equals one-at-a-time output.
"""

import json
from pathlib import Path

from platy import cli
from platy.cli import UserError, say


def main(
    base_model: str = None,
    lora_weights: str = None,
    prompt_template: str = None,
    prompt: str = None,
    input: str = None,
    prompts_file: str = None,
    output_file: str = None,
    csv_path: str = None,
    output_csv_path: str = None,
    interactive: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    batch_size: int = 8,
    load_8bit: bool = None,
    load_4bit: bool = None,
    seed: int = 42,
    trust_remote_code: bool = False,
):
    """Generate responses for one prompt, a prompts file, or interactively.

    Args:
        base_model: Hub id or folder of the base or merged model; default: the base recorded
            in the adapter's run_config.json.
        lora_weights: Adapter folder written by finetune.py (optional).
        prompt_template: Template name or path; default: the adapter's or merged model's
            recorded template, else alpaca.
        prompt: One instruction to answer (printed to stdout).
        input: The optional input that goes with --prompt.
        prompts_file: JSON, JSONL, CSV or Parquet rows with instruction and optional input.
        output_file: Where the rows go with a 'response' column added (same format as its
            suffix); default: print them.
        csv_path: Platypus's spelling of --prompts_file for CSV.
        output_csv_path: Platypus's spelling of --output_file for CSV.
        interactive: A prompt loop that streams the answer as it is generated.
        max_new_tokens: Most tokens generated per answer.
        temperature: 0 = greedy (default); above 0 samples with this temperature.
        top_p: Nucleus sampling threshold (with temperature > 0).
        num_beams: Beam search width (1 = none).
        repetition_penalty: Above 1.0 discourages repeating tokens.
        batch_size: Prompts generated together (left-padded).
        load_8bit: Load the base in 8-bit (bitsandbytes). Default with --lora_weights: load the
            base as the adapter was trained (4-bit, 8-bit or not quantized), so the answers are
            those of the trained adapter; False loads it unquantized.
        load_4bit: Load the base in 4-bit NF4 (bitsandbytes); default as for --load_8bit.
        seed: Seed for sampling.
        trust_remote_code: Allow model code from the hub.
    """
    setup = validate(dict(locals()))
    model, tokenizer, prompter = load_for_generation(setup)
    generator = Generator(model, tokenizer, prompter, setup)
    if setup["interactive"]:
        interactive_loop(generator)
    elif setup["rows"] is not None:
        answer_file(generator, setup)
    else:
        print(generator.generate([{"instruction": setup["prompt"], "input": setup["input"] or ""}])[0])


def validate(flags):
    from platy.data.rows import FILE_FORMATS, read_prompts
    from platy.merging import Adapter, loading_quantization
    from platy.prompts import Prompter

    flags = cli.coerce_bools(main, flags)
    if flags["input"] and not flags["prompt"]:
        raise UserError("--input goes with --prompt; a prompts file carries inputs in its 'input' column")
    sources = [
        name for name in ("prompt", "prompts_file", "csv_path", "interactive") if flags[name] not in (None, False, "")
    ]
    if len(sources) != 1:
        raise UserError(
            "give exactly one of --prompt, --prompts_file (or --csv_path) and --interactive"
            + (f"; got {', '.join('--' + s for s in sources)}" if sources else "")
        )
    if flags["load_8bit"] and flags["load_4bit"]:
        raise UserError("--load_8bit and --load_4bit exclude each other; pick one")
    for name in ("max_new_tokens", "batch_size", "num_beams"):
        if not isinstance(flags[name], int) or flags[name] < 1:
            raise UserError(f"--{name} must be a positive integer, got {flags[name]!r}")
    for name in ("temperature", "top_p", "repetition_penalty"):
        if not isinstance(flags[name], (int, float)) or isinstance(flags[name], bool):
            raise UserError(f"--{name} must be a number, got {flags[name]!r}")
    if flags["temperature"] < 0 or not 0 < flags["top_p"] <= 1 or flags["repetition_penalty"] <= 0:
        raise UserError("--temperature must be >= 0, --top_p in (0, 1] and --repetition_penalty > 0")
    if flags["top_p"] < 1 and flags["temperature"] == 0:
        raise UserError("--top_p applies to sampling: set --temperature above 0 too (0 is greedy)")
    out_path = flags["output_file"] or flags["output_csv_path"]
    if out_path and flags["prompt"]:
        raise UserError("--output_file goes with a prompts file; --prompt prints its answer")
    rows = kind = None
    prompts_path = flags["prompts_file"] or flags["csv_path"]
    if prompts_path:
        rows, kind = read_prompts(prompts_path, "--prompts_file" if flags["prompts_file"] else "--csv_path")
    if out_path and Path(out_path).suffix.lower() not in FILE_FORMATS:
        raise UserError(f"--output_file {out_path}: use a .json, .jsonl, .csv or .parquet name")

    adapter = Adapter(Path(flags["lora_weights"]).expanduser(), "--lora_weights") if flags["lora_weights"] else None
    recorded = (adapter.run_config if adapter else None) or {}
    base = flags["base_model"] or (adapter.base_model() if adapter else None)
    if not base:
        raise UserError(
            "--base_model is required (a model folder or hub id; with --lora_weights, the adapter's "
            "run_config.json can name it)"
        )
    if not adapter:  # a merged model folder carries the run configuration of its adapter
        from platy.files import read_run_config

        folder = Path(base).expanduser()
        recorded = (read_run_config(folder) if folder.is_dir() else None) or {}
    template = flags["prompt_template"] or recorded.get("resolved", {}).get("template", {}).get("name") or "alpaca"
    quantization, as_trained = loading_quantization(adapter, flags["load_4bit"], flags["load_8bit"])
    return {
        **flags,
        "base": base,
        "adapter": adapter,
        "prompter": Prompter(template, "--prompt_template"),
        "rows": rows,
        "kind": kind,
        "out_path": out_path,
        "quantization": quantization,
        "as_trained": as_trained,
    }


def load_for_generation(setup):
    import torch

    from platy.data.examples import prepare_tokenizer
    from platy.modeling import generation_device, load_model_with_adapter, load_tokenizer, resolve_base_model

    device, precision = generation_device()
    quantization = setup["quantization"]
    path = resolve_base_model(setup["base"])
    say(
        f"Loading {setup['base']}"
        + (
            f" ({quantization}, as trained)"
            if setup["as_trained"] and quantization != "none"
            else f" ({quantization})"
            if quantization != "none"
            else ""
        )
        + (f" + adapter {setup['adapter'].folder}" if setup["adapter"] else "")
        + f" on {device} ({precision})",
        err=True,
    )
    tokenizer_source = setup["adapter"].folder if setup["adapter"] else path
    tokenizer = prepare_tokenizer(load_tokenizer(str(tokenizer_source), setup["trust_remote_code"]))
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    # CUDA: "auto" spreads a model too big for one GPU over all of them
    placement = "auto" if device == "cuda" else {"": device}
    model = load_model_with_adapter(
        path,
        quantization,
        precision,
        setup["adapter"] and setup["adapter"].folder,
        "--lora_weights",
        trust_remote_code=setup["trust_remote_code"],
        placement=placement,
    )
    model.eval()
    torch.manual_seed(setup["seed"])
    return model, tokenizer, setup["prompter"]


class Generator:
    """Batched generation with left padding; answers cut at the template's response marker."""

    def __init__(self, model, tokenizer, prompter, setup):
        from platy.data.examples import adds_bos

        self.model, self.tokenizer, self.prompter = model, tokenizer, prompter
        self.bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        sampling = setup["temperature"] > 0
        self.kwargs = dict(
            max_new_tokens=setup["max_new_tokens"],
            do_sample=sampling,
            num_beams=setup["num_beams"],
            repetition_penalty=setup["repetition_penalty"],
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if sampling:
            self.kwargs.update(temperature=setup["temperature"], top_p=setup["top_p"])
        else:  # greedy: say so, so a model's generation_config cannot turn sampling on
            self.kwargs.update(temperature=None, top_p=None, top_k=None)

    def encode(self, rows):
        """The same ids training used for the prompt: [BOS] + prompt, left-padded."""
        import torch

        from platy.data.examples import with_bos

        texts = [self.prompter.generate_prompt(r["instruction"], r.get("input") or "") for r in rows]
        ids = [with_bos(x, self.bos) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        return input_ids.to(self.model.device), mask.to(self.model.device)

    def generate(self, rows, streamer=None):
        import torch

        input_ids, mask = self.encode(rows)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer, **self.kwargs)
        # the answer is what follows the prompt (which ends with the template's response_split);
        # decoding only the new tokens keeps an instruction that quotes the marker out of the answer
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)]


def answer_file(generator, setup):
    from tqdm import tqdm

    from platy.data.rows import FILE_FORMATS, write_rows

    rows, size = setup["rows"], setup["batch_size"]
    results = []
    with tqdm(total=len(rows), desc="Generating", unit=" prompts", dynamic_ncols=True) as bar:
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            for row, response in zip(batch, generator.generate(batch)):
                results.append({**row, "response": response})
            bar.update(len(batch))
    if setup["out_path"]:
        write_rows(setup["out_path"], results, FILE_FORMATS[Path(setup["out_path"]).suffix.lower()])
        say(f"Wrote {len(results)} responses to {setup['out_path']}", err=True)
    else:
        for row in results:
            print(json.dumps(row, ensure_ascii=False))


def interactive_loop(generator):
    from transformers import TextStreamer

    streamer = TextStreamer(generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print("Type an instruction (an empty line or Ctrl-D ends). Add an input after ' || ' if the task has one.")
    while True:
        try:
            line = input("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            print()
            return
        instruction, _, extra = line.partition(" || ")
        generator.generate([{"instruction": instruction.strip(), "input": extra.strip()}], streamer=streamer)


if __name__ == "__main__":
    cli.run(main)
