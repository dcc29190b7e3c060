"""refine.py: each stage on hand-made rows, the blocked search against the loop, mixing, bad input."""

import json
import sys

import numpy as np
import pytest

from platy import cli, refining
from platy.cli import UserError
from platy.data.pairs import check_pairs, load_pairs
from platy.data.rows import load_rows, mix_rows, parse_mix, read_source, take_share, to_alpaca
from platy.refining import (
    benchmark_question,
    embed_texts,
    exact_duplicates,
    length_distribution,
    most_similar,
    near_duplicates,
    near_duplicates_loop,
    resolve_embedding_model,
)

from conftest import REPO, SAMPLE, assert_user_error, run_cli, write_rows

BOILING = "What is the boiling point of water at sea level in Celsius?"
BOILING_REWORDED = "At sea level, at what temperature in degrees Celsius does water boil?"
CAPITAL = "What is the capital city of Australia?"
CAPITAL_TEST = "Which city is Australia's capital?"  # the planted benchmark question (similarity 0.96)
TRIANGLE_KO = "삼각형의 내각의 합은 몇 도입니까?"
DIFFERENT = [
    "Name the largest planet in the solar system.",
    "Write a Python function that reverses a string.",
    "If all cats are mammals and some mammals are black, must some cats be black?",
]


def alpaca_rows():
    return [
        {"instruction": BOILING, "input": "", "output": "100 C."},
        {
            "instruction": BOILING,
            "input": "",
            "output": "Water boils at 100 degrees Celsius at sea level.",
            "data_source": "physics",
        },
        {"instruction": BOILING_REWORDED, "input": "", "output": "At 100 degrees."},
        *({"instruction": text, "output": "An answer."} for text in DIFFERENT),
        {"instruction": "Solve for x.", "input": "2x + 6 = 10", "output": "x = 2"},
        {"instruction": CAPITAL, "input": "", "output": "Canberra."},
        {"instruction": TRIANGLE_KO, "input": "", "output": "180도입니다."},
        {"instruction": TRIANGLE_KO.replace("?", " ?"), "input": "", "output": "180도."},
        {"instruction": "Explain photosynthesis.", "input": "", "output": "  "},
    ]


def conversation_rows():
    return [
        {
            "conversations": [
                {"from": "system", "value": "Answer briefly."},
                {"from": "human", "value": "How many protons does a carbon atom have?"},
                {"from": "gpt", "value": "Six."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye"},
            ]
        },
    ]


def orca_rows(n=20):
    return [
        {"system_prompt": "", "question": f"What is {i} times {i + 7}?", "response": str(i * (i + 7))} for i in range(n)
    ]


# ---- normalise -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, expected",
    [
        (
            {"instruction": "Q", "input": "I", "output": "A", "data_source": "s"},
            {"instruction": "Q", "input": "I", "output": "A", "data_source": "s"},
        ),
        (
            {"system_prompt": "Be brief.", "question": "Q?", "response": "A."},
            {"instruction": "Be brief.", "input": "Q?", "output": "A."},
        ),
        ({"system_prompt": "", "question": "Q?", "response": "A."}, {"instruction": "Q?", "input": "", "output": "A."}),
        (
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
            {"instruction": "Q?", "input": "", "output": "A."},
        ),
        (
            conversation_rows()[0],
            {"instruction": "Answer briefly.", "input": "How many protons does a carbon atom have?", "output": "Six."},
        ),
        ({"question": "Q?", "response": " "}, "'response' is blank"),
        ({"question": "Q?"}, "missing 'response'"),
        (conversation_rows()[1], "a conversation of 2 exchanges"),
        ({"conversations": [{"from": "human", "value": "Q?"}]}, "one user turn followed by one assistant turn"),
        ({"conversations": [{"from": "robot", "value": "Q?"}]}, "unknown role 'robot'"),
        ({"title": "x"}, "no known fields"),
        ("text", "expected an object"),
    ],
)
def test_rows_are_converted_or_refused_with_a_reason(row, expected):
    entry, reason = to_alpaca(row)
    if isinstance(expected, dict):
        assert (entry, reason) == (expected, None)
    else:
        assert entry is None and expected in reason


# ---- exact and near duplicates -------------------------------------------------------


