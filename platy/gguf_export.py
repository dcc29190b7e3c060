"""GGUF files of a merged model, for llama.cpp, Ollama and LM Studio (merge.py --gguf).

The gguf package (maintained with llama.cpp) does most of it and is used as it is: GGUFWriter, each
architecture's tensor name map (TensorNameMap), the vocabulary readers (SentencePieceVocab, BpeVocab),
SpecialVocab (special token ids, whether BOS/EOS are added, BPE merges, the chat template) and the
quantization functions of gguf.quants. What it leaves to llama.cpp's convert_hf_to_gguf.py script
(not part of the package) is written here: the architecture's hyperparameter keys, the Llama q/k
row order, the pre-tokenizer's name, tokens the Hugging Face tokenizer added, padding the vocabulary
to the embedding's rows, and writing tensor by tensor, each quantized in row blocks, so memory holds
about one tensor whatever the size of the model.
"""

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from platy.cli import UserError

# --gguf type -> (GGMLQuantizationType, LlamaFileType) member names of the gguf package
GGUF_TYPES = {
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# gguf.quants dequantizes these but cannot quantize them (gguf 0.19): llama.cpp's llama-quantize can
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
# Hugging Face model_type -> gguf MODEL_ARCH member. Mistral is the Llama graph in llama.cpp (its
# converter writes Mistral as llama); sliding-window attention is not applied there.
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
SUPPORTED = "Llama (Llama-2/3, Yi), Mistral and Qwen2"
# The byte-level pre-tokenizer splits llama.cpp knows by name (its tokenizer.ggml.pre values), as the
# Split regex a tokenizer.json applies before its byte-level mapping.
PRE_TOKENIZERS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
# The same for tokenizers that split with ByteLevel's built-in regex (GPT-2's), alone or after Digits
# (one digit per piece), by the steps of their pre_tokenizer. llama.cpp's "gpt-2" regex lacks GPT-2's
# final |\s+, which only matches what llama.cpp keeps as a piece of its own anyway.
BYTE_LEVEL_SPLITS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",  # SmolLM and SmolLM2 as published
}
METASPACE = "\u2581"  # sentencepiece's visible space, which a sentencepiece-style tokenizer.json maps spaces to
ROW_BLOCK_ELEMENTS = 1 << 24  # quantize 16M weights at a time: 64 MB of float32 beside the tensor
MISSING_GGUF = "the gguf package is missing: pip install gguf (or pip install -r requirements.txt)"


def parse_types(value):
    """--gguf 'f16,q8_0' (the command line may hand over a tuple) -> ['f16', 'q8_0']; a UserError names a bad type."""
    if value is None or value is False:
        return []
    words = value if isinstance(value, (list, tuple)) else str(value).split(",")
    types = [str(w).strip().lower() for w in words if str(w).strip()]
    if not types:
        raise UserError(f"--gguf {value!r}: give one or more of {', '.join(GGUF_TYPES)}, e.g. --gguf q8_0")
    for name in types:
        if name in K_QUANTS:
            raise UserError(
                f"--gguf {name}: the gguf package cannot write k-quants; export f16 and run llama.cpp's "
                f"llama-quantize NAME-f16.gguf NAME-{name.upper()}.gguf {name.upper()}"
            )
        if name not in GGUF_TYPES:
            raise UserError(f"--gguf {name}: unknown type; choose from {', '.join(GGUF_TYPES)}")
    return list(dict.fromkeys(types))


def gguf_missing():
    """The problem sentence when the gguf package cannot be imported, else None."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return f"--gguf: {MISSING_GGUF}"
    return None


def file_name(output_dir, gguf_type):
    """<output_dir>/<name>-<TYPE>.gguf"""
    return Path(output_dir) / f"{Path(output_dir).name}-{gguf_type}.gguf"


# ---- what a model must be to export -------------------------------------------------------------


def check_exportable(config, tokenizer_dir, base_dir, flag):
    """Refuse, before anything is written, a model or tokenizer the export cannot write faithfully."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        classes = ", ".join(config.get("architectures") or [])
        raise UserError(
            f"--gguf: the model is {model_type or 'of no recorded type'} ({classes}); GGUF export supports {SUPPORTED}"
        )
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise UserError(
            f"--gguf: rope scaling {rope['rope_type']!r} is not written by this export (default, linear and "
            "llama3 are); "
            "convert the merged folder with llama.cpp's convert_hf_to_gguf.py"
        )
    tokenizer_layout(tokenizer_dir, flag, base_dir)


