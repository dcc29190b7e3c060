"""Instruction rows: read local files, data set ids and mix specs; check, convert and split them."""

import hashlib
import json
import os
import re
from pathlib import Path

from platy.cli import UserError, error_detail
from platy.files import temp_beside

FILE_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
MAX_ROW_PROBLEMS_SHOWN = 3


HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def looks_like_local_path(spec):
    """A data set id is 'name' or 'owner/name'. A file suffix, or a first component that is a
    local folder (data/rows.jsn), means a file that is missing, not an id to download."""
    first = spec.split("/", 1)[0]
    return (
        not HUB_ID.match(spec) or bool(re.search(r"\.[A-Za-z]{2,8}$", spec)) or ("/" in spec and Path(first).is_dir())
    )


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
        raise UserError(
            f"{flag}: file not found: {data_path}; give an existing JSON, JSONL, CSV or Parquet file or a data set id"
        )
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
        raise UserError(
            f"{flag} {spec}: " + "; ".join(problems) + ". A mix spec reads "
            "'file:fraction,file:fraction', e.g. 'open_platypus.json:1.0,dolphin.jsonl:0.01'"
        )
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
    """Rows of a JSON, JSONL, CSV or Parquet file, and the sha256 of its bytes: the rows are parsed from
    the very bytes that were hashed (a file replaced meanwhile cannot give rows of another fingerprint);
    JSON Lines are parsed line by line as they are read, so the file's text is never held whole."""
    if path.is_dir():
        raise UserError(f"{flag}: {path} is a folder; give a JSON, JSONL, CSV or Parquet file")
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{flag}: {path}: unsupported file type '{path.suffix}'; use .json, .jsonl, .csv or .parquet")
    try:
        if kind == "jsonl":
            rows, digest = _stream_jsonl(path)
            return rows, "sha256:" + digest
        raw = path.read_bytes()
    except UserError as err:
        raise UserError(f"{flag}: {path}: {err}") from err
    except OSError as err:
        raise UserError(f"{flag}: cannot read {path}: {err.strerror}; check the path and permissions") from err
    fingerprint = "sha256:" + hashlib.sha256(raw).hexdigest()
    try:
        if kind == "json":
            rows = _parse_json(raw.decode("utf-8"))
        elif kind == "csv":
            import io

            import pandas as pd

            # keep_default_na=False: an empty cell is an empty string, not NaN
            rows = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False).to_dict("records")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            # Python lists and dicts, as JSON gives them (pandas would give a conversation column's
            # turns as numpy arrays)
            rows = pq.read_table(pa.BufferReader(raw)).to_pylist()
    except UserError as err:
        raise UserError(f"{flag}: {path}: {err}") from err
    except Exception as err:  # any parser failure is a file the user must fix
        detail = error_detail(err)
        raise UserError(f"{flag}: {path} is not valid {kind.upper()} ({detail}); fix or convert the file") from err
    return rows, fingerprint


def read_prompts(path, flag):
    """Prompt rows (instruction, optional input; or a conversation ending with the user turn to answer,
    kept as `messages`) of a file, with their other columns kept.

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
    if all(isinstance(r, dict) and "instruction" not in r and not any(k in r for k in CONVERSATION_KEYS) for r in rows):
        columns = sorted({k for r in rows if isinstance(r, dict) for k in r})
        raise UserError(
            f"{flag}: {path}: no 'instruction' column; the rows have {', '.join(columns) or 'no fields'}. "
            "Name the question column instruction (and an optional one input), or give messages rows"
        )
    for number, row in enumerate(rows, start=1):
        if isinstance(row, dict) and "instruction" not in row and any(k in row for k in CONVERSATION_KEYS):
            messages, problem = conversation_messages(row, to_answer=True)
            if problem:
                raise UserError(f"{flag}: {path}: row {number}: {problem}")
            rows[number - 1] = {**{k: v for k, v in row.items() if k not in CONVERSATION_KEYS}, "messages": messages}
            continue
        value = row.get("instruction") if isinstance(row, dict) else row
        if not isinstance(value, str):
            raise UserError(f"{flag}: {path}: row {number}: 'instruction' is {type(value).__name__}, not text")
        if not value.strip():
            raise UserError(f"{flag}: {path}: row {number}: 'instruction' is blank")
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise UserError(f"{flag}: {path}: row {number}: 'input' is {type(row['input']).__name__}, not text")
    return rows, FILE_FORMATS[path.suffix.lower()]


def write_rows(path, rows, kind):
    """Write rows as JSON, JSONL, CSV or Parquet through a temporary file of its own and a rename."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
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
    finally:
        tmp.unlink(missing_ok=True)


