"""Instruction data: read Alpaca-format rows, check them, tokenize with exact label masking."""

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
from pathlib import Path

from platy.cli import TOKENIZER_THREADS_OFF_BY_US, UserError, error_detail

IGNORE_INDEX = -100  # label value the loss skips
FILE_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
MAX_ROW_PROBLEMS_SHOWN = 3


HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def looks_like_local_path(spec):
    """A data set id is 'name' or 'owner/name'. A file suffix, or a first component that is a
    local folder (data/rows.jsn), means a file that is missing, not an id to download."""
    first = spec.split("/", 1)[0]
    return (not HUB_ID.match(spec) or bool(re.search(r"\.[A-Za-z]{2,8}$", spec))
            or ("/" in spec and Path(first).is_dir()))


def load_rows(data_path, seed=42):
    """Rows of a local data file, a data set id or a mix spec, with a fingerprint of their content.

    Returns (rows, fingerprint). Rows are checked (see check_rows); a mix spec's sources are
    sampled with seed (see mix_rows).
    """
    if is_mix_spec(data_path):
        return mix_rows(data_path, seed)
    rows, fingerprint = read_source(data_path)
    return check_rows(rows, str(data_path)), fingerprint


def read_source(data_path, flag="--data_path"):
    """The raw rows of a local file or a data set id, and a fingerprint of their content."""
    path = Path(os.path.expanduser(str(data_path)))
    if path.exists():
        return _read_local(path, flag)
    if looks_like_local_path(str(data_path)):
        raise UserError(f"{flag}: file not found: {data_path}; give an existing JSON, JSONL, CSV or "
                        f"Parquet file or a data set id")
    return _read_hub(str(data_path), flag)


# ---- mix specs: 'a.json:1.0,b.jsonl:0.01' -----------------------------------------------

MIX_FRACTION = re.compile(r"^(.+):([^:/\\]*)$")


def is_mix_spec(text):
    """A comma-separated list of sources, or one source with ':fraction' (and no file of that name)."""
    text = str(text)
    if Path(os.path.expanduser(text)).exists():
        return False
    match = MIX_FRACTION.match(text)
    return "," in text or bool(match and _as_number(match.group(2)) is not None)


def _as_number(text):
    try:
        return float(text)
    except ValueError:
        return None


def parse_mix(spec, flag="--data_path"):
    """[(source, fraction)] of a mix spec; every problem of the spec in one UserError.

    A source without ':fraction' is taken whole (1.0). Fractions lie in (0, 1]: a mix
    samples sources down, it never repeats rows.
    """
    entries, problems = [], []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            problems.append("an empty entry (two commas in a row, or a trailing comma)")
            continue
        match = MIX_FRACTION.match(part)
        source, fraction = part, 1.0
        if match and not Path(os.path.expanduser(part)).exists():
            source, fraction = match.group(1), _as_number(match.group(2))
            if fraction is None or not 0 < fraction <= 1:
                problems.append(f"{part}: the fraction must be a number in (0, 1], e.g. {source}:0.01")
                continue
        path = Path(os.path.expanduser(source))
        if not path.exists() and looks_like_local_path(source):
            problems.append(f"{source}: file not found")
            continue
        entries.append((source, fraction))
    if problems:
        raise UserError(f"{flag} {spec}: " + "; ".join(problems) + ". A mix spec reads "
                        "'file:fraction,file:fraction', e.g. 'open_platypus.json:1.0,dolphin.jsonl:0.01'")
    return entries


def origin_name(source):
    """data_source given to rows that carry none: the file's name without suffix, or the data set id."""
    path = Path(os.path.expanduser(str(source)))
    return path.stem if path.exists() or looks_like_local_path(str(source)) else str(source)


def take_share(rows, source, fraction, seed):
    """round(fraction x rows) rows (at least one), drawn with a seed of their own, in file order;
    rows without a data_source get the source's name.

    The draw depends on seed and the file's name only, so changing one source's fraction
    leaves the sample of the others as it was.
    """
    import random

    if fraction < 1:
        k = max(1, round(fraction * len(rows)))
        picked = sorted(random.Random(f"{seed}:{Path(str(source)).name}").sample(range(len(rows)), k))
        rows = [rows[i] for i in picked]
    name = origin_name(source)
    return [row if "data_source" in row else {**row, "data_source": name} for row in rows]


