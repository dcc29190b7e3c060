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
to <output>.rejects.jsonl. Stages run in this order: normalise, mix, exact dedup, near
dedup, decontaminate; sampling comes before deduplication so that the embedding cost
follows the rows kept, not the size of the sources.
"""

from platy import cli
from platy import refine_stages as stages
from platy.refining import BUILTIN_EMBEDDING_MODEL


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
    flags = dict(locals())
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
