"""GGUF files in llama.cpp itself (through llama-cpp-python) against the model in transformers.

    python bench/gguf_llama_cpp.py                                    # the embedded tiny Llama (two tokenizer files)
    python bench/gguf_llama_cpp.py --base_model builtin:smollm2-135m  # a model folder or builtin:, as f16 and q8_0
    python bench/gguf_llama_cpp.py --folder ./outputs/merged          # every .gguf of a merge.py --gguf output folder
    python bench/gguf_llama_cpp.py --folder ./outputs/platypus-merged --prompts data/toolcalls/heldout.json \
        --max_new_tokens 48                                           # the quick start's held-out requests

The embedded tiny Llama is exported with its sentencepiece tokenizer.model, with its tokenizer as
transformers 5 saves it (tokenizer.json only), and, as the baseline, with the vocabulary llama.cpp's
own converter writes for that tokenizer.json (every piece scored -1000).

Two tables. Logits: for each file and prompt (English in the Alpaca template, Korean, code with an
emoji), whether llama.cpp's tokenizer gives the ids of the folder's Hugging Face tokenizer, and the
largest difference between llama.cpp's next-token logits after the whole prompt and transformers'
(float32) from the same ids, with whether both pick the same token. Answers: each of 20 prompts
nothing was trained on, rendered with the tokenizer's chat template (the Alpaca template without
one), tokenized by each side and answered greedily by each up to --max_new_tokens: whether the prompt
ids are the same, the answer tokens that agree before the first difference (over transformers'
answer tokens), and the answers whose text is the same. --prompts replaces the 20 prompts with the rows
of a JSON file (an instruction, and an input, each), such as a fine-tuned model's held-out requests.

llama-cpp-python builds llama.cpp from source when installed (pip install llama-cpp-python, about
10 minutes on 2 cores); without it the script says so and measures nothing.
"""

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from platy.cli import UserError, run  # noqa: E402
from platy.flags import from_signature  # noqa: E402

TYPES = ("f16", "q8_0")
LOGIT_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nIs 91 a prime number?\n\n### Response:\n",
    "다음 두 수의 합을 구하시오: 12, 30",
    "def add(a, b):\n    return a + b  # 😀",
)
ANSWER_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about autumn leaves.",
    "Explain what photosynthesis is in one sentence.",
    "What is 17 multiplied by 3?",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for 'happy'.",
    "Write a Python function that returns the square of a number.",
    "List the days of the week.",
    "Why is the sky blue?",
    "What does CPU stand for?",
    "Suggest a name for a pet turtle.",
    "How many legs does a spider have?",
    "Summarize the plot of Cinderella in two sentences.",
    "한국의 수도는 어디인가요?",
    "Write a short thank-you note to a teacher. 🙂",
    "What is the boiling point of water in Celsius?",
    "Convert 5 kilometers to meters.",
    "Is 91 a prime number? Answer yes or no.",
    "Give one tip for staying focused while studying.",
)


def main(folder: str = None, base_model: str = None, prompts: str = None, max_new_tokens=32, threads=2):
    """GGUF files in llama.cpp against transformers: token ids, next-token logits and greedy answers.

    Args:
        folder: a merge.py --gguf output folder: its .gguf files are measured against its safetensors model.
        base_model: a model folder or builtin:NAME, exported to f16 and q8_0 GGUF here and measured.
        prompts: a JSON file of rows with an instruction (and an input) each: the answered prompts.
        max_new_tokens: the longest greedy answer compared.
        threads: llama.cpp's CPU threads.
    """
    try:
        from llama_cpp import Llama  # noqa: F401
    except ImportError:
        sys.exit(
            "llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp): nothing measured"
        )
    if folder and base_model:
        raise UserError("--folder and --base_model both given: measure one model at a time")
    instructions = read_prompts(prompts) if prompts else ANSWER_PROMPTS
    work = Path(tempfile.mkdtemp(prefix="gguf-llama-cpp-"))
    try:
        for model_dir, files in models_and_files(work, folder, base_model):
            compare(model_dir, files, instructions, max_new_tokens, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_prompts(path):
    import json

    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
        prompts = [row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "") for row in rows]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UserError(f"--prompts {path}: give a JSON list of rows with an instruction each ({error})") from None
    if not isinstance(rows, list) or not prompts:
        raise UserError(f"--prompts {path}: give a JSON list of rows with an instruction each (it holds none)")
    return prompts


def models_and_files(work, folder, base_model):
    """[(model folder, its .gguf files)]: the folder's own files, or exports written into work."""
    if folder:
        files = sorted(Path(folder).glob("*.gguf"))
        if not files:
            raise UserError(f"--folder {folder}: no .gguf files; run merge.py with --gguf first")
        return [(Path(folder), files)]
    if base_model:
        from platy.base_weights import resolve_local_base

        source = Path(resolve_local_base(base_model, "--base_model"))
        return [(source, export(source, work, source.name))]
    from transformers import AutoTokenizer

    from platy import tiny

    source = tiny.ensure_model("tiny-llama")
    # transformers 5 saves a sentencepiece tokenizer as tokenizer.json alone: the same model both ways
    json_only = work / "tiny-llama-json"
    shutil.copytree(source, json_only, ignore=shutil.ignore_patterns("tokenizer*"))
    AutoTokenizer.from_pretrained(source).save_pretrained(json_only)
    with converter_scores():  # the baseline: what llama.cpp's converter writes for the tokenizer.json alone
        baseline = export(json_only, work, "tiny-llama-json-converter")
    return [
        (source, export(source, work, "tiny-llama")),
        (json_only, export(json_only, work, "tiny-llama-json")),
        (json_only, baseline),
    ]


