"""One refine.py run: the flag check, the resolve step, the stages in the order they run, the report.

The algorithms the stages use (duplicates, similarity search, embeddings, token lengths) are in
platy.refining; the row formats and the mix in platy.data.rows.
"""

import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from platy import checks
from platy.cli import UserError, say
from platy.data.examples import prepare_tokenizer
from platy.data.pairs import ANSWERS, check_pairs, is_pair_row, sft_row, to_pair
from platy.data.rows import (
    FILE_FORMATS,
    normalise_rows,
    origin_name,
    parse_mix,
    read_source,
    row_layout,
    take_share,
    write_rows,
)
from platy.files import write_json
from platy.refining import (
    BUNDLED_NAMES,
    benchmark_question,
    embed_texts,
    exact_duplicates,
    length_distribution,
    most_similar,
    near_duplicates,
    resolve_embedding_model,
    row_text,
    token_lengths,
    user_turns,
)
from platy.reporting import library_versions, say_configuration

# per data_source counts: rows read, dropped by each stage, kept
SOURCE_COLUMNS = {
    "read": "read",
    "normalise": "rejected",
    "mix": "not sampled",
    "exact_dedup": "exact dups",
    "near_dedup": "near dups",
    "decontaminate": "contaminated",
    "kept": "kept",
}
CONVERTED_NAMES = {"conversation": "a conversation row", "openorca": "an OpenOrca row"}
# a preference pair as a row: its prompt's fields, which the stages compare, and these two
PAIR = "_pair"  # the pair as platy/data/pairs.py reads it (prompt, chosen, rejected)
AS_READ = "_as_read"  # the row as read, which is what the refined file holds
OPTIONAL_FIELDS = ("input", "data_source")
SHOWN_MATCHES = 10  # contaminated rows printed on the terminal; the report lists them all
# similarities of identical texts can come out a hair under 1.0 in float32
SCORE_TOLERANCE = 1e-6


def check_flags(flags):
    """Every problem of refine.py's flags, as sentences; reads no file; it only asks the file system whether
    --output_path is a folder and where the three output paths lead, so those problems come with the others."""
    f = SimpleNamespace(**flags)
    problems = []
    if bool(f.data_path) == bool(f.mix):
        problems.append(
            "give the data in --data_path or in --mix (a spec like 'a.json:1.0,b.jsonl:0.01'), not both"
            if f.data_path
            else "--data_path or --mix is required"
        )
    output, report_path, rejects_path = output_files(flags)
    if not f.output_path:
        problems.append("--output_path is required (a .json, .jsonl, .csv or .parquet file)")
    elif output.suffix.lower() not in FILE_FORMATS:
        problems.append(
            f"--output_path {f.output_path}: unsupported file type '{output.suffix}'; "
            "use .json, .jsonl, .csv or .parquet"
        )
    elif output.is_dir():
        problems.append(f"--output_path {f.output_path} is a folder; give a file name")
    problems += checks.problems_of(
        checks.number_in("near_dedup_threshold", f.near_dedup_threshold, 0, 1),
        checks.number_in("decontaminate_threshold", f.decontaminate_threshold, 0, 1),
        checks.positive_int("embedding_batch_size", f.embedding_batch_size),
        checks.integer("seed", f.seed),
    )
    if f.trust_embedding_model and f.embedding_model in BUNDLED_NAMES:
        problems.append("--trust_embedding_model vouches for an --embedding_model folder: give that folder too")
    if f.test_files and not f.decontaminate:
        problems.append("--test_files is given but --decontaminate is False; drop one of them")
    if f.prompt_template_name != "alpaca" and not f.tokenizer:
        problems.append("--prompt_template_name only shapes the token lengths: give --tokenizer too")
    if (f.report_path or f.output_path) and report_path.suffix.lower() != ".json":
        problems.append(f"--report_path {report_path}: give a .json file")
    if (f.rejects_path or f.output_path) and rejects_path.suffix.lower() != ".jsonl":
        problems.append(f"--rejects_path {rejects_path}: give a .jsonl file")
    if f.output_path and len({output.resolve(), report_path.resolve(), rejects_path.resolve()}) < 3:
        problems.append("--output_path, --report_path and --rejects_path must be three different files")
    return problems


