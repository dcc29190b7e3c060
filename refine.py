r"""Refine instruction data the Open-Platypus way: normalise, drop duplicates and test-set look-alikes, mix.

    # the bundled sample set: exact and near duplicates removed (about 13 s on 2 CPU cores)
    python refine.py --data_path data/sample_platypus.json --output_path refined.json

    # Open-Platypus's recipe: also drop rows too similar to benchmark test questions,
    # and show the token lengths a model's tokenizer gives
    python refine.py --data_path open_platypus.json --output_path refined.json \
        --test_files arc_test.jsonl,mmlu_test.parquet --tokenizer meta-llama/Llama-2-13b-hf

    # the Dolphin-ORCA-Platypus mix: all of one set, 1% each of two others (fixed seed);
    # finetune.py --data_path takes the same spec and, with the same --seed, samples the same rows
    python refine.py --mix 'open_platypus.json:1.0,dolphin.jsonl:0.01,openorca.jsonl:0.01' \
        --output_path dolphin_orca_platypus.json

    python refine.py --help      # every flag, with its default

Writes the refined rows (instruction, input, output, data_source) to --output_path, the
report to <output>.report.json and the rows set aside by normalisation, with the reason,
to <output>.rejects.jsonl. Stages run in this order: normalise, mix, exact dedup, near
dedup, decontaminate; sampling comes before deduplication so that the embedding cost
follows the rows kept, not the size of the sources.
"""

import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from platy import cli
from platy.cli import UserError, say
from platy.data.examples import prepare_tokenizer
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
    BUILTIN_EMBEDDING_MODEL,
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
SHOWN_MATCHES = 10  # contaminated rows printed on the terminal; the report lists them all
# similarities of identical texts can come out a hair under 1.0 in float32
SCORE_TOLERANCE = 1e-6


def refine(
    # inputs and outputs
    data_path: str = "",
    mix: str = "",
    output_path: str = "",
    test_files: str = "",
    report_path: str = "",
    rejects_path: str = "",
    # stages
    normalise: bool = True,
    exact_dedup: bool = True,
    near_dedup: bool = True,
    decontaminate: bool = True,
    near_dedup_threshold: float = 0.7,
    decontaminate_threshold: float = 0.8,
    seed: int = 42,
    # embeddings
    embedding_model: str = BUILTIN_EMBEDDING_MODEL,
    embedding_batch_size: int = 64,
    cache_dir: str = "",
    # token lengths
    tokenizer: str = "",
    prompt_template_name: str = "alpaca",
):
    """Refine instruction data into one file plus a report; every stage can be switched off.

    Args:
        data_path: Data file(s): JSON, JSONL, CSV or Parquet, several separated by commas,
            or a data set id (needs network). Takes a mix spec too (see --mix).
        mix: Sources with the fraction of each to keep, e.g.
            'open_platypus.json:1.0,dolphin.jsonl:0.01': each is sampled with --seed, and
            rows without a data_source get the file's name. The same spec works as
            finetune.py --data_path. Give --data_path or --mix, not both.
        output_path: The refined data file (.json, .jsonl, .csv or .parquet).
        test_files: Benchmark test files, separated by commas, for decontamination; a row's
            question is its instruction (+ input), question, prompt, problem, query or text field.
        report_path: The JSON report (default: <output>.report.json).
        rejects_path: Rows set aside by normalisation, with the reason, as JSONL (default:
            <output>.rejects.jsonl).
        normalise: Convert OpenOrca (system_prompt, question, response) and one-exchange
            conversation rows (conversations / messages) to Alpaca rows and set aside rows
            that cannot be used. False: take Alpaca rows as they are; any other row stops the run.
        exact_dedup: Drop rows whose instruction + input repeats, keeping the longest output.
        near_dedup: Drop a row when its cosine similarity to a row kept before it is above
            --near_dedup_threshold (embeddings of instruction + input).
        decontaminate: Drop rows whose similarity to a test question is at least
            --decontaminate_threshold (needs --test_files).
        near_dedup_threshold: In [0, 1]; Platypus used 0.7. Higher keeps more rows.
        decontaminate_threshold: In [0, 1]; Platypus used 0.8. Lower drops more rows.
        seed: Seed of the --mix sampling.
        embedding_model: A sentence-transformers model folder or id; the default is the
            bundled all-MiniLM-L6-v2 (Platypus's model, offline).
        embedding_batch_size: Texts per embedding batch.
        cache_dir: Where embeddings are cached by content (default: $PLATY_CACHE/embeddings,
            else ~/.cache/platy/embeddings); 'none' turns the cache off.
        tokenizer: A model folder or id (or builtin:tiny-llama): the report then gives the
            distribution of example lengths in its tokens, as finetune.py builds them.
        prompt_template_name: Template the lengths are counted with (alpaca, alpaca_short,
            alpaca_ko or a .json path); needs --tokenizer.
    """
    setup = validate(dict(locals()))
    report = describe_run(setup)
    groups = read_and_normalise(setup, report)
    rows = mix_sources(setup, groups, report)
    rows = drop_exact_duplicates(setup, rows, report)
    embeddings = embed_rows(setup, rows, report)
    rows, embeddings = drop_near_duplicates(setup, rows, embeddings, report)
    rows = drop_contaminated(setup, rows, embeddings, report)
    measure_lengths(setup, rows, report)
    save(setup, rows, report)
    print_summary(report)