def test_exact_duplicates_keep_the_longest_output_in_its_place():
    rows = alpaca_rows()
    kept, dropped = exact_duplicates(rows)
    assert dropped == [(0, 1)]
    assert kept == [i for i in range(len(rows)) if i != 0]
    rows.append({"instruction": f" {BOILING} ", "input": "", "output": "x" * 200})  # whitespace is no difference
    kept, dropped = exact_duplicates(rows)
    assert dropped == [(0, 11), (1, 11)] and 11 in kept


def clustered_embeddings(n, dim, seed):
    """Unit vectors around a few centres, so that many pairs are close and the rule matters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    vectors = centres[rng.integers(0, 12, n)] + rng.normal(scale=0.9, size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("block_rows, block_columns", [(7, 5), (64, 16384), (1024, 16384)])
def test_blocked_search_equals_the_greedy_loop(monkeypatch, block_rows, block_columns):
    monkeypatch.setattr(refining, "BLOCK_ROWS", block_rows)
    monkeypatch.setattr(refining, "BLOCK_COLUMNS", block_columns)
    embeddings = clustered_embeddings(300, 16, seed=block_rows)
    for threshold in (0.3, 0.5, 0.7, 0.9):
        keep, matched, score = near_duplicates(embeddings, threshold)
        loop_keep, _ = near_duplicates_loop(embeddings, threshold)
        assert np.array_equal(keep, loop_keep), threshold
        assert 0 < keep.sum() < len(keep), "the case must keep some rows and drop others"
        for i in np.flatnonzero(~keep):  # a dropped row names the kept row before it that it matched best
            kept_before = np.flatnonzero(keep[:i])
            sims = embeddings[kept_before] @ embeddings[i]
            assert matched[i] == kept_before[sims.argmax()]
            assert score[i] == pytest.approx(sims.max(), abs=1e-5) and score[i] > threshold


def test_most_similar_is_the_largest_similarity(monkeypatch):
    monkeypatch.setattr(refining, "BLOCK_ROWS", 6)
    monkeypatch.setattr(refining, "BLOCK_COLUMNS", 4)
    queries, items = clustered_embeddings(40, 8, seed=1), clustered_embeddings(23, 8, seed=2)
    best, at = most_similar(queries, items)
    sims = queries @ items.T
    assert np.array_equal(at, sims.argmax(axis=1))
    assert np.allclose(best, sims.max(axis=1), atol=1e-6)


@pytest.fixture(scope="module")
def minilm():
    return resolve_embedding_model(refining.BUILTIN_EMBEDDING_MODEL)


def test_embeddings_find_paraphrases_and_keep_different_questions(minilm, tmp_path, monkeypatch):
    texts = [BOILING, *DIFFERENT, BOILING_REWORDED, CAPITAL, TRIANGLE_KO, TRIANGLE_KO.replace("?", " ?")]
    embeddings, counts = embed_texts(texts, minilm, tmp_path)
    assert counts == {"texts": 8, "embedded": 8, "from_cache": 0}
    keep, matched, score = near_duplicates(embeddings, 0.7)
    assert keep.tolist() == [True, True, True, True, False, True, True, False]
    assert matched[4] == 0 and score[4] > 0.85 and matched[7] == 6  # the rewording and the Korean copy
    tests, _ = embed_texts([CAPITAL_TEST, "Who painted the Mona Lisa?"], minilm, tmp_path)
    best, at = most_similar(embeddings, tests)
    assert (best >= 0.8).tolist() == [False] * 5 + [True, False, False] and at[5] == 0

    def no_model(*args, **kwargs):
        raise AssertionError("everything is cached: the model must not be loaded")

    monkeypatch.setattr(refining, "load_encoder", no_model)
    again, counts = embed_texts(list(reversed(texts)), minilm, tmp_path)
    assert counts["embedded"] == 0 and np.array_equal(again, embeddings[::-1])


# ---- mixing --------------------------------------------------------------------------


def test_mix_spec_names_every_problem_at_once(tmp_path):
    good = write_rows(tmp_path / "a.json", [{"instruction": "q", "output": "a"}])
    assert parse_mix(f"{good}:1.0, {good}:0.01,{good}") == [(str(good), 1.0), (str(good), 0.01), (str(good), 1.0)]
    with pytest.raises(UserError) as err:
        parse_mix(f"{good}:0,{tmp_path}/missing.jsonl:0.5,{good}:1.5,{good}:abc", "--mix")
    message = str(err.value)
    for fragment in (
        f"{good}:0: the fraction must be a number in (0, 1]",
        "missing.jsonl: file not found",
        f"{good}:1.5: the fraction",
        f"{good}:abc: the fraction",
    ):
        assert fragment in message


def test_mix_fractions_and_seed(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": "a"} for i in range(1000)]
    share = take_share(rows, tmp_path / "big.json", 0.1, seed=42)
    assert len(share) == 100
    numbers = [int(r["instruction"][1:]) for r in share]
    assert numbers == sorted(numbers), "sampled rows keep their file order"
    assert take_share(rows, tmp_path / "big.json", 0.1, seed=42) == share, "same seed, same rows"
    assert take_share(rows, tmp_path / "big.json", 0.1, seed=7) != share
    assert {r["data_source"] for r in share} == {"big"}
    assert len(take_share(rows[:20], tmp_path / "small.json", 0.01, seed=42)) == 1, "a source never vanishes"
    whole = take_share(rows[:3] + [{**rows[3], "data_source": "own"}], tmp_path / "x.json", 1.0, seed=42)
    assert [r["data_source"] for r in whole] == ["x", "x", "x", "own"], "an existing data_source stays"


def test_finetune_reads_a_mix_spec(tmp_path, capsys):
    """The spec finetune.py takes as --data_path gives the rows refine.py's mix stage gives."""
    import test_train

    from platy.train import recipe
    from platy.train.objective import Supervised

    orca = write_rows(tmp_path / "orca.jsonl", orca_rows())
    spec = f"{SAMPLE}:0.5,{orca}:0.25"
    run = test_train.resolved(data_path=spec, output_dir=str(tmp_path / "o"))
    assert len(run.rows) == 122 + 5
    assert run.data_fingerprint.startswith("mix:sha256:")
    assert run.rows == mix_rows(spec, 42)[0] and load_rows(spec, 7)[0] != run.rows
    assert [r["data_source"] for r in run.rows[-5:]] == ["orca"] * 5
    tokenizer, chat = recipe.tokenizer_and_chat(run)
    Supervised().datasets(run, tokenizer, chat)
    assert f"Data: 127 rows from {spec}" in capsys.readouterr().out

    out = tmp_path / "refined.json"
    refine_in_process("--mix", spec, "--output_path", out, "--exact_dedup", "False", "--near_dedup", "False")
    refined = json.loads(out.read_text())
    assert [(r["instruction"], r["input"]) for r in refined] == [(r["instruction"], r["input"]) for r in run.rows]