def output_files(flags):
    """(refined data, report, rejects) paths; the last two default to names beside the first."""
    output = Path(str(flags["output_path"])).expanduser()
    named = output.name != ""  # without --output_path there is no name to put the others beside
    report_path = flags["report_path"] or (output.with_name(output.stem + ".report.json") if named else "")
    rejects_path = flags["rejects_path"] or (output.with_name(output.stem + ".rejects.jsonl") if named else "")
    return output, Path(str(report_path)).expanduser(), Path(str(rejects_path)).expanduser()


@dataclass(frozen=True)
class RefineRun:
    """One refine.py run: the flags as given and what was resolved from them."""

    flags: dict
    sources: list  # [(source, fraction)] of --data_path or --mix
    input_flag: str  # --data_path or --mix, for messages about the sources
    output: Path
    report_file: Path
    rejects_file: Path
    test_items: list  # [{file, row, text}] of the test questions
    embedding_model_path: str | None  # None: no stage needs embeddings
    cache_root: Path | None
    length_tokenizer: object  # None without --tokenizer
    prompter: object
    normalise: bool
    exact_dedup: bool
    near_dedup: bool
    decontaminate: bool
    near_dedup_threshold: float
    decontaminate_threshold: float
    seed: int
    embedding_model: str
    embedding_batch_size: int
    tokenizer: str
    prompt_template_name: str


def resolve(flags):
    """The RefineRun of checked flags: sources parsed, test questions read, models found."""
    input_flag = "--mix" if flags["mix"] else "--data_path"
    sources = parse_mix(flags["mix"] or flags["data_path"], input_flag)
    output, report_file, rejects_file = output_files(flags)
    test_items = read_test_questions(flags["test_files"]) if flags["decontaminate"] and flags["test_files"] else []
    needs_embeddings = flags["near_dedup"] or bool(test_items)
    embedding_model_path = (
        resolve_embedding_model(flags["embedding_model"], trusted=flags["trust_embedding_model"])
        if needs_embeddings
        else None
    )
    cache_root = resolve_cache_dir(flags["cache_dir"])
    length_tokenizer, prompter = load_length_tokenizer(flags["tokenizer"], flags["prompt_template_name"])
    return RefineRun(
        flags=flags,
        sources=sources,
        input_flag=input_flag,
        output=output,
        report_file=report_file,
        rejects_file=rejects_file,
        test_items=test_items,
        embedding_model_path=embedding_model_path,
        cache_root=cache_root,
        length_tokenizer=length_tokenizer,
        prompter=prompter,
        **{name: flags[name] for name in FLAGS_USED},
    )


FLAGS_USED = (
    "normalise",
    "exact_dedup",
    "near_dedup",
    "decontaminate",
    "near_dedup_threshold",
    "decontaminate_threshold",
    "seed",
    "embedding_model",
    "embedding_batch_size",
    "tokenizer",
    "prompt_template_name",
)


def read_test_questions(test_files):
    """[{file, row, text}] of every test file; a row without a question stops the run."""
    items = []
    for name in (part.strip() for part in str(test_files).split(",")):
        if not name:
            raise UserError(f"--test_files {test_files}: an empty entry; separate files with single commas")
        rows, _ = read_source(name, "--test_files")
        missing = []
        for number, row in enumerate(rows, start=1):
            text = benchmark_question(row)
            if text is None:
                missing.append(number)
            else:
                items.append({"file": name, "row": number, "text": text})
        if missing or not rows:
            first = rows[missing[0] - 1] if missing else None
            fields = ", ".join(sorted(first)) if isinstance(first, dict) else type(first).__name__
            where = f"row {missing[0]} (and {len(missing) - 1} more) has" if missing else "no rows; it has"
            raise UserError(
                f"--test_files {name}: {where} no question ({fields}); a test row needs an "
                "instruction, question, prompt, problem, query or text field"
            )
    return items