def mix_rows(spec, seed, flag="--data_path"):
    """Checked rows of every source of a mix spec, each sampled to its fraction, and a fingerprint."""
    rows, parts = [], []
    for source, fraction in parse_mix(spec, flag):
        raw, fingerprint = read_source(source, flag)
        rows += take_share(check_rows(raw, source), source, fraction, seed)
        parts.append([source, fraction, fingerprint])
    digest = hashlib.sha256(json.dumps([parts, seed]).encode()).hexdigest()
    return rows, f"mix:sha256:{digest}"


def _read_local(path, flag="--data_path"):
    """Rows of a JSON, JSONL, CSV or Parquet file, and the sha256 of its bytes."""
    if path.is_dir():
        raise UserError(f"{flag}: {path} is a folder; give a JSON, JSONL, CSV or Parquet file")
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{flag}: {path}: unsupported file type '{path.suffix}'; "
                        f"use .json, .jsonl, .csv or .parquet")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{flag}: cannot read {path}: {err.strerror}; check the path and permissions") from err
    fingerprint = "sha256:" + hashlib.sha256(raw).hexdigest()
    try:
        if kind == "json":
            rows = _parse_json(raw.decode("utf-8"))
        elif kind == "jsonl":
            rows = _parse_jsonl(raw.decode("utf-8"))
        elif kind == "csv":
            import pandas as pd

            # keep_default_na=False: an empty cell is an empty string, not NaN
            rows = pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
        else:
            import pandas as pd

            rows = pd.read_parquet(path).to_dict("records")
    except UserError as err:
        raise UserError(f"{flag}: {path}: {err}") from err
    except Exception as err:  # any parser failure is a file the user must fix
        detail = error_detail(err)
        raise UserError(f"{flag}: {path} is not valid {kind.upper()} ({detail}); fix or convert the file") from err
    return rows, fingerprint


def read_prompts(path, flag):
    """Prompt rows (instruction, optional input) of a file, with their other columns kept.

    Plain strings in a JSON list are instructions. Returns (rows, kind).
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise UserError(f"{flag}: file not found: {path}")
    if path.suffix.lower() == ".csv" and not path.read_bytes().strip():
        rows = []
    else:
        rows, _ = _read_local(path, flag)
    rows = [{"instruction": r} if isinstance(r, str) else r for r in rows]
    if not rows:
        raise UserError(f"{flag}: {path} holds no prompts; add rows with an 'instruction' field")
    if all(isinstance(r, dict) and "instruction" not in r for r in rows):
        columns = sorted({k for r in rows if isinstance(r, dict) for k in r})
        raise UserError(f"{flag}: {path}: no 'instruction' column; the rows have {', '.join(columns) or 'no fields'}. "
                        "Name the question column instruction (and an optional one input)")
    for number, row in enumerate(rows, start=1):
        value = row.get("instruction") if isinstance(row, dict) else row
        if not isinstance(value, str):
            raise UserError(f"{flag}: {path}: row {number}: 'instruction' is {type(value).__name__}, not text")
        if not value.strip():
            raise UserError(f"{flag}: {path}: row {number}: 'instruction' is blank")
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise UserError(f"{flag}: {path}: row {number}: 'input' is {type(row['input']).__name__}, not text")
    return rows, FILE_FORMATS[path.suffix.lower()]


def write_rows(path, rows, kind):
    """Write rows as JSON, JSONL, CSV or Parquet through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if kind == "json":
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif kind == "jsonl":
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        if kind == "csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp)
    tmp.replace(path)


def _parse_json(text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # a .json file holding JSON Lines is common (and what many exporters write)
        try:
            return _parse_jsonl(text)
        except UserError:
            raise UserError(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                            "fix the file") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError("JSON must be a list of rows (or an object holding one list of rows)")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError("JSON must be a list of rows")
    return data


def _parse_jsonl(text):
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"line {number} is not valid JSON ({err.msg}); fix that line") from None
    return rows


