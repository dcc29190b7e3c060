"""Answer prompts with a base, base + adapter or merged model: the stages inference.py runs.

check_flags(flags) finds every problem of the command line without reading a file; resolve(flags)
then reads the adapter, the prompts file and the recorded template into a GenerationRun;
load_for_generation and Generator do the work.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from platy import checks, cli
from platy.cli import UserError, say
from platy.tiny import is_random

PROMPT_SOURCES = ("prompt", "prompts_file", "csv_path", "interactive")
# flags a GenerationRun holds as they were given
PASSED_THROUGH = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "num_beams",
    "repetition_penalty",
    "batch_size",
    "seed",
    "trust_remote_code",
)


@dataclass(frozen=True)
class GenerationRun:
    """What one inference.py run generates from, and how."""

    base: str  # the base or merged model as given (or as the adapter records it)
    adapter: object  # merging.Adapter, or None
    prompter: object  # the prompt template, where prompts are not rendered with a chat template
    # how prompts are rendered: the Jinja text of the chat template the model was trained with (its record's),
    # True: the tokenizer's own chat template where it has one, False: the prompt template
    chat_template: str | bool
    prompt: str | None
    input: str | None
    rows: list | None  # the prompts file's rows
    rows_source: str | None  # "--prompts_file <path>" (or --csv_path) for messages about them
    out_path: str | None
    answer_column: str  # model_output for Platypus's --output_csv_path, response for --output_file
    interactive: bool
    quantization: str
    as_trained: bool  # quantized as the adapter was trained, not by a flag
    max_new_tokens: int
    temperature: float
    top_p: float
    num_beams: int
    repetition_penalty: float
    batch_size: int
    seed: int
    trust_remote_code: bool


def check_flags(flags):
    """Every problem of inference.py's flags, as sentences; reads no file."""
    from platy.data.rows import FILE_FORMATS
    from platy.modeling import REMOTE_CODE_NEEDS_BASE

    problems = []
    if flags["input"] and not flags["prompt"]:
        problems.append("--input goes with --prompt; a prompts file carries inputs in its 'input' column")
    sources = [name for name in PROMPT_SOURCES if flags[name] not in (None, False, "")]
    if len(sources) != 1:
        problems.append(
            "give exactly one of --prompt, --prompts_file (or --csv_path) and --interactive"
            + (f"; got {', '.join('--' + s for s in sources)}" if sources else "")
        )
    if flags["load_8bit"] and flags["load_4bit"]:
        problems.append("--load_8bit and --load_4bit exclude each other; pick one")
    problems += checks.problems_of(
        *(checks.positive_int(name, flags[name]) for name in ("max_new_tokens", "batch_size", "num_beams"))
    )
    numbers = checks.problems_of(
        *(checks.number(name, flags[name]) for name in ("temperature", "top_p", "repetition_penalty"))
    )
    problems += numbers
    if not numbers:
        if flags["temperature"] < 0 or not 0 < flags["top_p"] <= 1 or flags["repetition_penalty"] <= 0:
            problems.append("--temperature must be >= 0, --top_p in (0, 1] and --repetition_penalty > 0")
        elif flags["top_p"] < 1 and flags["temperature"] == 0:
            problems.append("--top_p applies to sampling: set --temperature above 0 too (0 is greedy)")
    if flags["trust_remote_code"] and not flags["base_model"]:
        problems.append(REMOTE_CODE_NEEDS_BASE)
    out_path = flags["output_file"] or flags["output_csv_path"]
    if out_path and flags["prompt"]:
        problems.append("--output_file goes with a prompts file; --prompt prints its answer")
    if out_path and Path(out_path).suffix.lower() not in FILE_FORMATS:
        problems.append(f"--output_file {out_path}: use a .json, .jsonl, .csv or .parquet name")
    return problems