def rope_parameters(config):
    """rope_theta and the scaling, from transformers 5's rope_parameters or the older keys."""
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


class TokenizerLayout(NamedTuple):
    """How a tokenizer goes into a GGUF: llama.cpp's tokenizer model ("llama": sentencepiece, "gpt2": byte-level
    BPE), its pre-tokenizer name, and the file the vocabulary is read from."""

    model: str
    pre: str
    source: str


def tokenizer_layout(folder, flag, base_folder=None, spec=None):
    """The TokenizerLayout of the tokenizer in folder, decided in the order of llama.cpp's converter for the
    Llama family: a sentencepiece tokenizer.model, else sentencepiece-style BPE in tokenizer.json (byte
    fallback, spaces as ▁; transformers 5 saves sentencepiece tokenizers so), else byte-level BPE whose
    split llama.cpp knows by name; anything else is a UserError naming the folder.

    A sentencepiece tokenizer.model may come from base_folder: the merge copies the base's beside tokenizer.json.
    spec: the folder's tokenizer.json (tokenizer_json), when the caller has read it already.
    """
    folder = Path(folder)
    if any((Path(f) / "tokenizer.model").is_file() for f in (folder, base_folder) if f):
        return TokenizerLayout("llama", "default", "tokenizer.model")
    spec = tokenizer_json(folder) if spec is None else spec
    model = spec.get("model") or {}
    if model and model.get("type") != "BPE":
        raise UserError(
            f"{flag}: the tokenizer in {folder} is a {model.get('type')} model; GGUF export writes BPE tokenizers "
            "(sentencepiece tokenizer.model, sentencepiece-style or byte-level BPE tokenizer.json)"
        )
    steps = [spec.get(part) for part in ("normalizer", "pre_tokenizer", "decoder")]
    if model and (model.get("byte_fallback") or METASPACE in json.dumps(steps, ensure_ascii=False)):
        return TokenizerLayout("llama", "default", "tokenizer.json")
    if model and "ByteLevel" in json.dumps(spec.get("decoder")):
        name = pre_tokenizer_name(spec.get("pre_tokenizer"))
        if name is None:
            known = ", ".join([*PRE_TOKENIZERS, *BYTE_LEVEL_SPLITS.values()])
            raise UserError(
                f"{flag}: the byte-level tokenizer in {folder} splits text in a way llama.cpp does not know by name "
                f"(it knows {known}); the GGUF would tokenize differently"
            )
        return TokenizerLayout("gpt2", name, "tokenizer.json")
    raise UserError(
        f"{flag}: no sentencepiece tokenizer.model and no BPE tokenizer.json (sentencepiece-style or byte-level) "
        f"in {folder}; GGUF export needs one of them"
    )


def tokenizer_json(folder):
    """A folder's tokenizer.json, parsed ({} where it has none)."""
    path = Path(folder) / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def pre_tokenizer_name(pre_tokenizer):
    """llama.cpp's name for a byte-level tokenizer.json pre_tokenizer (a Split of a known regex, or GPT-2's own
    split alone or after single digits), or None."""
    steps = flat_steps(pre_tokenizer)
    kinds = tuple(step.get("type") for step in steps)
    if kinds == ("Split", "ByteLevel") and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return next((name for name, pattern in PRE_TOKENIZERS.items() if pattern == regex), None)
    signature = tuple(
        (step["type"], step.get("use_regex", True) if step["type"] == "ByteLevel" else step.get("individual_digits"))
        for step in steps
    )
    return BYTE_LEVEL_SPLITS.get(signature)