def _read_hub(data_id, flag="--data_path"):
    try:
        import datasets

        ds = datasets.load_dataset(data_id, split="train")
    except Exception as err:
        detail = error_detail(err)
        raise UserError(f"{flag}: '{data_id}' is not a local file and could not be loaded as a data set id "
                        f"({detail}); check the name, or the network, or download it to a file") from err
    return ds.to_list(), f"hub:{data_id}:{ds._fingerprint}"


def check_rows(rows, source):
    """Rows in Alpaca form; any row that cannot be converted stops the run (see normalise_rows).

    Row numbers in messages count from 1, in file order (a JSONL row number is its line
    number when the file has no blank lines).
    """
    clean, rejects = normalise_rows(rows, source)
    if rejects:
        problems = [f"row {number}: {reason}" for number, reason, _ in rejects]
        more = len(problems) - MAX_ROW_PROBLEMS_SHOWN
        shown = "; ".join(problems[:MAX_ROW_PROBLEMS_SHOWN]) + (f"; and {more} more rows" if more > 0 else "")
        raise UserError(f"{source}: {shown}. Every row needs non-empty text fields 'instruction' and 'output' "
                        "('input' is optional); fix or remove those rows")
    if not clean:
        raise UserError(f"{source}: no rows; the data set is empty")
    return clean


def normalise_rows(rows, source):
    """(rows in Alpaca form, rejects as (row number, reason, row)).

    Alpaca rows (instruction, input, output, optional data_source) pass through;
    conversation rows (ShareGPT 'conversations' or 'messages') and OpenOrca rows
    (system_prompt, question, response) are converted: see to_alpaca. A file none of whose
    rows has a known layout is refused as a whole, naming its columns.
    """
    if rows and all(isinstance(r, dict) for r in rows) and not any(row_layout(r) in CONVERTED for r in rows):
        for field in ("instruction", "output"):
            if all(field not in r for r in rows):
                columns = sorted({k for r in rows for k in r})
                raise UserError(f"{source}: no '{field}' column; the rows have {', '.join(columns) or 'no fields'}. "
                                "Rename the columns to instruction, input (optional) and output")
    clean, rejects = [], []
    for number, row in enumerate(rows, start=1):
        entry, reason = to_alpaca(row)
        if reason:
            rejects.append((number, reason, row))
        else:
            clean.append(entry)
    return clean, rejects


CONVERSATION_KEYS = ("conversations", "messages")
CONVERTED = ("conversation", "openorca")
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "model")


def row_layout(row):
    if not isinstance(row, dict):
        return None
    if "instruction" in row or "output" in row:
        return "alpaca"
    if any(key in row for key in CONVERSATION_KEYS):
        return "conversation"
    if "question" in row or "response" in row:
        return "openorca"
    return None


def to_alpaca(row):
    """(Alpaca row, None), or (None, the reason it cannot be one).

    OpenOrca and conversation rows take the layout of the Dolphin data that
    Dolphin-ORCA-Platypus mixed in: a system prompt is the instruction and the question
    its input; without a system prompt the question is the instruction. A conversation of
    more than one exchange has no Alpaca form and is refused rather than cut.
    """
    layout = row_layout(row)
    if layout is None:
        if not isinstance(row, dict):
            return None, f"expected an object with instruction/input/output, got {type(row).__name__}"
        return None, (f"no known fields (instruction/output, conversations or messages, question/response); "
                      f"the row has {', '.join(sorted(row)) or 'none'}")
    if layout == "conversation":
        fields, problem = _from_conversation(row)
    elif layout == "openorca":
        fields, problem = _from_openorca(row)
    else:
        fields, problem = row, None
    problem = problem or _row_problem(fields)
    if problem:
        return None, problem
    system = (fields.get("system") or "") if layout in CONVERTED else ""
    instruction, given_input = fields["instruction"], fields.get("input") or ""
    if system.strip():
        instruction, given_input = system, instruction
    entry = {"instruction": instruction, "input": given_input, "output": fields["output"]}
    if isinstance(row.get("data_source"), str):
        entry["data_source"] = row["data_source"]
    return entry, None


def _from_openorca(row):
    system = row.get("system_prompt")
    if system is not None and not isinstance(system, str):
        return None, f"'system_prompt' is {type(system).__name__}, not text"
    fields = {"instruction": row.get("question"), "output": row.get("response"), "system": system}
    for name, field in (("question", "instruction"), ("response", "output")):
        if fields[field] is None:
            return None, f"missing '{name}'"
        if not isinstance(fields[field], str):
            return None, f"'{name}' is {type(fields[field]).__name__}, not text"
        if not fields[field].strip():
            return None, f"'{name}' is blank"
    return fields, None