def resolve_cache_dir(cache_dir):
    if str(cache_dir).lower() == "none":
        return None
    if cache_dir:
        return Path(str(cache_dir)).expanduser()
    from platy.files import cache_root

    return cache_root() / "embeddings"


def load_length_tokenizer(name, template):
    if not name:
        return None, None
    from platy.base_weights import resolve_base_model
    from platy.modeling import load_tokenizer
    from platy.prompts import Prompter

    prompter = Prompter(template, "--prompt_template_name")
    folder = resolve_base_model(name, "--tokenizer", weights=False)  # its tokenizer only: weights unread
    return prepare_tokenizer(load_tokenizer(folder, flag="--tokenizer")), prompter


def describe_run(run):
    """The resolved configuration, printed once; the report starts from it."""
    flags = run.flags
    resolved = {
        "sources": run.sources,
        "embedding_model_folder": run.embedding_model_path,
        "embedding_cache": str(run.cache_root) if run.cache_root else None,
        "report_file": str(run.report_file),
        "rejects_file": str(run.rejects_file),
    }
    say_configuration("Refine configuration", {**flags, **resolved})
    return {
        "config": {"flags": flags, "resolved": resolved},
        "inputs": [],
        "stages": [],
        "data_sources": defaultdict(Counter),
        "warnings": [],
        "versions": library_versions(),
    }


# ---- stages --------------------------------------------------------------------------


def read_and_normalise(run, report):
    """[(source, fraction, rows)]: every source's rows in Alpaca form, or its preference pairs (see
    pairs_as_rows), each knowing its place ('file row N'); rejects kept aside."""
    started = time.time()
    groups, rejects, kinds = [], [], []
    for source, fraction in run.sources:
        raw, fingerprint = read_source(source, run.input_flag)
        is_pairs = holds_pairs(raw, source)
        kinds.append((source, is_pairs))
        if is_pairs:
            clean, bad = pairs_as_rows(raw)
            if bad and not run.normalise:
                check_pairs(raw, source)  # stops the run, naming the rows that are no valid pair
        else:
            clean, bad = normalise_rows(raw, source)
            if not run.normalise:
                refuse_non_alpaca(raw, bad, source)
        rejected = {number for number, _, _ in bad}
        numbers = [n for n in range(1, len(raw) + 1) if n not in rejected]
        name = origin_name(source)
        for number, row in zip(numbers, clean):
            row["_at"] = f"{source} row {number}"
            row.setdefault("data_source", name)
        for number, reason, row in bad:
            origin = row.get("data_source") if isinstance(row, dict) else None
            rejects.append(
                {"file": source, "row": number, "reason": reason, "data_source": origin or name, "data": row}
            )
        report["inputs"].append(
            {
                "source": source,
                "fraction": fraction,
                "fingerprint": fingerprint,
                "rows_read": len(raw),
                "rejected": len(bad),
            }
        )
        groups.append((source, fraction, clean))
    report["unit"] = "pair" if one_kind(kinds, run.input_flag) else "row"
    report["rejects"] = rejects
    rows = [row for _, _, clean in groups for row in clean]
    check_pairs_fit_output(run, rows)
    for row in rows + rejects:
        report["data_sources"][row["data_source"]]["read"] += 1
    read = sum(item["rows_read"] for item in report["inputs"])
    converted = "converted and checked" if run.normalise else "checked (--normalise False)"
    if report["unit"] == "pair":  # pairs are never converted: they are written as read
        converted = "checked as preference pairs" + ("" if run.normalise else " (--normalise False)")
    record(
        report,
        "normalise",
        read,
        rows,
        rejects,
        time.time() - started,
        note=f"{converted}; {len(rejects)} set aside in {run.rejects_file.name}",
    )
    require_rows(
        rows,
        "normalise",
        "every row was set aside; see the reasons in the rejects file "
        "(nothing is written on error: rerun with fixed data)",
    )
    return groups