def flat_steps(component):
    """The steps of a tokenizer.json normalizer or pre_tokenizer, Sequences unrolled."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        inner = component.get("pretokenizers") or component.get("normalizers") or []
        return [step for part in inner for step in flat_steps(part)]
    return [component]


# ---- writing one file ---------------------------------------------------------------------------


def write_gguf(folder, gguf_type, destination, metadata):
    """Write the merged model in `folder` as one GGUF file of `gguf_type` at `destination`.

    Written to a hidden temporary name beside it and renamed when complete; on any failure the
    temporary file is removed and the error goes up. Returns {"file", "bytes", "tensors"}.
    """
    import gguf

    from platy.base_weights import TensorSource, base_checkpoint, release_freed_memory

    logging.getLogger("gguf").setLevel(logging.ERROR)  # its notes on tokenizer.json layouts are not the user's
    folder, destination = Path(folder), Path(destination)
    config = json.loads((folder / "config.json").read_text())
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config["model_type"]])
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gguf_type][0])
    sources = [TensorSource(p) for p in base_checkpoint(folder, "--output_dir")]
    plan = tensor_plan(sources, arch, config, qtype)
    if rope_parameters(config).get("rope_type") == "llama3":  # Llama-3.1 and later: per-frequency factors
        factors = llama3_rope_factors(folder)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.insert(0, (Computed(factors), "rope_freqs", name, gguf.GGMLQuantizationType.F32, list(factors.shape)))
    rows = next(shape[0] for _, name, _, _, shape in plan if name == "model.embed_tokens.weight")
    tmp = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    try:
        add_general(writer, metadata, getattr(gguf.LlamaFileType, GGUF_TYPES[gguf_type][1]))
        add_hyperparameters(writer, config, rows)
        add_vocabulary(writer, folder, rows)
        for _, _, gguf_name, out_type, shape in plan:
            nbytes, byte_shape, dtype = stored_layout(shape, out_type)
            writer.add_tensor_info(gguf_name, byte_shape, dtype, nbytes, raw_dtype=raw_type(out_type))
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for source, name, _, out_type, _ in plan:
            writer.write_tensor_data(stored_tensor(source.read(name), name, out_type, config))
            release_freed_memory()
        writer.fout[0].flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        tmp.replace(destination)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"file": destination.name, "bytes": destination.stat().st_size, "tensors": len(plan)}


class Computed:
    """A tensor the export computes rather than reads (llama.cpp's rope_freqs), read as a source is."""

    def __init__(self, tensor):
        self.tensor = tensor

    def read(self, name):
        return self.tensor


def llama3_rope_factors(folder):
    """llama.cpp's rope_freqs for Llama-3.1's rope scaling: the factor dividing each rotary frequency,
    taken from transformers' own llama3 frequencies (default frequency / scaled frequency)."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    return (default / scaled).float()


def tensor_plan(sources, arch, config, qtype):
    """(source, hf name, gguf name, stored type, shape) of every tensor, in file order."""
    import gguf

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    plan = []
    for source in sources:
        for name, (_, shape, _, _) in source.entries.items():
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue  # recomputed by llama.cpp / the tied embedding is the output
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"--gguf: the merged model holds {name}, which has no GGUF name for this architecture")
            plan.append((source, name, gguf_name, stored_type(shape, qtype), list(shape)))
    return plan


def stored_type(shape, qtype):
    """Vectors (norms, biases) stay float32, as llama.cpp's converter keeps them; matrices take the type,
    or float16 where a row is not a whole number of the type's blocks."""
    import gguf

    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def raw_type(out_type):
    import gguf

    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    return None if out_type in plain else out_type


def stored_layout(shape, out_type):
    """(bytes, shape to declare, numpy dtype to declare) of a tensor stored as out_type."""
    import gguf
    import numpy as np

    if out_type == gguf.GGMLQuantizationType.F32:
        return 4 * math.prod(shape), shape, np.float32
    if out_type == gguf.GGMLQuantizationType.F16:
        return 2 * math.prod(shape), shape, np.float16
    byte_shape = gguf.quant_shape_to_byte_shape(shape, out_type)
    return math.prod(byte_shape), byte_shape, np.uint8


def stored_tensor(tensor, name, out_type, config):
    """The tensor as the file stores it: in llama.cpp's row order, converted or quantized in row blocks."""
    import gguf
    import numpy as np
    import torch

    tensor = llama_row_order(tensor, name, config)
    if out_type == gguf.GGMLQuantizationType.F32:
        return tensor.to(torch.float32).numpy()
    if out_type == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).numpy()
    rows = tensor.reshape(-1, tensor.shape[-1])
    out = np.empty(gguf.quant_shape_to_byte_shape(rows.shape, out_type), dtype=np.uint8)
    step = max(1, ROW_BLOCK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].to(torch.float32).numpy()
        out[start : start + step] = gguf.quants.quantize(block, out_type)
    return out.reshape(gguf.quant_shape_to_byte_shape(list(tensor.shape), out_type))