def _from_conversation(row):
    key = next(k for k in CONVERSATION_KEYS if k in row)
    turns = row[key]
    if not isinstance(turns, list):
        return None, f"'{key}' is {type(turns).__name__}, not a list of turns"
    system, said = "", []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            return None, f"turn {number} is {type(turn).__name__}, not an object"
        role = str(turn.get("from", turn.get("role", ""))).lower()
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            return None, f"turn {number} has no text ('value' or 'content')"
        if role == "system" and not said:
            system = text
        elif role in USER_ROLES or role in ASSISTANT_ROLES:
            said.append(("user" if role in USER_ROLES else "assistant", text))
        else:
            return None, f"turn {number} has an unknown role {role!r}"
    if [r for r, _ in said] != ["user", "assistant"]:
        exchanges = sum(1 for r, _ in said if r == "user")
        if exchanges > 1:
            return None, (f"a conversation of {exchanges} exchanges; an Alpaca row holds one question and its "
                          "answer (split the conversation first)")
        return None, "a conversation needs one user turn followed by one assistant turn"
    return {"instruction": said[0][1], "output": said[1][1], "system": system}, None


def _row_problem(row):
    for field in ("instruction", "output"):
        if field not in row or row[field] is None:
            return f"missing '{field}'"
        if not isinstance(row[field], str):
            return f"'{field}' is {type(row[field]).__name__}, not text"
        if not row[field].strip():
            return f"'{field}' is blank"
    value = row.get("input")
    if value is not None and not isinstance(value, str):
        return f"'input' is {type(value).__name__}, not text"
    return None


def split_rows(rows, val_set_size, seed):
    """Hold out val_set_size rows (an int) or that fraction of rows (a float below 1)."""
    if not val_set_size:
        return rows, []
    n_val = int(val_set_size) if val_set_size >= 1 else max(1, round(val_set_size * len(rows)))
    if n_val >= len(rows):
        raise UserError(f"--val_set_size {val_set_size}: holds out {n_val} of {len(rows)} rows, leaving none to "
                        "train on; use a smaller number or a fraction such as 0.05")
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = [rows[i] for i in sorted(order[:n_val])]
    train = [rows[i] for i in sorted(order[n_val:])]
    return train, val


def prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad id and right padding for training.

    Labels are built explicitly (padding positions get -100 in the collator, not by pad id),
    so a pad id equal to EOS cannot mask the real EOS. A distinct id is still preferred.
    """
    if tokenizer.eos_token_id is None:
        raise UserError("the base model's tokenizer has no EOS token; the model could not learn to stop. "
                        "Set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def adds_bos(tokenizer):
    """Whether the model expects BOS first (its tokenizer adds one by default)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def with_bos(ids, bos):
    """[BOS] + ids, unless the ids already start with it (a template that carries BOS text)."""
    return ids if ids[:1] == bos else bos + ids