def resolve(flags):
    """The GenerationRun of checked flags: the prompts file read, the adapter and its recorded base and
    template found, the quantization to load with decided."""
    from platy.data.rows import read_prompts
    from platy.merging import Adapter
    from platy.modeling import bitsandbytes_missing, loading_quantization
    from platy.record import RunRecord

    rows = None
    prompts_path = flags["prompts_file"] or flags["csv_path"]
    if prompts_path:
        rows, _ = read_prompts(prompts_path, "--prompts_file" if flags["prompts_file"] else "--csv_path")
    adapter = Adapter(Path(flags["lora_weights"]).expanduser(), "--lora_weights") if flags["lora_weights"] else None
    record = adapter.record if adapter else None
    base = flags["base_model"] or (adapter.base_model() if adapter else None)
    if not base:
        raise UserError(
            "--base_model is required (a model folder or hub id; with --lora_weights, the adapter's "
            "run_config.json can name it)"
        )
    if not adapter:  # a merged model folder carries the run configuration of its adapter
        folder = Path(base).expanduser()
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            raise UserError(
                f"--base_model {base}: an adapter folder, not a model; pass it as --lora_weights {base} "
                "(its base model comes from its run_config.json), or merge it first with merge.py"
            )
        record = RunRecord.read(folder) if folder.is_dir() else None
    prompter, chat_template, note = prompt_choice(flags, record)
    if note:
        say(note, err=True)
    trained_on = (record and record.base_model) or base
    if is_random(trained_on):
        say(f"Note: {trained_on} is a random tiny model for trying the tools: its answers are meaningless", err=True)
    quantization, as_trained = loading_quantization(adapter, flags["load_4bit"], flags["load_8bit"])
    if bitsandbytes_missing(quantization):
        asked = f"--lora_weights {adapter.folder}: its base as trained" if as_trained else f"--load_{quantization}"
        raise UserError(
            f"{asked} ({quantization}) needs bitsandbytes: pip install bitsandbytes, or load the base "
            f"unquantized with --load_{quantization} False"
        )
    return GenerationRun(
        base=base,
        adapter=adapter,
        prompter=prompter,
        chat_template=chat_template,
        prompt=flags["prompt"],
        input=flags["input"],
        rows=rows,
        rows_source=f"{'--prompts_file' if flags['prompts_file'] else '--csv_path'} {prompts_path}" if rows else None,
        out_path=flags["output_file"] or flags["output_csv_path"],
        answer_column="model_output" if flags["output_csv_path"] else "response",
        interactive=flags["interactive"],
        quantization=quantization,
        as_trained=as_trained,
        **{name: flags[name] for name in PASSED_THROUGH},
    )


def prompt_choice(flags, record):
    """(prompter, chat_template, note): how prompts are rendered (see GenerationRun.chat_template). By default
    as the model was trained, from its record (an adapter's, or the one a merged folder carries); a model
    without one uses its tokenizer's chat template where it has one, else --prompt_template. --chat_template or
    --prompt_template given override the record, and the note says so."""
    from platy.prompts import Prompter

    asked_chat, asked_template = flags["chat_template"], flags["prompt_template"]
    fmt = record and record.prompt_format
    if not fmt:
        return Prompter(asked_template or "alpaca", "--prompt_template"), asked_chat is not False, None
    recorded = Prompter.recorded(fmt.template or {}, "--prompt_template")
    trained = f"the model was trained with {fmt.describe()} (its run_config.json)"
    if asked_chat is None and not asked_template:  # as trained
        return recorded, (fmt.chat.text or True) if fmt.chat else False, None
    if asked_chat:
        if fmt.chat:
            return recorded, fmt.chat.text or True, None
        return recorded, True, f"--chat_template true: prompts use the tokenizer's chat template; {trained}"
    prompter = Prompter(asked_template, "--prompt_template") if asked_template else recorded
    if fmt.chat or prompter.template != recorded.template:
        flag = f"--prompt_template {asked_template}" if asked_template else "--chat_template false"
        return prompter, False, f"{flag}: prompts use the prompt template {prompter.name}; {trained}"
    return prompter, False, None


def load_for_generation(run):
    """(model, tokenizer, prompter): the model in eval mode on the best device, a left-padding tokenizer."""
    import torch

    from platy.base_weights import resolve_base_model
    from platy.data.examples import prepare_tokenizer
    from platy.modeling import generation_device, load_model_with_adapter, load_tokenizer

    device, precision = generation_device()
    quantization = run.quantization
    path = resolve_base_model(run.base, "--base_model")
    how = f" ({quantization}, as trained)" if run.as_trained else f" ({quantization})"
    say(
        f"Loading {run.base}"
        + (how if quantization != "none" else "")
        + (f" + adapter {run.adapter.folder}" if run.adapter else "")
        + f" on {device} ({precision})",
        err=True,
    )
    tokenizer_source = run.adapter.folder if run.adapter else path
    tokenizer_flag = "--lora_weights" if run.adapter else "--base_model"
    # an adapter's tokenizer never runs code (an auto_map in it names modules that came with the adapter)
    trust_tokenizer = run.trust_remote_code and not run.adapter
    tokenizer = prepare_tokenizer(load_tokenizer(str(tokenizer_source), trust_tokenizer, flag=tokenizer_flag))
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    # CUDA: "auto" spreads a model too big for one GPU over all of them
    placement = "auto" if device == "cuda" else {"": device}
    model = load_model_with_adapter(
        path,
        quantization,
        precision,
        run.adapter and run.adapter.folder,
        "--lora_weights",
        trust_remote_code=run.trust_remote_code,
        placement=placement,
        base_flag="--base_model",
        vocabulary=len(tokenizer),
    )
    model.eval()
    torch.manual_seed(run.seed)
    return model, tokenizer, run.prompter


