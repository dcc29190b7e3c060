r"""Refine instruction data the Open-Platypus way: normalise, drop duplicates and test-set look-alikes, mix.

    # the bundled sample set: exact and near duplicates removed (about 13 s on 2 CPU cores)
    python refine.py --data_path data/sample_platypus.json --output_path outputs/refined.json

    # Open-Platypus's recipe: also drop rows too similar to benchmark test questions,
    # and show the token lengths a model's tokenizer gives
    python refine.py --data_path open_platypus.json --output_path outputs/refined.json \
        --test_files arc_test.jsonl,mmlu_test.parquet --tokenizer meta-llama/Llama-2-13b-hf

    # the Dolphin-ORCA-Platypus mix: all of one set, 1% each of two others (fixed seed);
    # finetune.py --data_path takes the same spec and, with the same --seed, samples the same rows
    python refine.py --mix 'open_platypus.json:1.0,dolphin.jsonl:0.01,openorca.jsonl:0.01' \
        --output_path dolphin_orca_platypus.json

    python refine.py --help      # every flag, with its default

Writes the refined rows (instruction, input, output, data_source) to --output_path, the
report to <output>.report.json and the rows set aside by normalisation, with the reason,
to <output>.rejects.jsonl. Preference pairs (rows with chosen and rejected, as finetune.py
--stage dpo reads them) are compared on their prompts and written in the layout they were read
in. Stages run in this order: normalise, mix, exact dedup, near dedup, decontaminate; sampling
comes before deduplication so that the embedding cost follows the rows kept, not the size of
the sources.
"""

from platy import cli
from platy import refine_stages as stages
from platy.flags import Flag, Flags, declared
from platy.refining import BUILTIN_EMBEDDING_MODEL

FLAGS = Flags(
    Flag(
        "data_path",
        "",
        str,
        "Data file(s): JSON, JSONL, CSV or Parquet, several separated by commas, or a data set id (needs "
        "network). Takes a mix spec too (see --mix).",
    ),
    Flag(
        "mix",
        "",
        str,
        "Sources with the fraction of each to keep, e.g. 'open_platypus.json:1.0,dolphin.jsonl:0.01': each is "
        "sampled with --seed, and rows without a data_source get the file's name. The same spec works as "
        "finetune.py --data_path. Give --data_path or --mix, not both.",
    ),
    Flag(
        "output_path",
        "",
        str,
        "The refined data file (.json, .jsonl, .csv or .parquet).",
    ),
    Flag(
        "test_files",
        "",
        str,
        "Benchmark test files, separated by commas, for decontamination; a row's question is its instruction "
        "(+ input), question, prompt, problem, query or text field.",
    ),
    Flag(
        "report_path",
        "",
        str,
        "The JSON report (default: <output>.report.json).",
    ),
    Flag(
        "rejects_path",
        "",
        str,
        "Rows set aside by normalisation, with the reason, as JSONL (default: <output>.rejects.jsonl).",
    ),
    Flag(
        "normalise",
        True,
        bool,
        "Convert OpenOrca (system_prompt, question, response) and one-exchange conversation rows "
        "(conversations / messages) to Alpaca rows, keep conversations of several exchanges as messages, and "
        "set aside rows that cannot be used. False: take Alpaca rows as they are; any other row stops the run.",
    ),
    Flag(
        "exact_dedup",
        True,
        bool,
        "Drop rows whose instruction + input repeats, keeping the longest output (of preference pairs sharing a "
        "prompt, the first).",
    ),
    Flag(
        "near_dedup",
        True,
        bool,
        "Drop a row when its cosine similarity to a row kept before it is above --near_dedup_threshold "
        "(embeddings of instruction + input, a pair's prompt).",
    ),
    Flag(
        "decontaminate",
        True,
        bool,
        "Drop rows whose similarity to a test question is at least --decontaminate_threshold (needs --test_files).",
    ),
    Flag(
        "near_dedup_threshold",
        0.7,
        float,
        "In [0, 1]; Platypus used 0.7. Higher keeps more rows.",
    ),
    Flag(
        "decontaminate_threshold",
        0.8,
        float,
        "In [0, 1]; Platypus used 0.8. Lower drops more rows.",
    ),
    Flag(
        "seed",
        42,
        int,
        "Seed of the --mix sampling.",
    ),
    Flag(
        "embedding_model",
        BUILTIN_EMBEDDING_MODEL,
        str,
        "A sentence-transformers model folder or id; the default is the bundled all-MiniLM-L6-v2 (Platypus's "
        "model, offline).",
    ),
    Flag(
        "trust_embedding_model",
        False,
        bool,
        "Load an --embedding_model folder whose modules.json names code of its own (a module outside "
        "sentence_transformers): only for a folder you trust.",
    ),
    Flag(
        "embedding_batch_size",
        64,
        int,
        "Texts per embedding batch.",
    ),
    Flag(
        "cache_dir",
        "",
        str,
        "Where embeddings are cached by content (default: $PLATY_CACHE/embeddings, else "
        "~/.cache/platy/embeddings); 'none' turns the cache off.",
    ),
    Flag(
        "tokenizer",
        "",
        str,
        "A model folder or id (or builtin:tiny-llama): the report then gives the distribution of example "
        "lengths in its tokens, as finetune.py builds them.",
    ),
    Flag(
        "prompt_template_name",
        "alpaca",
        str,
        "Template the lengths are counted with (alpaca, alpaca_short, alpaca_ko or a .json path); needs --tokenizer.",
    ),
)


@declared(FLAGS)
def refine(**flags):
    """Refine instruction data into one file plus a report; every stage can be switched off."""
    cli.fail_on(stages.check_flags(flags))
    run = stages.resolve(flags)
    report = stages.describe_run(run)
    groups = stages.read_and_normalise(run, report)
    rows = stages.mix_sources(run, groups, report)
    rows = stages.drop_exact_duplicates(run, rows, report)
    embeddings = stages.embed_rows(run, rows, report)
    rows, embeddings = stages.drop_near_duplicates(run, rows, embeddings, report)
    rows = stages.drop_contaminated(run, rows, embeddings, report)
    stages.measure_lengths(run, rows, report)
    stages.save(run, rows, report)
    stages.print_summary(report)


if __name__ == "__main__":
    cli.run(refine)