def encode_texts(backend, texts):
    """Token ids of texts from a tokenizers.Tokenizer, without special tokens: ids only where the
    library can skip building offsets (encode_batch_fast), on all cores for the length of the call.

    The scripts set TOKENIZERS_PARALLELISM=false at start-up (a process forked after the library's
    threads ran warns and may hang); it is turned on only inside this call, which forks nothing,
    and never in a forked worker (tokenize_in_processes), whose copy of the threads is gone, nor
    where the user set it off.
    """
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    users_off = before is not None and before.lower() in ("", "off", "false", "f", "no", "n", "0") \
        and not os.environ.get(TOKENIZER_THREADS_OFF_BY_US)  # the words the tokenizers library reads as off
    if users_off or multiprocessing.parent_process() is not None:
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def splits_cleanly_after(tokenizer, boundary):
    """Whether a fast tokenizer never joins `boundary` (one character) with what follows it, so that
    tokenizer(prefix + text) == tokenizer(prefix) + the ids text gets after the boundary, for any
    prefix ending with it. Proved, not sampled, for sentencepiece-style BPE (Llama, Mistral, Yi).

    There the text is one word whose spaces are replaced character by character, and BPE joins
    two neighbours only through a merge whose result is in the vocabulary. If no token holds the
    boundary character (or its byte-fallback token) before another symbol, and no added token can
    match across it or depends on its neighbours, the two sides are merged independently. Any other
    tokenizer (byte-level BPE, Unigram, WordPiece, a pre-tokenizer that splits, a normalizer that
    looks at more than one character) answers False, and its callers tokenize prefix + text jointly.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or len(boundary) != 1:
        return False
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or any(model.get(key) for key in ("dropout", "ignore_merges",
                                                                      "continuing_subword_prefix", "end_of_word_suffix")):
        return False
    normalizer = spec.get("normalizer") or {"type": "Sequence", "normalizers": []}
    for step in normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]:
        pattern = (step.get("pattern") or {}).get("String")
        one_character = step.get("type") == "Replace" and pattern is not None and len(pattern) == 1
        # a replacement may not read the boundary character, nor write one (which could then be joined)
        if not (step.get("type") == "Prepend" or one_character and pattern != boundary
                and boundary not in (step.get("content") or "")):
            return False
    pre = spec.get("pre_tokenizer")
    if pre is not None and (pre.get("type") != "Metaspace" or pre.get("split")
                            or boundary in (" ", pre.get("replacement"))):
        return False
    added = spec.get("added_tokens") or []
    if any(token.get(flag) for token in added for flag in ("lstrip", "rstrip", "single_word")):
        return False  # these match depending on their neighbours, which may sit across the boundary
    forms = [boundary] + [f"<0x{byte:02X}>" for byte in boundary.encode()]  # the character, its fallback bytes
    tokens = list(model["vocab"]) + [token["content"] for token in added]
    return not any(form in token[:-1] for token in tokens for form in forms)


def template_heads(template):
    """The opening of each prompt form up to its last newline, longest first: the text every prompt
    of that form starts with, whatever the row."""
    import string

    heads = set()
    for key in ("prompt_input", "prompt_no_input"):
        opening = next(string.Formatter().parse(template[key]), ("",))[0] or ""
        if "\n" in opening:
            heads.add(opening[: opening.rfind("\n") + 1])
    return sorted(heads, key=len, reverse=True)


class ExampleTokenizer:
    """Tokenizes Alpaca rows into input_ids / labels with exact prompt masking.

    Layout: [BOS] prompt response [EOS]. The prompt is tokenized on its own and the
    response ids are what follows those prompt ids in the tokenization of prompt+response,
    so the prompt ids are always an exact prefix and the response keeps its natural
    tokenization. Where a tokenizer merges across the boundary (prompt ids are then no
    prefix of the joint ids), the response is tokenized on its own and appended.

    add_eos_token:
      False (Platypus default): EOS follows every response that fits in cutoff_len; a
            response cut by cutoff_len ends without EOS, since it did not end there.
      True: EOS is always the last token; a cut response loses one more token to make room.
    Either way, EOS is a label, and an example whose response is cut away entirely is
    dropped (see tokenize_rows).
    """

    def __init__(self, tokenizer, prompter, cutoff_len, train_on_inputs=False, add_eos_token=False):
        self.tokenizer = tokenizer
        self.prompter = prompter
        self.cutoff_len = cutoff_len
        self.train_on_inputs = train_on_inputs
        self.add_eos_token = add_eos_token
        self.bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        self.eos = tokenizer.eos_token_id
        self._clean_ends = {}  # a character -> whether splits_cleanly_after holds for it
        self._fixed_ids = {}  # see fixed_ids
        self.heads = template_heads(prompter.template)

    def __call__(self, batch):
        """input_ids, attention_mask, labels, n_response and truncated for each row of a column batch."""
        out = self.compact(batch)
        n_masked = out.pop("n_masked")
        out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
        out["labels"] = [[IGNORE_INDEX] * n + ids[n:] for ids, n in zip(out["input_ids"], n_masked)]
        return out

    def compact(self, batch):
        """input_ids, n_masked (leading ids whose label is IGNORE_INDEX: the prompt, or none with
        train_on_inputs), n_response and truncated for each row; the mask and labels follow from them."""
        prompts = [self.prompter.generate_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"])]
        prompt_ids = self.encode_prompts(prompts)
        responses = self.encode_after(prompts, batch["output"])
        if responses is None:  # two passes: prompt + response, and the prompt again to find the response
            responses = []
            for prompt, joint, text in zip(prompt_ids, self.encode([p + r for p, r in zip(prompts, batch["output"])]),
                                           batch["output"]):
                if joint[: len(prompt)] == prompt:
                    responses.append((joint, len(prompt)))
                else:
                    responses.append((self.encode([text])[0], 0))
        out = {"input_ids": [], "n_masked": [], "n_response": [], "truncated": []}
        for prompt, (ids, start) in zip(prompt_ids, responses):
            for key, value in zip(out, self.build(with_bos(prompt, self.bos), ids, start)):
                out[key].append(value)
        return out

    def encode(self, texts):
        """Token ids of texts without special tokens: the same ids as tokenizer(texts), and for a
        fast tokenizer straight from its Rust backend (batched over threads, no Python per text)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if self.tokenizer.is_fast else None
        if backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # an earlier tokenizer(..., truncation=True) call leaves its setting on the backend
        backend.no_truncation()
        backend.no_padding()
        return encode_texts(backend, texts)

    def encode_after(self, prompts, responses):
        """Each response's ids as they follow its prompt, in one pass over the responses alone, where
        every prompt ends with the same character and splits_cleanly_after proves that exact: a list
        of (ids, start), the response being ids[start:]. None otherwise."""
        ends = {prompt[-1:] for prompt in prompts}
        if len(ends) != 1:
            return None
        (end,) = ends
        return self.encode_following(end, responses) if self.clean(end) else None

    def encode_prompts(self, prompts):
        """The prompts' ids. Where the tokenizer splits cleanly after a newline, the template's opening
        up to its last newline (the same text at the start of every prompt of a form) is tokenized
        once, and only the rest of each prompt is."""
        ids = [None] * len(prompts)
        for head in self.heads if len(prompts) > 1 and self.clean("\n") else ():
            rows = [i for i, prompt in enumerate(prompts) if ids[i] is None and prompt.startswith(head)]
            rest = self.encode_following("\n", [prompts[i][len(head):] for i in rows]) if rows else None
            head_ids = self.fixed_ids(head) if rest else None
            for i, (tail, start) in zip(rows, rest or ()):
                tail[:start] = head_ids
                ids[i] = tail
        whole = [i for i, tail in enumerate(ids) if tail is None]
        for i, tail in zip(whole, self.encode([prompts[i] for i in whole]) if whole else ()):
            ids[i] = tail
        return ids

    def fixed_ids(self, text):
        """The ids of a text every batch needs (a template's opening, the boundary character),
        tokenized once; callers read them, never change them."""
        if text not in self._fixed_ids:
            self._fixed_ids[text] = self.encode([text])[0]
        return self._fixed_ids[text]

    def clean(self, char):
        """Whether splits_cleanly_after holds for this character (asked once per character)."""
        if char not in self._clean_ends:
            self._clean_ends[char] = self.tokenizer.is_fast and splits_cleanly_after(self.tokenizer, char)
        return self._clean_ends[char]

    def encode_following(self, char, texts):
        """(ids, start) for each text, tokenized behind `char` so that ids[start:] are the ids the
        text gets after any prefix ending with it (for a clean char); None where a row does not
        start with the char's own ids, which splits_cleanly_after rules out."""
        lead = self.fixed_ids(char)
        encoded = self.encode([char + text for text in texts])
        if any(ids[: len(lead)] != lead for ids in encoded):
            return None
        return [(ids, len(lead)) for ids in encoded]

    def build(self, prompt, ids, start):
        """(ids, n_masked, n_response, truncated) of one example, [BOS] prompt response [EOS] within
        cutoff_len, where the response is ids[start:]; ids is reused (its first `start` ids give way
        to the prompt), which spares copying every response."""
        n_response = len(ids) - start
        room = self.cutoff_len - len(prompt)
        truncated = n_response + 1 > room
        if truncated:
            n_response = max(room - 1 if self.add_eos_token else room, 0)
            del ids[start + n_response:]
        ids[:start] = prompt
        if not truncated or self.add_eos_token and n_response:
            ids.append(self.eos)
        del ids[self.cutoff_len:]
        n_masked = 0 if self.train_on_inputs else min(len(prompt), len(ids))
        return ids, n_masked, n_response, truncated