def llama_row_order(tensor, name, config):
    """Llama's q and k rows regrouped for llama.cpp's rotary embedding.

    Hugging Face's Llama checkpoints order each head's rows as the two halves its rotate_half rotary
    pairs up; llama.cpp's Llama graph pairs adjacent rows, so its converter interleaves the halves
    (Qwen2 uses the half-split rotary in llama.cpp too and keeps its order).
    """
    if config["model_type"] not in ("llama", "mistral"):
        return tensor
    heads = config["num_attention_heads"]
    if ".self_attn.q_proj." in name:
        groups = heads
    elif ".self_attn.k_proj." in name:
        groups = config.get("num_key_value_heads") or heads
    else:
        return tensor
    rest = tensor.shape[1:]
    half = tensor.shape[0] // groups // 2
    return tensor.reshape(groups, 2, half, *rest).transpose(1, 2).reshape(tensor.shape).contiguous()


# ---- metadata -----------------------------------------------------------------------------------


def add_general(writer, metadata, file_type):
    """general.*: name, base model, license, data set, the toolkit, file type."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(metadata["name"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_description(metadata["description"])
    if metadata.get("base_model"):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, metadata["base_model"])
    if metadata.get("license"):
        writer.add_license(metadata["license"])
    if metadata.get("data"):
        writer.add_dataset_count(1)
        writer.add_dataset_name(0, metadata["data"])
    writer.add_tags(["lora", "platypus"])


def add_hyperparameters(writer, config, rows):
    """The {arch}.* keys llama.cpp reads for the Llama and Qwen2 graphs."""
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(rows)


def add_vocabulary(writer, folder, rows):
    """tokenizer.ggml.*: tokens, scores and types, merges, special ids, add BOS/EOS, chat template, EOT."""
    import gguf

    spec = tokenizer_json(folder)
    layout = tokenizer_layout(folder, "--output_dir", spec=spec)
    tokens, scores, types = read_tokens(folder, layout, spec)
    if len(tokens) > rows:
        raise UserError(
            f"--gguf: the tokenizer has {len(tokens)} tokens but the embedding only {rows} rows; "
            "resize the embedding before merging"
        )
    for index in range(len(tokens), rows):  # rows the tokenizer never produces, as llama.cpp's converter names them
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(layout.model)
    writer.add_tokenizer_pre(layout.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if layout.model == "llama":  # byte-level BPE merges by its merge list, and llama.cpp's converter writes no scores
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(adds_space_prefix(folder, layout, spec))
    special = gguf.SpecialVocab(folder, load_merges=layout.model == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:  # llama.cpp would add BOS to every Llama-graph prompt
        writer.add_add_bos_token(adds_bos(folder))
    for token_id in end_of_turn_ids(folder, special.special_token_ids.get("eos"))[:1]:
        writer.add_eot_token_id(token_id)


def adds_bos(folder):
    """Whether the Hugging Face tokenizer starts a text with BOS. Written where gguf's SpecialVocab finds no
    add_bos_token in the tokenizer files: without the key, llama.cpp decides by architecture and adds a BOS
    (the llama graph: Llama, Mistral, Yi) that training never saw."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def read_tokens(folder, layout, spec):
    """(tokens as bytes, scores, token types): the vocabulary read from layout.source (gguf's readers for a
    tokenizer.model and for byte-level BPE), then the tokens the Hugging Face tokenizer added beyond it (gguf's
    readers only know added_tokens.json, which transformers 5 no longer writes), typed as transformers marks them.
    spec: the folder's tokenizer.json (tokenizer_json)."""
    import gguf

    if layout.source == "tokenizer.model":
        base = gguf.SentencePieceVocab(folder).sentencepiece_tokens()
    elif layout.model == "llama":
        base = sentencepiece_json_tokens(
            folder / "tokenizer.json", spec, gguf.SpecialVocab(folder).special_token_ids.get("unk")
        )
    else:
        base = gguf.BpeVocab(folder).bpe_tokens()
    tokens, scores, types = [], [], []
    for text, score, token_type in base:
        tokens.append(text.encode() if isinstance(text, str) else text)
        scores.append(score)
        types.append(token_type)
    pieces = spec.get("model", {}).get("vocab") or {}
    if layout.source == "tokenizer.model" and any(
        pieces.get(t.decode(errors="replace"), i) != i for i, t in enumerate(tokens)
    ):
        raise UserError(
            f"--gguf: tokenizer.model in {folder} does not hold the pieces of its tokenizer.json; "
            "give the model folder its own tokenizer.model"
        )
    for added in sorted(spec.get("added_tokens", []), key=lambda a: a["id"]):
        kind_of = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        if added["id"] < len(tokens):
            # a tokenizer.model types its own control pieces; the unknown piece stays UNKNOWN, as it types it
            retype = layout.source == "tokenizer.json" and types[added["id"]] != gguf.TokenType.UNKNOWN
            if retype and tokens[added["id"]] == added["content"].encode():
                types[added["id"]] = kind_of
            continue
        if added["id"] != len(tokens):
            raise UserError(
                f"--gguf: the tokenizer's added token {added['content']!r} has id {added['id']}, leaving a gap "
                f"after {len(tokens)} tokens"
            )
        tokens.append(added["content"].encode())
        scores.append(-1000.0)
        types.append(kind_of)
    return tokens, scores, types