class Generator:
    """Batched generation with left padding; answers cut at the template's response marker."""

    def __init__(self, model, tokenizer, prompter, run):
        from platy.data.examples import adds_bos

        self.model, self.tokenizer, self.prompter = model, tokenizer, prompter
        self.bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        if isinstance(run.chat_template, str):  # the template the model was trained with, from its record
            self.chat = chat_template_of(tokenizer, run.chat_template)
        else:
            self.chat = chat_template_of(tokenizer) if run.chat_template else None
        stops = [tokenizer.eos_token_id, *(self.chat.end_of_turn_ids(tokenizer) if self.chat else ())]
        sampling = run.temperature > 0
        self.kwargs = dict(
            max_new_tokens=run.max_new_tokens,
            do_sample=sampling,
            num_beams=run.num_beams,
            repetition_penalty=run.repetition_penalty,
            eos_token_id=stops if self.chat else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if sampling:
            self.kwargs.update(temperature=run.temperature, top_p=run.top_p)
        else:  # greedy: say so, so a model's generation_config cannot turn sampling on
            self.kwargs.update(temperature=None, top_p=None, top_k=None)

    def encode(self, rows):
        """The same ids training used for the prompt: [BOS] + prompt, left-padded."""
        import torch

        from platy.data.examples import with_bos

        if self.chat:  # the template writes any BOS itself, as in training
            texts = self.chat.render(self.tokenizer, [prompt_messages(r) for r in rows], add_generation_prompt=True)
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        else:
            rows = [alpaca_prompt(r) for r in rows]
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


def chat_template_of(tokenizer, text=None):
    """A chat template with its end-of-turn tokens read: text (the record's), else the tokenizer's own; None
    where the tokenizer has none."""
    from platy.prompts import ChatTemplate

    text = text or getattr(tokenizer, "chat_template", None)
    if not isinstance(text, str) or not text:
        return None
    chat = ChatTemplate("model", text)
    chat.read_turns(tokenizer)
    return chat


def prompt_messages(row):
    """A prompt row as a conversation to answer: its messages (ending with a user turn), or its
    instruction and input as one user turn (the layout training used for Alpaca rows)."""
    from platy.data.rows import row_messages

    return row["messages"] if row.get("messages") else row_messages({**row, "output": ""})[:1]


def alpaca_prompt(row):
    """A prompt row for an Alpaca template: a messages row of one question (after an optional system
    message) laid out as training laid out that exchange (the system message as the instruction, the
    question as the input)."""
    from platy.data.rows import dolphin_layout

    if not row.get("messages"):
        return row
    system = next((m["content"] for m in row["messages"] if m["role"] == "system"), "")
    instruction, given_input = dolphin_layout(system, row["messages"][-1]["content"])
    return {"instruction": instruction, "input": given_input}


def several_exchanges(rows):
    """The 1-based numbers of the messages rows that hold earlier exchanges (they need a chat template)."""
    return [n for n, r in enumerate(rows, start=1) if sum(m["role"] == "user" for m in r.get("messages") or ()) > 1]


def prepare(flags):
    """The Generator of a command line's flags (checked, resolved, model loaded), for tests and benchmarks."""
    cli.fail_on(check_flags(flags))
    run = resolve(flags)
    return Generator(*load_for_generation(run), run)


def answer_prompt(generator, run):
    print(generator.generate([{"instruction": run.prompt, "input": run.input or ""}])[0])


def answer_file(generator, run):
    from tqdm import tqdm

    from platy.data.rows import FILE_FORMATS, write_rows

    rows, size = run.rows, run.batch_size
    if not generator.chat and (numbers := several_exchanges(rows)):
        raise UserError(
            f"{run.rows_source}: row {numbers[0]}{' and others' if len(numbers) > 1 else ''}: a conversation of "
            "several exchanges needs a chat template, and the prompts are laid out with a prompt template: train "
            "with finetune.py --chat_template, or give one question per row"
        )
    results = []
    with tqdm(total=len(rows), desc="Generating", unit=" prompts", dynamic_ncols=True) as bar:
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            for row, response in zip(batch, generator.generate(batch)):
                results.append({**row, run.answer_column: response})
            bar.update(len(batch))
    if run.out_path:
        write_rows(run.out_path, results, FILE_FORMATS[Path(run.out_path).suffix.lower()])
        say(f"Wrote {len(results)} responses to {run.out_path}", err=True)
    else:
        for row in results:
            print(json.dumps(row, ensure_ascii=False))


def interactive_loop(generator):
    """Read prompts and stream answers; with a chat template the conversation's earlier turns are kept
    (/clear starts a new one), with an Alpaca template each prompt is a new exchange."""
    from transformers import TextStreamer

    streamer = TextStreamer(generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
    if generator.chat:
        print("Type a message (an empty line or Ctrl-D ends; /clear starts a new conversation).")
    else:
        print("Type an instruction (an empty line or Ctrl-D ends). Add an input after ' || ' if the task has one.")
    history = []
    while True:
        try:
            line = input("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            print()
            return
        if generator.chat and line.strip() == "/clear":
            history = []
            print("(a new conversation)")
            continue
        if generator.chat:
            history.append({"role": "user", "content": line.strip()})
            answer = generator.generate([{"messages": history}], streamer=streamer)[0]
            history.append({"role": "assistant", "content": answer})
            continue
        instruction, _, extra = line.partition(" || ")
        generator.generate([{"instruction": instruction.strip(), "input": extra.strip()}], streamer=streamer)