TOKENIZE_BATCH = 2000  # rows per call of the tokenizer: large enough to keep its threads busy
PROCESS_BATCH = 500  # rows per task of a tokenizing process: small enough to keep every process busy to the end
PARALLEL_ROWS = 10000  # from this many rows on, tokenize in one process per core (Linux, 2 cores or more)
_WORK = None  # (text columns, ExampleTokenizer) for the processes forked by tokenize_in_processes


def tokenize_rows(rows, example_tokenizer, num_proc=None):
    """Tokenize rows into a datasets.Dataset held in memory; drop examples with no response token left.

    Returns (dataset, stats); (None, stats) for no rows. Dropped examples are counted, never
    trained on: a batch with no trainable token gives a NaN loss. See token_chunks for how the
    work is spread.
    """
    batches, stats = [], empty_stats()
    for arrays, stats in counted(token_chunks(rows, example_tokenizer, num_proc)):
        batches.append(record_batch(arrays))
    return (tokenized_dataset(batches) if rows else None), stats


def empty_stats():
    return {"rows": 0, "kept": 0, "dropped_cut_away": 0, "truncated": 0, "tokens": 0, "label_tokens": 0,
            "max_len": 0}


def counted(chunks):
    """(arrays, stats so far) for each of token_chunks' chunks; the last stats are the whole split's."""
    stats = empty_stats()
    for arrays, counts in chunks:
        for key, value in counts.items():
            stats[key] = max(stats[key], value) if key == "max_len" else stats[key] + value
        yield arrays, stats