def sentencepiece_json_tokens(path, spec, unknown_id):
    """(piece, score, type) for each id of a sentencepiece-style BPE tokenizer.json, as its tokenizer.model
    would give them.

    llama.cpp's sentencepiece tokenizer merges adjacent pieces by the score of the merged piece, highest
    first, where Hugging Face applies the merge of lowest rank; so a piece scores minus the rank of the first
    merge that makes it, counted once per piece, and the pieces no merge makes follow in id order. For a file
    converted from a tokenizer.model these are sentencepiece's own scores (-i for its i-th piece). Byte
    pieces, the unknown piece and added tokens score 0, as sentencepiece stores them; added tokens are typed
    by read_tokens.
    """
    import gguf

    model = spec["model"]
    by_id = {index: piece for piece, index in model["vocab"].items()}
    if sorted(by_id) != list(range(len(model["vocab"]))):
        raise UserError(f"--gguf: {path}: the vocabulary's ids are not 0 to {len(model['vocab']) - 1} without gaps")
    rank = {}
    for merge in model.get("merges") or []:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, len(rank))
    added = {token["id"] for token in spec.get("added_tokens", [])}
    unmerged = len(rank)
    for index in range(len(by_id)):
        piece = by_id[index]
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            yield piece, 0.0, gguf.TokenType.BYTE
        elif index == unknown_id:
            yield piece, 0.0, gguf.TokenType.UNKNOWN
        elif index in added:
            yield piece, 0.0, gguf.TokenType.NORMAL
        elif piece in rank:
            yield piece, -float(rank[piece]), gguf.TokenType.NORMAL
        else:
            yield piece, -float(unmerged), gguf.TokenType.NORMAL
            unmerged += 1