# ---- the command line ----------------------------------------------------------------


def refine_cli(*args):
    return run_cli([sys.executable, str(REPO / "refine.py"), *map(str, args)])


def refine_in_process(*args):
    """refine.py's entry on a command line, in this process (its prints reach capsys)."""
    return cli.call(cli.script_entry("refine"), [str(arg) for arg in args])


@pytest.fixture
def inputs(tmp_path):
    return {
        "alpaca": write_rows(tmp_path / "alpaca.json", alpaca_rows()),
        "share": write_rows(tmp_path / "share.jsonl", conversation_rows()),
        "orca": write_rows(tmp_path / "orca.jsonl", orca_rows()),
        "test": write_rows(
            tmp_path / "arc_test.json",
            [{"question": CAPITAL_TEST, "choices": ["a", "b"]}, {"question": "Who painted the Mona Lisa?"}],
        ),
    }


def test_refine_end_to_end(inputs, tmp_path, tiny_llama, capsys):
    out = tmp_path / "out" / "mixed.jsonl"
    spec = f"{inputs['alpaca']},{inputs['share']}:1,{inputs['orca']}:0.25"
    result = refine_cli("--mix", spec, "--output_path", out, "--test_files", inputs["test"], "--tokenizer", tiny_llama)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert TRIANGLE_KO in out.read_text(encoding="utf-8"), "Korean is written as text, not escapes"
    texts = [r["instruction"] for r in rows if "instruction" in r]
    assert texts[:6] == [BOILING, *DIFFERENT, "Solve for x.", TRIANGLE_KO][:6]
    assert rows[0]["output"].startswith("Water boils") and rows[0]["data_source"] == "physics"
    assert BOILING_REWORDED not in texts and CAPITAL not in texts and TRIANGLE_KO.replace("?", " ?") not in texts
    assert {
        "instruction": "Answer briefly.",
        "input": "How many protons does a carbon atom have?",
        "output": "Six.",
        "data_source": "share",
    } in rows
    assert {r["data_source"] for r in rows} == {"physics", "alpaca", "share", "orca"}
    assert {"messages": conversation_rows()[1]["messages"], "data_source": "share"} in rows, "kept as a conversation"

    rejects = [json.loads(line) for line in (tmp_path / "out" / "mixed.rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["data_source"]) for r in rejects] == [(11, "alpaca")]
    assert "'output' is blank" in rejects[0]["reason"]

    report = json.loads((tmp_path / "out" / "mixed.report.json").read_text())
    stages = {s["stage"]: (s["rows_in"], s["dropped"], s["rows_out"]) for s in report["stages"]}
    assert stages["normalise"] == (33, 1, 32) and stages["mix"] == (32, 15, 17)
    assert stages["exact_dedup"] == (17, 1, 16) and stages["decontaminate"][1] == 1
    assert stages["decontaminate"][2] == len(rows)
    [hit] = report["contaminated"]
    assert hit["instruction"] == CAPITAL and hit["test_item"] == CAPITAL_TEST and hit["test_row"] == 1
    assert hit["score"] >= 0.8 and hit["dropped"].endswith("alpaca.json row 8")
    assert report["data_sources"]["orca"]["mix"] == 15 and "normalise" not in report["data_sources"]["share"]
    assert report["token_lengths"]["examples"] == len(rows) and report["token_lengths"]["max"] > 20
    assert any("non-Latin" in w for w in report["warnings"])
    summary = result.stdout
    for line in (
        "normalise",
        "near_dedup",
        "contaminated",
        "Tokens per example",
        f"Wrote {out} ({len(rows)} rows)",
        f'~ {inputs["test"]} row 1: "{CAPITAL_TEST}"',
    ):
        assert line in summary, line

    # a rerun with another threshold embeds nothing, and keeps the reworded question
    rerun = tmp_path / "rerun.json"
    refine_in_process(
        "--mix", spec, "--output_path", rerun, "--test_files", inputs["test"], "--near_dedup_threshold", 0.95
    )
    report = json.loads((tmp_path / "rerun.report.json").read_text())
    assert report["embedding"]["embedded"] == 0 and report["test_embedding"]["embedded"] == 0
    assert BOILING_REWORDED in [r.get("instruction") for r in json.loads(rerun.read_text())]

    # every stage switched off: the rows as normalised, in order
    off = ["--exact_dedup", "False", "--near_dedup", "False", "--decontaminate", "False"]
    refine_in_process("--data_path", f"{inputs['alpaca']},{inputs['share']}", "--output_path", rerun, *off)
    assert len(json.loads(rerun.read_text())) == 12  # the kept 2-exchange conversation too


def bad_input_cases(tmp_path, inputs):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"instruction": ')
    (tmp_path / "rows.txt").write_text("instruction: q")
    all_bad = write_rows(tmp_path / "all_bad.json", [{"instruction": "q", "output": ""}])
    no_question = write_rows(tmp_path / "t.json", [{"answer": "B"}])
    alpaca, orca = inputs["alpaca"], inputs["orca"]
    pairs = write_rows(tmp_path / "pairs.json", pair_rows("alpaca"))
    mixed = write_rows(tmp_path / "mixed.json", [*pair_rows("prompt")[:2], *alpaca_rows()[:2]])
    layouts = write_rows(tmp_path / "layouts.json", [pair_rows("alpaca")[0], pair_rows("prompt")[2]])
    conversations = write_rows(tmp_path / "conversations.json", pair_rows("ultrafeedback"))
    return {
        "pairs and rows in one file": (["--data_path", mixed], ["mixed.json: row 1 is a preference pair", "row 3"]),
        "pairs and rows in a mix": (["--mix", f"{pairs}:1,{alpaca}:0.5"], ["pairs.json holds preference pairs"]),
        "a bad pair, normalise off": (["--data_path", pairs, "--normalise", "False"], ["row 7: 'chosen' and"]),
        "pairs of two layouts in a table": (
            ["--data_path", layouts, "--output_path", tmp_path / "refined.parquet"],
            ["refined.parquet: ", "layouts.json row 2 is laid out unlike", "write a .json or .jsonl file"],
        ),
        "turns in a CSV file": (
            ["--data_path", conversations, "--output_path", tmp_path / "refined.csv"],
            ["refined.csv: ", "conversations.json row 1 holds turns in 'chosen'", "write a .json, .jsonl"],
        ),
        "unreadable": (["--data_path", bad_json], ["bad.json", "not valid JSON"]),
        "folder": (["--data_path", tmp_path], ["is a folder"]),
        "missing file": (["--data_path", tmp_path / "rows.jsn"], ["file not found"]),
        "unknown format": (["--data_path", tmp_path / "rows.txt"], ["unsupported file type '.txt'"]),
        "missing file in mix": (["--mix", f"{alpaca}:1,{tmp_path}/nope.jsonl:0.01"], ["nope.jsonl: file not found"]),
        "fraction zero": (["--mix", f"{alpaca}:0"], ["the fraction must be a number in (0, 1]"]),
        "fraction above one": (["--mix", f"{alpaca}:1.5,{orca}:2"], [f"{alpaca}:1.5", f"{orca}:2"]),
        "thresholds": (
            ["--data_path", alpaca, "--near_dedup_threshold", 1.5, "--decontaminate_threshold", -0.1],
            ["--near_dedup_threshold must be a number in [0, 1]", "--decontaminate_threshold"],
        ),
        "empty result": (["--data_path", all_bad], ["no rows left after normalise"]),
        "output format": (["--data_path", alpaca, "--output_path", tmp_path / "out.txt"], ["--output_path"]),
        "test file without questions": (
            ["--data_path", alpaca, "--test_files", no_question],
            ["t.json: row 1", "answer"],
        ),
        "normalise off": (["--data_path", orca, "--normalise", "False"], ["row 1: an OpenOrca row"]),
        "both inputs": (["--data_path", alpaca, "--mix", f"{alpaca}:0.5"], ["not both"]),
        "missing embedding model": (
            ["--data_path", alpaca, "--embedding_model", tmp_path / "no-model"],
            ["--embedding_model", "folder does not exist"],
        ),
    }


def test_bad_input_one_line_exit_2_nothing_written(tmp_path, inputs):
    """Every case through the real command line; a good earlier output stays as it was."""
    out = tmp_path / "refined.json"
    out.write_text('["the earlier good output"]')
    for name, (args, fragments) in bad_input_cases(tmp_path, inputs).items():
        if "--output_path" not in args:
            args = [*args, "--output_path", out]
        result = refine_cli(*args)
        assert_user_error(result, "refine.py", *fragments)
        assert out.read_text() == '["the earlier good output"]', name
        assert sorted(p.name for p in tmp_path.glob("refined*")) == ["refined.json"], name
        assert not list(tmp_path.glob(".*tmp*")), name


def test_finetune_refuses_a_bad_mix_spec(tmp_path, inputs):
    from conftest import finetune

    result = finetune(tmp_path / "never", data_path=f"{inputs['alpaca']}:0,{tmp_path}/nope.json:0.1")
    assert_user_error(
        result, "finetune.py", "--data_path", "the fraction must be a number in (0, 1]", "nope.json: file not found"
    )
    assert not (tmp_path / "never").exists()


def test_test_questions_and_length_distribution():
    assert benchmark_question({"instruction": "Add.", "input": "2 and 3"}) == "Add.\n2 and 3"
    assert benchmark_question({"question": "Q?", "choices": []}) == "Q?"
    assert benchmark_question({"problem": "P", "solution": "S"}) == "P"
    assert (
        benchmark_question({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "."}]})
        == "Hi?"
    )
    assert benchmark_question("plain") == "plain" and benchmark_question({"answer": "B"}) is None
    stats = length_distribution(list(range(1, 5001)))
    assert stats["min"] == 1 and stats["max"] == 5000 and stats["p50"] == 2500
    assert stats["longer_than"] == {"512": 4488, "1024": 3976, "2048": 2952, "4096": 904}