def token_chunks(rows, example_tokenizer, num_proc=None):
    """token_arrays of each batch of rows (TOKENIZE_BATCH, or PROCESS_BATCH in processes), in order.

    num_proc (default: default_processes) spreads the batches over processes forked from this
    one (Linux only), so the Python work around the tokenizer (reading its ids, building
    examples) runs on every core too, not only the tokenizer.
    """
    from tqdm.auto import tqdm

    if num_proc is None:
        num_proc = default_processes(len(rows))
    if num_proc > 1 and len(rows) > PROCESS_BATCH and sys.platform.startswith("linux"):
        results, size = tokenize_in_processes(rows, example_tokenizer, num_proc), PROCESS_BATCH
    else:
        results, size = (token_arrays(part) for part in tokenized_batches(rows, example_tokenizer)), TOKENIZE_BATCH
    yield from tqdm(results, total=-(-len(rows) // size), desc="Tokenizing", unit="batch", leave=False,
                    disable=len(rows) < PARALLEL_ROWS)


def default_processes(rows, sharing=1):
    """Tokenizing processes for this many rows: one per core this process may use (its CPU
    affinity: Slurm's and taskset's limits), shared among `sharing` processes that tokenize at
    the same time (the ranks of a node without a token cache), at most 8; one below
    PARALLEL_ROWS rows."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, sharing))) if rows >= PARALLEL_ROWS else 1


def tokenize_in_processes(rows, example_tokenizer, num_proc):
    """token_arrays of each batch, in order, from num_proc forked processes (the rows and the
    tokenizer are inherited, not pickled; the arrays come back as numpy). A few batches are in
    flight at a time. Where the processes cannot start or one dies (the out-of-memory killer,
    say), the rest is tokenized in this process, with a note."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from platy.cli import say

    global _WORK
    example_tokenizer.clean("\n")  # decided here once, not in every process
    _WORK = (text_columns(rows), example_tokenizer)
    starts = iter(range(0, len(rows), PROCESS_BATCH))
    done = 0  # rows whose arrays were handed on
    try:
        with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_single_threaded) as pool:
            pending = deque(pool.submit(_tokenize_batch, start) for start in itertools.islice(starts, 2 * num_proc))
            while pending:
                result = pending.popleft().result()
                following = next(starts, None)
                if following is not None:
                    pending.append(pool.submit(_tokenize_batch, following))
                yield result
                done = min(done + PROCESS_BATCH, len(rows))
    except (BrokenProcessPool, OSError, AssertionError) as err:  # AssertionError: a daemonic process may not fork
        say(f"Note: tokenizing in {num_proc} processes failed ({error_detail(err) or 'a process died'}); "
            f"tokenizing the remaining {len(rows) - done:,} rows in this process")
        yield from (token_arrays(part) for part in tokenized_batches(rows[done:], example_tokenizer))
    finally:
        _WORK = None


