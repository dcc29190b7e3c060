"""GGUF files in llama.cpp itself (through llama-cpp-python) against the merged model in transformers.

    python bench/gguf_llama_cpp.py                              # the embedded tiny model, exported to f16 and q8_0
    python bench/gguf_llama_cpp.py --folder ./outputs/merged    # every .gguf of a merge.py --gguf output folder

For each file and prompt: whether llama.cpp's tokenizer gives the ids of the folder's Hugging Face
tokenizer, and the largest difference between llama.cpp's next-token logits (after the whole
prompt) and transformers' on the merged safetensors model, with whether both pick the same token.
llama-cpp-python builds llama.cpp from source when installed (pip install llama-cpp-python); without
it the script says so and measures nothing.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nIs 91 a prime number?\n\n### Response:\n",
    "다음 두 수의 합을 구하시오: 12, 30",
    "def add(a, b):\n    return a + b  # 😀",
)


def tiny_export(work):
    """The embedded tiny model with f16 and q8_0 files beside it (the export alone, no adapter)."""
    from platy import gguf_export, tiny

    folder = work / "tiny-llama"
    shutil.copytree(tiny.ensure_model("tiny-llama"), folder)
    for gguf_type in ("f16", "q8_0"):
        metadata = {"name": folder.name, "description": "bench/gguf_llama_cpp.py"}
        gguf_export.write_gguf(folder, gguf_type, gguf_export.file_name(folder, gguf_type), metadata)
    return folder


def main(folder=None, threads=2):
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit(
            "llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp): nothing measured"
        )
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="gguf-llama-cpp-"))
    try:
        folder = Path(folder) if folder else tiny_export(work)
        files = sorted(folder.glob("*.gguf"))
        if not files:
            sys.exit(f"{folder}: no .gguf files; run merge.py with --gguf first")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        expected = {}
        with torch.no_grad():
            for prompt in PROMPTS:
                ids = tokenizer(prompt)["input_ids"]
                expected[prompt] = (ids, model(torch.tensor([ids])).logits[0, -1].numpy())
        print(f"{'file':<34}{'prompt':>7}{'same ids':>10}{'max |logit diff|':>18}{'same next token':>17}")
        for path in files:
            llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, n_threads=threads, verbose=False)
            for number, prompt in enumerate(PROMPTS, start=1):
                ids, reference = expected[prompt]
                native = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
                llm.reset()
                llm.eval(ids)  # the same ids on both sides, so the logits compare the weights and the graph
                logits = np.asarray(llm.scores[len(ids) - 1], dtype=np.float32)
                difference = float(np.abs(logits - reference).max())
                same = int(logits.argmax()) == int(reference.argmax())
                print(f"{path.name:<34}{number:>7}{str(native == ids):>10}{difference:>18.2e}{str(same):>17}")
            del llm
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import fire

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fire.Fire(main)