def test_a_test_question_in_a_later_user_turn_is_found(tmp_path):
    """Decontamination compares each user turn of a conversation of several exchanges on its own as well."""

    def chat(*questions):
        turns = [m for q in questions for m in ({"role": "user", "content": q}, {"role": "assistant", "content": "."})]
        return {"messages": turns}

    rows = [
        chat("Tell me about koalas.", "How long do they sleep?", CAPITAL),
        chat("Name a prime number.", "And an even one?", "Which is larger?"),
    ]
    data = write_rows(tmp_path / "chats.jsonl", rows)
    tests = write_rows(tmp_path / "arc.json", [{"question": CAPITAL_TEST, "choices": ["a", "b"]}])
    out = tmp_path / "out.jsonl"
    result = refine_cli("--data_path", data, "--output_path", out, "--test_files", tests, "--near_dedup", "False")
    assert result.returncode == 0, result.stderr[-3000:]
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["messages"] for row in kept] == [rows[1]["messages"]]
    contaminated = json.loads((tmp_path / "out.report.json").read_text())["contaminated"]
    assert [(c["dropped"], c["test_item"]) for c in contaminated] == [(f"{data} row 1", CAPITAL_TEST)]


# ---- preference pairs ----------------------------------------------------------------


def pair_row(layout, question, chosen, rejected):
    """A preference pair in one of the layouts finetune.py --stage dpo reads (platy/data/pairs.py)."""
    if layout == "alpaca":
        return {"instruction": question, "input": "", "chosen": chosen, "rejected": rejected}
    if layout == "prompt":
        return {"prompt": question, "chosen": chosen, "rejected": rejected}
    asked = [{"role": "user", "content": question}]
    if layout == "messages":
        return {
            "messages": [{"role": "system", "content": "Answer briefly."}, *asked],
            "chosen": {"role": "assistant", "content": chosen},
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return {  # UltraFeedback: two whole conversations
        "prompt": question,
        "chosen": [*asked, {"role": "assistant", "content": chosen}],
        "rejected": [*asked, {"role": "assistant", "content": rejected}],
    }


def pair_rows(layout):
    return [
        pair_row(layout, BOILING, "100 degrees.", "About 50 degrees."),
        pair_row(layout, BOILING, "Water boils at 100 degrees Celsius at sea level.", "At 90."),  # same prompt
        pair_row(layout, DIFFERENT[0], "100 degrees.", "About 50 degrees."),  # the same answers as row 1
        pair_row(layout, DIFFERENT[1], "100 degrees.", "About 50 degrees."),
        pair_row(layout, BOILING_REWORDED, "At 100 degrees.", "At 70 degrees."),  # a near duplicate of row 1
        pair_row(layout, CAPITAL, "Canberra.", "Sydney."),  # a benchmark test question
        pair_row(layout, DIFFERENT[2], "No.", "No."),  # no pair: one answer twice
    ]


@pytest.mark.parametrize(
    "layout, suffix", [("alpaca", ".json"), ("prompt", ".csv"), ("messages", ".parquet"), ("ultrafeedback", ".jsonl")]
)
def test_pairs_are_deduplicated_and_decontaminated_on_their_prompts(
    layout, suffix, inputs, tmp_path, tiny_llama, capsys
):
    """Same prompt with other answers: a duplicate (the first stays); same answers to other prompts: kept. The
    refined pairs keep their layout and load as finetune.py --stage dpo loads them."""
    rows = pair_rows(layout)
    data = write_rows(tmp_path / f"{layout}.jsonl", rows)
    out = tmp_path / f"refined{suffix}"
    refine_in_process(
        "--data_path", data, "--output_path", out, "--test_files", inputs["test"], "--tokenizer", tiny_llama
    )
    kept, _ = read_source(out)
    assert kept == [{**rows[i], "data_source": layout} for i in (0, 2, 3)]
    expected = check_pairs([rows[i] for i in (0, 2, 3)], "expected")
    loaded, _ = load_pairs(out)
    assert [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in loaded] == [
        {k: p[k] for k in ("prompt", "chosen", "rejected")} for p in expected
    ]

    [reject] = [json.loads(line) for line in (tmp_path / "refined.rejects.jsonl").read_text().splitlines()]
    assert reject["row"] == 7 and "the same answer" in reject["reason"] and reject["data"] == rows[6]
    report = json.loads((tmp_path / "refined.report.json").read_text())
    stages = {s["stage"]: (s["rows_in"], s["dropped"], s["rows_out"]) for s in report["stages"]}
    assert stages == {
        "normalise": (7, 1, 6),
        "mix": (6, 0, 6),
        "exact_dedup": (6, 1, 5),
        "near_dedup": (5, 1, 4),
        "decontaminate": (4, 1, 3),
    }
    assert report["exact_duplicates"] == [{"dropped": f"{data} row 2", "kept": f"{data} row 1"}]
    assert [d["dropped"] for d in report["near_duplicates"]] == [f"{data} row 5"]
    [hit] = report["contaminated"]
    assert hit["dropped"] == f"{data} row 6" and hit["test_item"] == CAPITAL_TEST
    assert report["data_sources"][layout]["kept"] == 3
    assert report["token_lengths"]["examples"] == 6, "each pair's prompt with either answer"
    summary = capsys.readouterr().out
    assert "stage          pairs in  dropped pairs out  seconds" in summary
    assert f"Wrote {out} (3 pairs)" in summary