def holds_pairs(raw, source):
    """Whether a source holds preference pairs rather than supervised rows; a file of both stops the run."""
    pair = next((n for n, row in enumerate(raw, start=1) if is_pair_row(row)), None)
    if pair is None:
        return False
    # a row of neither kind (no known fields, not an object) is a bad pair: set aside with its reason
    other = next((n for n, row in enumerate(raw, start=1) if not is_pair_row(row) and row_layout(row)), None)
    if other is not None:
        raise UserError(
            f"{source}: row {pair} is a preference pair (chosen, rejected) and row {other} a supervised row "
            f"({', '.join(sorted(raw[other - 1]))}); put pairs and supervised rows in files of their own and "
            "refine each"
        )
    return True


def one_kind(kinds, flag):
    """Whether the sources ([(source, holds pairs)]) hold preference pairs; pairs and supervised rows are
    trained by different stages of finetune.py, so one refined file never mixes them."""
    pairs = [source for source, is_pairs in kinds if is_pairs]
    rows = [source for source, is_pairs in kinds if not is_pairs]
    if pairs and rows:
        raise UserError(
            f"{flag}: {pairs[0]} holds preference pairs and {rows[0]} supervised rows; refine each kind on its own"
        )
    return bool(pairs)


def pairs_as_rows(raw):
    """(pairs, rejects as (row number, reason, row)), as normalise_rows gives rows: each pair is its prompt's
    fields (instruction and input, or messages), which every stage compares as a row's, with the pair and the
    row as read under PAIR and AS_READ. A row that is no valid pair is set aside with the reason."""
    clean, bad = [], []
    for number, row in enumerate(raw, start=1):
        pair, reason = to_pair(row)
        if reason:
            bad.append((number, reason, row))
            continue
        entry = {**pair["prompt"], PAIR: pair, AS_READ: row}
        if isinstance(row.get("data_source"), str):
            entry["data_source"] = row["data_source"]
        clean.append(entry)
    return clean, bad


def check_pairs_fit_output(run, rows):
    """Pairs bound for a CSV or Parquet file, checked before any work: a table gives every row every column and
    one kind of value per column (pairs of several layouts would read back as none), and CSV holds text only
    (turns would be written as Python text that no reader takes back)."""
    kind = FILE_FORMATS[run.output.suffix.lower()]
    if kind in ("json", "jsonl") or not rows or PAIR not in rows[0]:
        return

    def shape(row):  # each field's kind of value; input and data_source may be missing (read back as empty)
        return {key: type(value).__name__ for key, value in row[AS_READ].items() if key not in OPTIONAL_FIELDS}

    first = shape(rows[0])
    for row in rows:
        fields = shape(row)
        turns = [key for key, value in fields.items() if value in ("list", "dict")]
        if kind == "csv" and turns:
            raise UserError(
                f"--output_path {run.output}: {row['_at']} holds turns in '{turns[0]}', and a CSV file holds text "
                "only; write a .json, .jsonl or .parquet file"
            )
        if fields != first:
            raise UserError(
                f"--output_path {run.output}: {row['_at']} is laid out unlike {rows[0]['_at']} "
                f"({', '.join(sorted(row[AS_READ]))} against {', '.join(sorted(rows[0][AS_READ]))}), and a "
                f"{kind.upper()} table gives every row the same columns; write a .json or .jsonl file"
            )