@contextlib.contextmanager
def converter_scores():
    """The export with the vocabulary llama.cpp's converter writes for a sentencepiece-style tokenizer.json
    alone (its reader, gguf's LlamaHfVocab: every piece scored -1000, the unknown token typed CONTROL)."""
    import gguf

    from platy import gguf_export

    own = gguf_export.sentencepiece_json_tokens
    gguf_export.sentencepiece_json_tokens = lambda path, spec, unknown_id: gguf.LlamaHfVocab(path.parent).all_tokens()
    try:
        yield
    finally:
        gguf_export.sentencepiece_json_tokens = own


def export(source, work, name):
    """f16 and q8_0 files of the model in source, written into work."""
    from platy import gguf_export

    files = []
    for gguf_type in TYPES:
        destination = work / f"{name}-{gguf_type}.gguf"
        gguf_export.write_gguf(source, gguf_type, destination, {"name": name, "description": "bench/gguf_llama_cpp.py"})
        files.append(destination)
    return files


def compare(model_dir, files, instructions, max_new_tokens, threads):
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    print(f"\n{model_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    logits_expected = reference_logits(model, tokenizer)
    prompts = [rendered(tokenizer, p) for p in instructions]
    stops = stop_ids(model_dir, tokenizer)
    answers_expected = [transformers_answer(model, tokenizer, text, max_new_tokens, stops) for text in prompts]
    del model
    for path in files:
        llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, n_threads=threads, verbose=False)
        print_logits(path, llm, tokenizer, logits_expected)
        print_answers(path, llm, tokenizer, prompts, answers_expected, max_new_tokens, stops)
        del llm


def reference_logits(model, tokenizer):
    import torch

    expected = {}
    with torch.no_grad():
        for prompt in LOGIT_PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            expected[prompt] = (ids, model(torch.tensor([ids])).logits[0, -1].numpy())
    return expected


def print_logits(path, llm, tokenizer, expected):
    import numpy as np

    print(f"{'file':<34}{'prompt':>7}{'same ids':>10}{'max |logit diff|':>18}{'same next token':>17}")
    for number, prompt in enumerate(LOGIT_PROMPTS, start=1):
        ids, reference = expected[prompt]
        native = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)  # the same ids on both sides, so the logits compare the weights and the graph
        logits = np.asarray(llm.scores[len(ids) - 1], dtype=np.float32)
        difference = float(np.abs(logits - reference).max())
        same = int(logits.argmax()) == int(reference.argmax())
        print(f"{path.name:<34}{number:>7}{str(native == ids):>10}{difference:>18.2e}{str(same):>17}")


def rendered(tokenizer, instruction):
    """(text, Hugging Face ids): the prompt as the model is asked it, its chat template or else Alpaca's."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": instruction}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own specials
    from platy.prompts import Prompter

    text = Prompter("alpaca").generate_prompt(instruction)
    return text, tokenizer(text)["input_ids"]


def stop_ids(model_dir, tokenizer):
    """EOS and the end-of-turn ids of generation_config.json: where both sides stop answering."""
    from platy.gguf_export import end_of_turn_ids

    return {tokenizer.eos_token_id, *end_of_turn_ids(model_dir, tokenizer.eos_token_id)}


def transformers_answer(model, tokenizer, prompt, max_new_tokens, stops):
    import torch
    from transformers import GenerationConfig

    _, ids = prompt
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(stops),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=config)[0, len(ids) :].tolist()
    return [token for token in out if token not in stops]


def llama_cpp_answer(llm, ids, max_new_tokens, stops):
    """Greedy decoding by hand (argmax of llama.cpp's logits): no sampler settings between the two sides."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    answer = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stops:
            break
        answer.append(token)
        llm.eval([token])
    return answer


def print_answers(path, llm, tokenizer, prompts, expected, max_new_tokens, stops):
    same_ids = agreeing = total = same_text = 0
    for (text, ids), reference in zip(prompts, expected):
        # llama.cpp's own tokenization of the rendered prompt: the file's tokenizer is part of what is measured
        native = llm.tokenize(text.encode("utf-8"), add_bos=not tokenizer.chat_template, special=True)
        same_ids += native == ids
        answer = llama_cpp_answer(llm, native, max_new_tokens, stops)
        prefix = next(
            (i for i, (a, b) in enumerate(zip(answer, reference)) if a != b), min(len(answer), len(reference))
        )
        agreeing += prefix
        total += len(reference)
        same_text += tokenizer.decode(answer, skip_special_tokens=True) == tokenizer.decode(
            reference, skip_special_tokens=True
        )
    count = len(prompts)
    print(
        f"{path.name}: answers to {count} prompts (greedy, up to {max_new_tokens} tokens): same prompt ids "
        f"{same_ids}/{count}, token agreement {agreeing}/{total} ({agreeing / max(total, 1):.1%}), "
        f"same text {same_text}/{count} ({same_text / count:.0%})"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(from_signature(main))