def adds_space_prefix(folder, layout, spec):
    """Whether the sentencepiece tokenizer puts ▁ before a text: the tokenizer.model's add_dummy_prefix,
    or in a tokenizer.json the Metaspace pre-tokenizer's prepend_scheme (first or always; older files say
    add_prefix_space) or a normalizer that prepends ▁ (older Llama files)."""
    if layout.source == "tokenizer.model":
        return sentencepiece_adds_prefix(folder / "tokenizer.model")
    for step in flat_steps(spec.get("normalizer")) + flat_steps(spec.get("pre_tokenizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == METASPACE:
            return True
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            return scheme != "never"
    return False


def sentencepiece_adds_prefix(model_path):
    """Whether the sentencepiece model prepends a space (its normalizer's add_dummy_prefix)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return proto.normalizer_spec.add_dummy_prefix


def end_of_turn_ids(folder, eos_id):
    """The ids generation stops at besides EOS (generation_config.json's eos_token_id list), e.g. <|im_end|>."""
    path = Path(folder) / "generation_config.json"
    recorded = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    ids = recorded if isinstance(recorded, list) else [recorded] if recorded is not None else []
    return [i for i in ids if i != eos_id]


def stop_tokens(folder):
    """The texts of the tokens generation stops at (EOS, then end-of-turn tokens), for a Modelfile."""
    folder = Path(folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {index: token for token, index in (spec.get("model", {}).get("vocab") or {}).items()}
    by_id.update({added["id"]: added["content"] for added in spec.get("added_tokens", [])})
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos_id = next((i for i, t in by_id.items() if t == eos), None)
    texts = [eos] if eos else []
    texts += [by_id[i] for i in end_of_turn_ids(folder, eos_id) if i in by_id]
    return list(dict.fromkeys(texts))


def refuse_directives(text, what):
    """A template that comes with a received adapter is data from elsewhere: a \"\"\" in it would close the
    Modelfile's TEMPLATE and make the rest Modelfile directives (another FROM, an ADAPTER, a SYSTEM prompt).
    Ollama's triple-quoted strings have no escape, so such a template is refused."""
    if isinstance(text, str) and '"""' in text:
        raise UserError(
            f'--gguf: {what} holds """, which would end the Modelfile\'s TEMPLATE and turn the rest into '
            "Modelfile directives; merge without --gguf, or retrain with a template free of it"
        )


def check_recorded_templates(record):
    """Before anything is written: the adapter's recorded prompt template and chat template (refuse_directives)."""
    fmt = record and record.prompt_format
    if not fmt:
        return
    for text in (fmt.template or {}).values():
        refuse_directives(text, "the adapter's recorded prompt template (run_config.json)")
    if fmt.chat:
        refuse_directives(fmt.chat.text, "the adapter's recorded chat template (run_config.json)")


def modelfile(gguf_file, template, stops):
    """An Ollama Modelfile for the GGUF: template (ollama_template's) as Ollama's TEMPLATE, and the stop tokens."""
    refuse_directives(template, "the merged model's chat template (the adapter's recorded prompt format)")
    lines = [
        f"# Ollama: ollama create {Path(gguf_file).stem} -f Modelfile && ollama run {Path(gguf_file).stem}",
        f"FROM ./{gguf_file}",
    ]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: the model's tokenizer has no chat template to lay its prompts out")
    lines += [f'PARAMETER stop "{json.dumps(stop)[1:-1]}"' for stop in stops]
    return "\n".join(lines) + "\n"


# stand-ins for Ollama's fields while the chat template renders an exchange
OLLAMA_FIELDS = {"SYSTEM-c4f1": "{{ .System }}", "PROMPT-c4f1": "{{ .Prompt }}", "RESPONSE-c4f1": "{{ .Response }}"}


def ollama_template(folder):
    """The merged tokenizer's chat template (the prompt format the model was trained with, see merge.py) as an
    Ollama TEMPLATE: one exchange rendered with stand-ins for .System, .Prompt and .Response, with a system
    message and without one (a template may insert its own default). Ollama renders earlier exchanges with it
    too and generates where .Response stands. None where the tokenizer has no chat template or its rendering
    of an exchange cannot be laid out so."""
    from transformers import AutoTokenizer

    from platy.data.examples import without_added_bos
    from platy.prompts import ChatTemplate

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template:
        return None
    system, prompt, response = OLLAMA_FIELDS
    chat = ChatTemplate("merged", tokenizer.chat_template)
    try:
        chat.read_turns(tokenizer)
    except UserError:  # the template cannot mark where a turn ends
        return None
    forms = []
    for head in ([{"role": "system", "content": system}], []):
        exchange = [*head, {"role": "user", "content": prompt}]
        try:
            opened = chat.render(tokenizer, [exchange], add_generation_prompt=True)[0]
            whole = chat.render(tokenizer, [exchange + [{"role": "assistant", "content": response}]])[0]
        except UserError:  # a template that refuses a system message: the form without one
            continue
        if not whole.startswith(opened) or response not in whole[len(opened) :]:
            return None
        closing = whole[len(opened) + whole[len(opened) :].index(response) + len(response) :]
        if chat.prompts_always:  # the turn ends at its end-of-turn token; the generation prompt follows
            closing = closing[: closing.index(chat.end_of_turn[0]) + len(chat.end_of_turn[0])]
        form = (without_added_bos(tokenizer, opened) + response + closing).replace("{{", '{{ "{{" }}')
        for stand_in, field in OLLAMA_FIELDS.items():
            form = form.replace(stand_in, field)
        forms.append(form)
    if not forms:
        return None
    if len(forms) == 1 or forms[0] == forms[1]:
        return forms[-1]
    return f"{{{{ if .System }}}}{forms[0]}{{{{ else }}}}{forms[1]}{{{{ end }}}}"


# ---- checking a written file with an independent loader -----------------------------------------

# text whose ids the tokenizer rebuilt from the GGUF must reproduce
TOKENIZER_TEXTS = (
    "다음 두 수의 합을 구하시오: 12, 30",
    "Emoji 😀🎉👍🏽 and symbols © ± ∑",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nIs 91 a prime number?\n\n### Response:\n",
)


def compare_with_merged(folder, files, prompts, dtype="float32"):
    """{type: report} for GGUF files in folder, each loaded back by transformers' GGUF loader (gguf's
    reader and dequantization, transformers' own tensor mapping and tokenizer rebuild): largest logit
    difference to the merged safetensors model (and the merged model's largest |logit|, which the rounding
    scales with), greedy agreement, and whether its tokenizer gives the same ids on the prompts and on Korean,
    emoji and code."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    config = json.loads((Path(folder) / "config.json").read_text())
    # transformers' GGUF loader reads no rope_freqs: a llama3-scaled model gets the merged model's rotary
    # frequencies (the rope_freqs tensor itself is checked against the published rule in the tests, and
    # llama.cpp reads it: BENCHMARKS.md)
    rotary_config = (
        AutoConfig.from_pretrained(str(folder)) if rope_parameters(config).get("rope_type") == "llama3" else None
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    batches = [tokenizer(text, return_tensors="pt") for text in prompts]
    merged = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype).eval()
    with torch.no_grad():
        reference = [merged(**ids).logits.float() for ids in batches]
    del merged
    max_abs_logit = max(logits.abs().max().item() for logits in reference)
    reports = {}
    for gguf_type, name in files.items():
        loaded = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
        texts = [*prompts, *TOKENIZER_TEXTS]
        same_ids = sum(loaded(t)["input_ids"] == tokenizer(t)["input_ids"] for t in texts)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch_dtype).eval()
        if rotary_config is not None:
            model.model.rotary_emb = type(model.model.rotary_emb)(config=rotary_config)
        worst, agree, positions = 0.0, 0, 0
        with torch.no_grad():
            for ids, expected in zip(batches, reference):
                logits = model(**ids).logits.float()
                worst = max(worst, (logits - expected).abs().max().item())
                agree += (logits.argmax(-1) == expected.argmax(-1)).sum().item()
                positions += logits.shape[1]
        del model
        reports[gguf_type] = {
            "max_abs_diff": worst,
            "agreement": agree / positions,
            "positions": positions,
            "tokenizer_texts": len(texts),
            "tokenizer_same_ids": same_ids,
            "max_abs_logit": max_abs_logit,
        }
    return reports