def validate(flags):
    """Check every flag and read the test files before any data is processed; fail once."""
    f = SimpleNamespace(**cli.coerce_bools(refine, flags))
    problems = []
    if bool(f.data_path) == bool(f.mix):
        problems.append(
            "give the data in --data_path or in --mix (a spec like 'a.json:1.0,b.jsonl:0.01'), not both"
            if f.data_path
            else "--data_path or --mix is required"
        )
    output = Path(str(f.output_path)).expanduser()
    if not f.output_path:
        problems.append("--output_path is required (a .json, .jsonl, .csv or .parquet file)")
    elif output.suffix.lower() not in FILE_FORMATS:
        problems.append(
            f"--output_path {f.output_path}: unsupported file type '{output.suffix}'; "
            "use .json, .jsonl, .csv or .parquet"
        )
    elif output.is_dir():
        problems.append(f"--output_path {f.output_path} is a folder; give a file name")
    for name in ("near_dedup_threshold", "decontaminate_threshold"):
        value = getattr(f, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            problems.append(f"--{name} must be a number in [0, 1], got {value!r}")
    if (
        not isinstance(f.embedding_batch_size, int)
        or isinstance(f.embedding_batch_size, bool)
        or f.embedding_batch_size < 1
    ):
        problems.append(f"--embedding_batch_size must be a positive integer, got {f.embedding_batch_size!r}")
    if not isinstance(f.seed, int) or isinstance(f.seed, bool):
        problems.append(f"--seed must be an integer, got {f.seed!r}")
    if f.test_files and not f.decontaminate:
        problems.append("--test_files is given but --decontaminate is False; drop one of them")
    if f.prompt_template_name != "alpaca" and not f.tokenizer:
        problems.append("--prompt_template_name only shapes the token lengths: give --tokenizer too")
    report_path = Path(str(f.report_path or output.with_name(output.stem + ".report.json"))).expanduser()
    rejects_path = Path(str(f.rejects_path or output.with_name(output.stem + ".rejects.jsonl"))).expanduser()
    if report_path.suffix.lower() != ".json":
        problems.append(f"--report_path {report_path}: give a .json file")
    if rejects_path.suffix.lower() != ".jsonl":
        problems.append(f"--rejects_path {rejects_path}: give a .jsonl file")
    if f.output_path and len({output.resolve(), report_path.resolve(), rejects_path.resolve()}) < 3:
        problems.append("--output_path, --report_path and --rejects_path must be three different files")
    if problems:
        raise UserError("; ".join(problems))

    f.input_flag = "--mix" if f.mix else "--data_path"
    f.sources = parse_mix(f.mix or f.data_path, f.input_flag)
    f.output, f.report_file, f.rejects_file = output, report_path, rejects_path
    f.test_items = read_test_questions(f.test_files) if f.decontaminate and f.test_files else []
    needs_embeddings = f.near_dedup or bool(f.test_items)
    f.embedding_model_path = resolve_embedding_model(f.embedding_model) if needs_embeddings else None
    f.cache_root = resolve_cache_dir(f.cache_dir)
    f.length_tokenizer, f.prompter = load_length_tokenizer(f.tokenizer, f.prompt_template_name)
    return f


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
    from platy.modeling import load_tokenizer, resolve_base_model
    from platy.prompts import Prompter

    prompter = Prompter(template)
    return prepare_tokenizer(load_tokenizer(resolve_base_model(name, "--tokenizer"), flag="--tokenizer")), prompter


def describe_run(setup):
    """The resolved configuration, printed once; the report starts from it."""
    flags = {name: getattr(setup, name) for name in cli.parameter_names(refine)}
    resolved = {
        "sources": setup.sources,
        "embedding_model_folder": setup.embedding_model_path,
        "embedding_cache": str(setup.cache_root) if setup.cache_root else None,
        "report_file": str(setup.report_file),
        "rejects_file": str(setup.rejects_file),
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


def read_and_normalise(setup, report):
    """[(source, fraction, rows)]: every source's rows in Alpaca form, each knowing its place
    ('file row N'); rejects kept aside."""
    started = time.time()
    groups, rejects = [], []
    for source, fraction in setup.sources:
        raw, fingerprint = read_source(source, setup.input_flag)
        clean, bad = normalise_rows(raw, source)
        if not setup.normalise:
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
    report["rejects"] = rejects
    rows = [row for _, _, clean in groups for row in clean]
    for row in rows + rejects:
        report["data_sources"][row["data_source"]]["read"] += 1
    read = sum(item["rows_read"] for item in report["inputs"])
    converted = "converted and checked" if setup.normalise else "checked (--normalise False)"
    record(
        report,
        "normalise",
        read,
        rows,
        rejects,
        time.time() - started,
        note=f"{converted}; {len(rejects)} set aside in {setup.rejects_file.name}",
    )
    require_rows(
        rows,
        "normalise",
        "every row was set aside; see the reasons in the rejects file "
        "(nothing is written on error: rerun with fixed data)",
    )
    return groups


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


def mix_sources(setup, groups, report):
    started = time.time()
    rows, kept, dropped = [], [], []
    for source, fraction, clean in groups:
        share = take_share(clean, source, fraction, setup.seed)  # the rows themselves: data_source is set
        taken = {id(row) for row in share}
        rows += clean
        kept += share
        dropped += [row for row in clean if id(row) not in taken]
    if not any(fraction < 1 for _, fraction, _ in groups):
        record(report, "mix", len(rows), kept, [], 0, skipped="every source taken whole")
        return kept
    shares = ", ".join(f"{origin_name(s)} {f:g}" for s, f in setup.sources)
    record(report, "mix", len(rows), kept, dropped, time.time() - started, note=f"seed {setup.seed}: {shares}")
    return require_rows(kept, "mix", "raise the fractions")


def drop_exact_duplicates(setup, rows, report):
    if not setup.exact_dedup:
        record(report, "exact_dedup", len(rows), rows, [], 0, skipped="--exact_dedup False")
        return rows
    started = time.time()
    kept, pairs = exact_duplicates(rows)
    report["exact_duplicates"] = [{"dropped": rows[i]["_at"], "kept": rows[j]["_at"]} for i, j in pairs]
    record(
        report,
        "exact_dedup",
        len(rows),
        kept,
        [rows[i] for i, _ in pairs],
        time.time() - started,
        note="kept the longest output of each instruction + input",
    )
    return [rows[i] for i in kept]


def embed_rows(setup, rows, report):
    """Embeddings of every row's instruction + input, when a later stage needs them."""
    if not setup.embedding_model_path:
        return None
    started = time.time()
    texts = [row_text(row) for row in rows]
    embeddings, counts = embed_texts(
        texts, setup.embedding_model_path, setup.cache_root, setup.embedding_batch_size, setup.embedding_model
    )
    report["embedding"] = {"model": setup.embedding_model, "seconds": round(time.time() - started, 2), **counts}
    warn_about_language(setup, texts, report)
    return embeddings


def warn_about_language(setup, texts, report):
    """all-MiniLM-L6-v2 is an English model: different Korean questions scored 0.50 to 0.82 with
    it in our check, so Platypus's thresholds would drop rows that should stay."""
    if setup.embedding_model not in BUNDLED_NAMES:
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


def drop_near_duplicates(setup, rows, embeddings, report):
    if not setup.near_dedup:
        record(report, "near_dedup", len(rows), rows, [], 0, skipped="--near_dedup False")
        return rows, embeddings
    started = time.time()
    keep, matched, score = near_duplicates(embeddings, setup.near_dedup_threshold, progress="Near dedup")
    dropped = np.flatnonzero(~keep)
    report["near_duplicates"] = [
        {
            "dropped": rows[i]["_at"],
            "instruction": rows[i]["instruction"][:200],
            "kept": rows[matched[i]]["_at"],
            "kept_instruction": rows[matched[i]]["instruction"][:200],
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
        note=f"similarity to a kept row above {setup.near_dedup_threshold}",
    )
    return require_rows(kept, "near_dedup", "raise --near_dedup_threshold"), embeddings[keep]


def drop_contaminated(setup, rows, embeddings, report):
    if not setup.decontaminate or not setup.test_items:
        reason = "--decontaminate False" if not setup.decontaminate else "no --test_files"
        record(report, "decontaminate", len(rows), rows, [], 0, skipped=reason)
        return rows
    started = time.time()
    tests, counts = embed_texts(
        [item["text"] for item in setup.test_items],
        setup.embedding_model_path,
        setup.cache_root,
        setup.embedding_batch_size,
        setup.embedding_model,
    )
    report["test_embedding"] = counts
    best, at = most_similar(embeddings, tests, progress="Decontaminating")
    hits = best >= setup.decontaminate_threshold - SCORE_TOLERANCE
    dropped = np.flatnonzero(hits)
    report["contaminated"] = [
        {
            "dropped": rows[i]["_at"],
            "instruction": rows[i]["instruction"],
            "input": rows[i]["input"],
            "data_source": rows[i].get("data_source"),
            "test_file": setup.test_items[at[i]]["file"],
            "test_row": setup.test_items[at[i]]["row"],
            "test_item": setup.test_items[at[i]]["text"],
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
        note=f"similarity to one of {len(tests)} test questions at least {setup.decontaminate_threshold}",
    )
    return require_rows(kept, "decontaminate", "check --test_files, or raise --decontaminate_threshold")


def measure_lengths(setup, rows, report):
    if setup.length_tokenizer is None:
        return
    lengths = token_lengths(rows, setup.length_tokenizer, setup.prompter)
    report["token_lengths"] = {
        "tokenizer": setup.tokenizer,
        "template": setup.prompt_template_name,
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


def save(setup, rows, report):
    """Rejects and report first, the refined data last; each goes through a temporary file."""
    for row in rows:
        report["data_sources"][row.get("data_source", "")]["kept"] += 1
    report["outputs"] = {
        "data": str(setup.output),
        "rows": len(rows),
        "report": str(setup.report_file),
        "rejects": str(setup.rejects_file),
    }
    report["data_sources"] = {name: dict(counts) for name, counts in sorted(report["data_sources"].items())}
    setup.output.parent.mkdir(parents=True, exist_ok=True)
    write_rows(setup.rejects_file, report.pop("rejects"), "jsonl")
    report["rejected_rows"] = report["stages"][0]["dropped"]
    write_json(setup.report_file, report)
    fields = ("instruction", "input", "output", "data_source")
    clean = [{key: row[key] for key in fields if key in row} for row in rows]
    write_rows(setup.output, clean, FILE_FORMATS[setup.output.suffix.lower()])


def print_summary(report):
    """The report in a few tables: stages, data sources, lengths, contaminated rows, files."""
    say("\nstage           rows in  dropped  rows out  seconds")
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
        f"\nWrote {out['data']} ({out['rows']:,} rows); report {out['report']}; "
        f"rejects {out['rejects']} ({report['rejected_rows']:,} rows)"
    )


if __name__ == "__main__":
    cli.run(refine)