def _single_threaded():
    # one process per core already: the tokenizer's own threads would only compete (and a thread
    # pool the parent started does not survive the fork)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # the parent alone answers Ctrl-C and SIGTERM (the scripts' handlers would raise in here too)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _tokenize_batch(start):
    columns, example_tokenizer = _WORK
    return token_arrays(example_tokenizer.compact(column_slice(columns, start, PROCESS_BATCH)))


def token_arrays(part):
    """numpy arrays offsets, input_ids and labels (int32, flat) of a compact batch's kept examples
    (those with a response token left), and its counts for tokenize_rows' stats.

    The ids are read from Python once; the labels are the ids with each example's masked prefix
    set to IGNORE_INDEX."""

    import numpy as np

    keep = [i for i, n in enumerate(part["n_response"]) if n > 0]
    ids, n_masked = part["input_ids"], part["n_masked"]
    if len(keep) < len(ids):
        ids, n_masked = [ids[i] for i in keep], [n_masked[i] for i in keep]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    labels = flat.copy()
    for begin, n in zip(offsets[:-1].tolist(), n_masked):
        labels[begin:begin + n] = IGNORE_INDEX
    rows = len(part["input_ids"])
    counts = {"rows": rows, "kept": len(ids), "dropped_cut_away": rows - len(ids), "truncated": sum(part["truncated"]), "tokens": len(flat),
              # labels are shifted inside the model: a label at position 0 is never a target
              "label_tokens": len(flat) - sum(n_masked) - n_masked.count(0),
              "max_len": int(lengths.max(initial=0))}
    return {"offsets": offsets.astype(np.int32), "input_ids": flat, "labels": labels}, counts


def text_columns(rows):
    return {key: [row.get(key, "") for row in rows] for key in ("instruction", "input", "output")}


def column_slice(columns, start, size):
    """Rows start .. start + size of text columns, as the column batch ExampleTokenizer takes."""
    return {key: values[start:start + size] for key, values in columns.items()}


def tokenized_batches(rows, example_tokenizer):
    """example_tokenizer's compact output for each batch of TOKENIZE_BATCH rows, tokenized in this process."""
    columns = text_columns(rows)
    for start in range(0, len(rows), TOKENIZE_BATCH):
        yield example_tokenizer.compact(column_slice(columns, start, TOKENIZE_BATCH))


def token_schema():
    """The Arrow schema of tokenized data: lists of int32 ids and labels, int8 attention mask."""
    import pyarrow as pa

    return pa.schema({"input_ids": pa.list_(pa.int32()), "attention_mask": pa.list_(pa.int8()),
                      "labels": pa.list_(pa.int32())})


def record_batch(arrays):
    """token_arrays' numpy arrays as one Arrow record batch (a batch of rows stays far below 32-bit
    offsets)."""
    import numpy as np
    import pyarrow as pa

    offsets = pa.array(arrays["offsets"])
    columns = {"input_ids": arrays["input_ids"], "attention_mask": np.ones(len(arrays["input_ids"]), dtype=np.int8),
               "labels": arrays["labels"]}
    return pa.RecordBatch.from_arrays([pa.ListArray.from_arrays(offsets, pa.array(values))
                                       for values in columns.values()], schema=token_schema())


def tokenized_dataset(batches=(), table=None):
    """A datasets.Dataset of record_batch's batches (or of an Arrow table of that schema); typed, so
    an empty one is valid too. Dataset.from_dict would instead convert every id through a Python
    object and hash all the data for a fingerprint, which took as long as tokenizing."""
    import uuid

    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    if table is None:
        table = InMemoryTable(pa.Table.from_batches(list(batches), schema=token_schema()))
    features = datasets.Features({key: datasets.List(datasets.Value(str(column.type.value_type)))
                                  for key, column in zip(table.column_names, table.schema)})
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=uuid.uuid4().hex)