def _parse_json(text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # a .json file holding JSON Lines is common (and what many exporters write)
        try:
            return _parse_jsonl(text.splitlines())
        except UserError:
            raise UserError(
                f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); fix the file"
            ) from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError("JSON must be a list of rows (or an object holding one list of rows)")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError("JSON must be a list of rows")
    return data


def _parse_jsonl(lines):
    """The rows of JSON Lines: lines of text, or of UTF-8 bytes."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8") if isinstance(line, bytes) else line))
        except UnicodeDecodeError:
            raise UserError(f"line {number} is not UTF-8 text; save the file as UTF-8") from None
        except json.JSONDecodeError as err:
            raise UserError(f"line {number} is not valid JSON ({err.msg}); fix that line") from None
    return rows


def _stream_jsonl(path):
    """(rows, sha256 hex) of a JSON Lines file read line by line, each line hashed and parsed as it comes."""
    digest = hashlib.sha256()

    def hashed(file):
        for line in file:
            digest.update(line)
            yield line

    with open(path, "rb") as file:
        rows = _parse_jsonl(hashed(file))
    return rows, digest.hexdigest()


def _read_hub(data_id, flag="--data_path"):
    try:
        import datasets

        ds = datasets.load_dataset(data_id, split="train")
    except Exception as err:
        detail = error_detail(err)
        raise UserError(
            f"{flag}: '{data_id}' is not a local file and could not be loaded as a data set id "
            f"({detail}); check the name, or the network, or download it to a file"
        ) from err
    return ds.to_list(), f"hub:{data_id}:{ds._fingerprint}"


def check_rows(rows, source):
    """Rows in Alpaca form; any row that cannot be converted stops the run (see normalise_rows).

    Row numbers in messages count from 1, in file order (a JSONL row number is its line
    number when the file has no blank lines).
    """
    clean, rejects = normalise_rows(rows, source)
    if rejects:
        problems = [f"row {number}: {reason}" for number, reason, _ in rejects]
        raise UserError(
            f"{source}: {first_problems(problems)}. Every row needs non-empty text fields 'instruction' and 'output' "
            "('input' is optional), or a 'messages' / 'conversations' list whose user and assistant turns "
            "alternate after an optional system message and end with an assistant turn; fix or remove those rows"
        )
    if not clean:
        raise UserError(f"{source}: no rows; the data set is empty")
    return clean


def first_problems(problems, more="more rows"):
    """The first MAX_ROW_PROBLEMS_SHOWN problems joined by '; ', and how many more there are."""
    left = len(problems) - MAX_ROW_PROBLEMS_SHOWN
    return "; ".join(problems[:MAX_ROW_PROBLEMS_SHOWN]) + (f"; and {left} {more}" if left > 0 else "")


def normalise_rows(rows, source):
    """(rows in Alpaca form, rejects as (row number, reason, row)).

    Alpaca rows (instruction, input, output, optional data_source) pass through;
    conversation rows (ShareGPT 'conversations' or 'messages') and OpenOrca rows
    (system_prompt, question, response) are converted: see to_alpaca. A file none of whose
    rows has a known layout is refused as a whole, naming its columns.
    """
    if rows and all(isinstance(r, dict) for r in rows) and all(row_layout(r) == "openorca" for r in rows):
        if all("response" not in r for r in rows):  # question + another column: no OpenOrca file either
            columns = sorted({k for r in rows for k in r})
            raise UserError(
                f"{source}: the rows have {', '.join(columns)}: neither Alpaca (instruction, input, output) "
                "nor OpenOrca (question and response). Rename the columns, e.g. question -> instruction and "
                "the answer column -> output"
            )
    if rows and all(isinstance(r, dict) for r in rows) and not any(row_layout(r) in CONVERTED for r in rows):
        for field in ("instruction", "output"):
            if all(field not in r for r in rows):
                columns = sorted({k for r in rows for k in r})
                raise UserError(
                    f"{source}: no '{field}' column; the rows have {', '.join(columns) or 'no fields'}. "
                    "Rename the columns to instruction, input (optional) and output"
                )
    clean, rejects = [], []
    for number, row in enumerate(rows, start=1):
        entry, reason = to_row(row)
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
        return None, (
            f"no known fields (instruction/output, conversations or messages, question/response); "
            f"the row has {', '.join(sorted(row)) or 'none'}"
        )
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
    instruction, given_input = dolphin_layout(system, fields["instruction"], fields.get("input") or "")
    entry = {"instruction": instruction, "input": given_input, "output": fields["output"]}
    if isinstance(row.get("data_source"), str):
        entry["data_source"] = row["data_source"]
    return entry, None


def dolphin_layout(system, question, given_input=""):
    """(instruction, input) as the Dolphin data lays out a system prompt and a question: the system
    prompt is the instruction and the question its input; without one, the question and its input."""
    if system and system.strip():
        return system, question
    return question, given_input


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


def conversation_turns(row):
    """([(role, text)] with roles system/user/assistant, None), or (None, the reason the turns are unusable)."""
    key = next(k for k in CONVERSATION_KEYS if k in row)
    turns = row[key]
    if not isinstance(turns, list):
        return None, f"'{key}' is {type(turns).__name__}, not a list of turns"
    said = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            return None, f"turn {number} is {type(turn).__name__}, not an object"
        role = str(turn.get("from", turn.get("role", ""))).lower()
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            return None, f"turn {number} has no text ('value' or 'content')"
        if role == "system" and not said:
            said.append(("system", text))
        elif role in USER_ROLES or role in ASSISTANT_ROLES:
            said.append(("user" if role in USER_ROLES else "assistant", text))
        else:
            return None, f"turn {number} has an unknown role {role!r}"
    return said, None


def conversation_messages(row, to_answer=False):
    """(messages, None): the turns as [{'role', 'content'}], an optional system message first, then user
    and assistant turns alternating, ending with an assistant turn (to_answer: with the user turn a prompt
    asks to answer); or (None, the reason it is not one)."""
    said, problem = conversation_turns(row)
    if problem:
        return None, problem
    first = 1 if said[:1] and said[0][0] == "system" else 0
    for number, (role, text) in enumerate(said, start=1):
        if not text.strip():
            return None, f"turn {number} ({role}) is blank"
        expected = "user" if (number - 1 - first) % 2 == 0 else "assistant"
        if number > first and role != expected:
            return None, (
                f"turn {number} is {article(role)} {role} turn where {article(expected)} {expected} "
                "turn must come (after an optional system message, user and assistant turns alternate)"
            )
    if len(said) == first:
        return None, "no user or assistant turns"
    if to_answer and said[-1][0] != "user":
        return None, "the conversation must end with the user turn to answer"
    if not to_answer and said[-1][0] != "assistant":
        return None, "the conversation ends with a user turn; it must end with an assistant turn to learn from"
    return [{"role": role, "content": text} for role, text in said], None


def article(word):
    return "an" if word[:1] in "aeiou" else "a"


def _from_conversation(row):
    said, problem = conversation_turns(row)
    if problem:
        return None, problem
    system = said[0][1] if said[:1] and said[0][0] == "system" else ""
    said = [turn for turn in said if turn[0] != "system"]
    if [r for r, _ in said] != ["user", "assistant"]:
        exchanges = sum(1 for r, _ in said if r == "user")
        if exchanges > 1:
            return None, (
                f"a conversation of {exchanges} exchanges; an Alpaca row holds one question and its "
                "answer (split the conversation first)"
            )
        return None, "a conversation needs one user turn followed by one assistant turn"
    return {"instruction": said[0][1], "output": said[1][1], "system": system}, None


def to_row(row):
    """(training row, None), or (None, the reason the row is unusable).

    A conversation keeps its turns as 'messages' (see conversation_messages); one of a single
    exchange also carries its Alpaca fields (to_alpaca), which the Alpaca templates use, so that
    it trains as it always did. Alpaca and OpenOrca rows are their Alpaca form.
    """
    if row_layout(row) != "conversation":
        return to_alpaca(row)
    messages, problem = conversation_messages(row)
    if problem:
        return None, problem
    entry = {}
    if sum(m["role"] == "user" for m in messages) == 1:
        entry, _ = to_alpaca(row)
    entry["messages"] = messages
    if isinstance(row.get("data_source"), str):
        entry["data_source"] = row["data_source"]
    return entry, None


def row_messages(row):
    """A training row as a conversation: its messages, or an Alpaca row's instruction (and input,
    after a blank line) as the user turn and its output as the assistant turn."""
    if "messages" in row:
        return row["messages"]
    question = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}]


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
        raise UserError(
            f"--val_set_size {val_set_size}: holds out {n_val} of {len(rows)} rows, leaving none to "
            "train on; use a smaller number or a fraction such as 0.05"
        )
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = [rows[i] for i in sorted(order[:n_val])]
    train = [rows[i] for i in sorted(order[n_val:])]
    return train, val