def refuse_non_alpaca(raw, bad, source):
    """--normalise False: rows are used as they are, so each must already be a valid Alpaca row."""
    problems = [(number, reason) for number, reason, _ in bad]
    problems += [
        (n, CONVERTED_NAMES[row_layout(row)])
        for n, row in enumerate(raw, start=1)
        if row_layout(row) in CONVERTED_NAMES
    ]
    if problems:
        shown = "; ".join(f"row {n}: {what}" for n, what in sorted(problems)[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(
            f"{source}: {shown}{more}. --normalise False takes Alpaca rows as they are; drop it "
            "to convert such rows or set them aside"
        )


def mix_sources(run, groups, report):
    started = time.time()
    rows, kept, dropped = [], [], []
    for source, fraction, clean in groups:
        share = take_share(clean, source, fraction, run.seed)  # the rows themselves: data_source is set
        taken = {id(row) for row in share}
        rows += clean
        kept += share
        dropped += [row for row in clean if id(row) not in taken]
    if not any(fraction < 1 for _, fraction, _ in groups):
        record(report, "mix", len(rows), kept, [], 0, skipped="every source taken whole")
        return kept
    shares = ", ".join(f"{origin_name(s)} {f:g}" for s, f in run.sources)
    record(report, "mix", len(rows), kept, dropped, time.time() - started, note=f"seed {run.seed}: {shares}")
    return require_rows(kept, "mix", "raise the fractions")


def drop_exact_duplicates(run, rows, report):
    if not run.exact_dedup:
        record(report, "exact_dedup", len(rows), rows, [], 0, skipped="--exact_dedup False")
        return rows
    started = time.time()
    pairs = report["unit"] == "pair"
    kept, matches = exact_duplicates(rows, longest=not pairs)
    report["exact_duplicates"] = [{"dropped": rows[i]["_at"], "kept": rows[j]["_at"]} for i, j in matches]
    record(
        report,
        "exact_dedup",
        len(rows),
        kept,
        [rows[i] for i, _ in matches],
        time.time() - started,
        note="kept the first pair of each prompt" if pairs else "kept the longest output of each instruction + input",
    )
    return [rows[i] for i in kept]


def embed_rows(run, rows, report):
    """Embeddings of every row's instruction + input, when a later stage needs them."""
    if not run.embedding_model_path:
        return None
    started = time.time()
    texts = [row_text(row) for row in rows]
    embeddings, counts = embed_texts(
        texts, run.embedding_model_path, run.cache_root, run.embedding_batch_size, run.embedding_model
    )
    report["embedding"] = {"model": run.embedding_model, "seconds": round(time.time() - started, 2), **counts}
    warn_about_language(run, texts, report)
    return embeddings


def warn_about_language(run, texts, report):
    """all-MiniLM-L6-v2 is an English model: different Korean questions score 0.50 to 0.82 with
    it, so Platypus's thresholds would drop rows that should stay."""
    if run.embedding_model not in BUNDLED_NAMES:
        return
    non_latin = sum(1 for text in texts if mostly_non_latin(text))
    if non_latin >= max(1, 0.1 * len(texts)):
        message = (
            f"{non_latin} of {len(texts)} rows are mostly in a non-Latin script, which all-MiniLM-L6-v2 "
            "(an English model) tells apart poorly: different questions often score above 0.7. Check the "
            "dropped rows in the report, raise the thresholds, or give --embedding_model a multilingual "
            "sentence-transformers model folder"
        )
        report["warnings"].append(message)


def mostly_non_latin(text):
    letters = [ch for ch in text if ch.isalpha()]
    return (
        bool(letters)
        and sum(1 for ch in letters if not unicodedata.name(ch, "").startswith("LATIN")) > len(letters) / 2
    )


def drop_near_duplicates(run, rows, embeddings, report):
    if not run.near_dedup:
        record(report, "near_dedup", len(rows), rows, [], 0, skipped="--near_dedup False")
        return rows, embeddings
    started = time.time()
    keep, matched, score = near_duplicates(embeddings, run.near_dedup_threshold, progress="Near dedup")
    dropped = np.flatnonzero(~keep)
    report["near_duplicates"] = [
        {
            "dropped": rows[i]["_at"],
            "instruction": row_text(rows[i])[:200],
            "kept": rows[matched[i]]["_at"],
            "kept_instruction": row_text(rows[matched[i]])[:200],
            "score": round(float(score[i]), 4),
        }
        for i in dropped
    ]
    kept = [row for row, k in zip(rows, keep) if k]
    record(
        report,
        "near_dedup",
        len(rows),
        kept,
        [rows[i] for i in dropped],
        time.time() - started,
        note=f"similarity to a kept row above {run.near_dedup_threshold}",
    )
    return require_rows(kept, "near_dedup", "raise --near_dedup_threshold"), embeddings[keep]


def drop_contaminated(run, rows, embeddings, report):
    if not run.decontaminate or not run.test_items:
        reason = "--decontaminate False" if not run.decontaminate else "no --test_files"
        record(report, "decontaminate", len(rows), rows, [], 0, skipped=reason)
        return rows
    started = time.time()
    tests, counts = embed_texts(
        [item["text"] for item in run.test_items],
        run.embedding_model_path,
        run.cache_root,
        run.embedding_batch_size,
        run.embedding_model,
    )
    report["test_embedding"] = counts
    best, at = most_similar(embeddings, tests, progress="Decontaminating")
    # a conversation of several exchanges: each user turn is also compared on its own, so a test question
    # asked in its third turn is not diluted by the others
    several = [(i, user_turns(row)) for i, row in enumerate(rows) if "instruction" not in row]
    turns = [(i, text) for i, asked in several if len(asked) > 1 for text in asked]
    if turns:
        vectors, _ = embed_texts(
            [text for _, text in turns],
            run.embedding_model_path,
            run.cache_root,
            run.embedding_batch_size,
            run.embedding_model,
        )
        for (i, _), score, test in zip(turns, *most_similar(vectors, tests)):
            if score > best[i]:
                best[i], at[i] = score, test
    hits = best >= run.decontaminate_threshold - SCORE_TOLERANCE
    dropped = np.flatnonzero(hits)
    report["contaminated"] = [
        {
            "dropped": rows[i]["_at"],
            "instruction": rows[i].get("instruction", row_text(rows[i])),
            "input": rows[i].get("input", ""),
            "data_source": rows[i].get("data_source"),
            "test_file": run.test_items[at[i]]["file"],
            "test_row": run.test_items[at[i]]["row"],
            "test_item": run.test_items[at[i]]["text"],
            "score": round(float(best[i]), 4),
        }
        for i in dropped
    ]
    kept = [row for row, hit in zip(rows, hits) if not hit]
    record(
        report,
        "decontaminate",
        len(rows),
        kept,
        [rows[i] for i in dropped],
        time.time() - started,
        note=f"similarity to one of {len(tests)} test questions at least {run.decontaminate_threshold}",
    )
    return require_rows(kept, "decontaminate", "check --test_files, or raise --decontaminate_threshold")


def measure_lengths(run, rows, report):
    if run.length_tokenizer is None:
        return
    if report["unit"] == "pair":  # the preference stage renders the prompt with each answer
        rows = [sft_row(row[PAIR]["prompt"], row[PAIR][key]) for row in rows for key in ANSWERS]
    lengths = token_lengths(rows, run.length_tokenizer, run.prompter)
    report["token_lengths"] = {
        "tokenizer": run.tokenizer,
        "template": run.prompt_template_name,
        **length_distribution(lengths),
    }


def record(report, stage, rows_in, kept, dropped_rows, seconds, **extra):
    """One stage's line of the report; dropped rows are counted under their data_source."""
    report["stages"].append(
        {
            "stage": stage,
            "rows_in": rows_in,
            "dropped": len(dropped_rows),
            "rows_out": len(kept),
            "seconds": round(seconds, 3),
            **extra,
        }
    )
    for row in dropped_rows:
        report["data_sources"][row.get("data_source", "")][stage] += 1


def require_rows(rows, stage, fix):
    if not rows:
        raise UserError(f"no rows left after {stage}; {fix}. Nothing was written")
    return rows


# ---- outputs -------------------------------------------------------------------------


def save(run, rows, report):
    """Rejects and report first, the refined data last; each goes through a temporary file."""
    for row in rows:
        report["data_sources"][row.get("data_source", "")]["kept"] += 1
    report["outputs"] = {
        "data": str(run.output),
        "rows": len(rows),
        "report": str(run.report_file),
        "rejects": str(run.rejects_file),
    }
    report["data_sources"] = {name: dict(counts) for name, counts in sorted(report["data_sources"].items())}
    run.output.parent.mkdir(parents=True, exist_ok=True)
    write_rows(run.rejects_file, report.pop("rejects"), "jsonl")
    report["rejected_rows"] = report["stages"][0]["dropped"]
    write_json(run.report_file, report)
    clean = [saved_row(row) for row in rows]
    write_rows(run.output, clean, FILE_FORMATS[run.output.suffix.lower()])


def saved_row(row):
    """What the refined file holds of a row: its Alpaca fields, a conversation of several exchanges as
    messages, or a preference pair as it was read (its layout and both answers); with its data_source."""
    if PAIR in row:
        return {**row[AS_READ], "data_source": row["data_source"]}
    fields = ("instruction", "input", "output", "data_source") if "instruction" in row else ("messages", "data_source")
    return {key: row[key] for key in fields if key in row}


def print_summary(report):
    """The report in a few tables: stages, data sources, lengths, contaminated rows, files."""
    unit = report["unit"]
    say(f"\n{'stage':<14} {unit + 's in':>8} {'dropped':>8} {unit + 's out':>9} {'seconds':>8}")
    for stage in report["stages"]:
        detail = f"skipped: {stage['skipped']}" if "skipped" in stage else stage.get("note", "")
        say(
            f"{stage['stage']:<14} {stage['rows_in']:>8,} {stage['dropped']:>8,} {stage['rows_out']:>9,} "
            f"{stage['seconds']:>8.2f}  {detail}"
        )
    if "embedding" in report:
        e = report["embedding"]
        say(
            f"Embeddings: {e['texts']:,} rows, {e['embedded']:,} embedded, {e['from_cache']:,} from the cache "
            f"({e['seconds']:.1f} s)"
        )
    width = max([len("data_source")] + [len(name) for name in report["data_sources"]])
    say(f"\n{'data_source':<{width}}" + "".join(f" {title:>12}" for title in SOURCE_COLUMNS.values()))
    for name, counts in report["data_sources"].items():
        say(f"{name:<{width}}" + "".join(f" {counts.get(c, 0):>12,}" for c in SOURCE_COLUMNS))
    lengths = report.get("token_lengths")
    if lengths:
        longer = ", ".join(f"{n:,} over {limit}" for limit, n in lengths["longer_than"].items())
        say(
            f"\nTokens per example ({lengths['tokenizer']}, template {lengths['template']}): min {lengths['min']}, "
            f"mean {lengths['mean']}, p50 {lengths['p50']}, p90 {lengths['p90']}, p99 {lengths['p99']}, "
            f"max {lengths['max']}; {longer}"
        )
    contaminated = report.get("contaminated", [])
    if contaminated:
        say(f"\nContaminated rows ({len(contaminated)}; all of them in the report):")
        for hit in contaminated[:SHOWN_MATCHES]:
            say(
                f"  {hit['score']:.3f}  {hit['dropped']}: {hit['instruction'][:60]!r}\n"
                f"         ~ {hit['test_file']} row {hit['test_row']}: {hit['test_item'][:60]!r}"
            )
    for warning in report["warnings"]:
        say(f"\nWarning: {warning}")
    out = report["outputs"]
    say(
        f"\nWrote {out['data']} ({out['rows']:,} {unit}s); report {out['report']}; "
        f"rejects {out['rejects']} ({report['rejected_rows']:,} rows)"
    )
