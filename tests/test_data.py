"""Templates, data loading and the exact label masking of training examples."""

import json
import os

import pandas as pd
import pytest

from platy.cli import UserError
from platy.data.examples import IGNORE_INDEX, ExampleTokenizer, prepare_tokenizer
from platy.data.rows import check_rows, load_rows, split_rows
from platy.data.tokenize import tokenize_rows
from platy.prompts import Prompter

from conftest import REPO, SAMPLE, write_rows

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


# ---- templates -------------------------------------------------------------------------


def test_alpaca_template_is_the_published_text():
    template = json.loads((REPO / "templates" / "alpaca.json").read_text())
    assert template["prompt_input"] == ALPACA_INPUT
    assert template["prompt_no_input"] == ALPACA_NO_INPUT
    assert template["response_split"] == "### Response:"


@pytest.mark.parametrize("name", ["alpaca", "alpaca_short", "alpaca_ko"])
def test_templates_found_from_any_working_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompter = Prompter(name)
    with_input = prompter.generate_prompt("Add the numbers.", "2 and 3")
    assert "Add the numbers." in with_input and "2 and 3" in with_input
    assert prompter.template["response_split"] in with_input
    no_input = prompter.generate_prompt("Say hi.")
    assert "Say hi." in no_input and "{input}" not in no_input
    assert prompter.get_response(with_input + " 5") == "5"


def test_korean_template_is_korean():
    assert "지시문" in Prompter("alpaca_ko").generate_prompt("두 수를 더하시오.")


def test_unknown_template_names_the_choices():
    with pytest.raises(UserError, match="unknown template 'nope'.*alpaca, alpaca_ko, alpaca_short"):
        Prompter("nope")


# ---- sample data -----------------------------------------------------------------------


def test_sample_data_is_a_real_instruction_set():
    rows, _ = load_rows(str(SAMPLE))
    assert len(rows) >= 200
    assert sum(1 for r in rows if r["input"]) >= 50, "some rows carry an input"
    assert sum(1 for r in rows if any("\uac00" <= ch <= "\ud7a3" for ch in r["output"])) >= 20, "some Korean rows"
    arithmetic = [r for r in rows if r.get("data_source") == "arithmetic"]
    for row in arithmetic:  # answers are correct: recompute them
        expression, value = row["output"].rstrip(".").split(" = ")
        a, op, b = expression.split()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(value)


# ---- loading ---------------------------------------------------------------------------

ROWS = [
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
    {"instruction": "Add the numbers.", "input": "3 and 5", "output": "8"},
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_file_format_gives_the_same_rows(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(ROWS).to_parquet(path)
    else:
        write_rows(path, ROWS)
    rows, fingerprint = load_rows(str(path))
    assert rows == ROWS  # an empty CSV cell reads back as "", not NaN
    assert fingerprint.startswith("sha256:")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_rows_are_parsed_from_the_bytes_that_were_hashed(tmp_path, suffix, monkeypatch):
    import hashlib

    from platy.data import rows as rows_module

    path = tmp_path / f"data{suffix}"
    write = (lambda frame: frame.to_csv(path, index=False)) if suffix == ".csv" else (lambda f: f.to_parquet(path))
    write(pd.DataFrame(ROWS[:1]))
    hashed = path.read_bytes()
    real_sha256 = hashlib.sha256

    def sha256_then_replace(data=b""):  # another writer replaces the file right after it was read and hashed
        write(pd.DataFrame(ROWS[1:]))
        return real_sha256(data)

    monkeypatch.setattr(rows_module.hashlib, "sha256", sha256_then_replace)
    rows, fingerprint = load_rows(str(path))
    assert fingerprint == "sha256:" + real_sha256(hashed).hexdigest()
    assert rows == ROWS[:1], "the rows belong to the fingerprint"


def test_json_lines_are_streamed_not_read_whole(tmp_path, monkeypatch):
    import hashlib
    from pathlib import Path

    path = write_rows(tmp_path / "data.jsonl", ROWS * 3)
    whole = path.read_bytes()

    def no_whole_read(self, *args, **kwargs):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", no_whole_read)
    monkeypatch.setattr(Path, "read_text", no_whole_read)
    rows, fingerprint = load_rows(str(path))
    assert rows == ROWS * 3
    assert fingerprint == "sha256:" + hashlib.sha256(whole).hexdigest()  # the key of existing token caches
    (tmp_path / "bad.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl: line 2 is not UTF-8 text; save the file as UTF-8"):
        load_rows(str(tmp_path / "bad.jsonl"))


def test_parquet_conversation_columns_are_read_as_lists(tmp_path):
    turns = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]
    other = turns[:1] + [{"role": "assistant", "content": "Two."}]
    path = tmp_path / "chat.parquet"
    pd.DataFrame([{"messages": turns}, {"messages": other}]).to_parquet(path)  # list<struct>: numpy arrays in pandas
    rows, _ = load_rows(str(path))
    assert [row["messages"] for row in rows] == [turns, other]
    assert rows[0]["instruction"] == "Name a prime." and rows[1]["output"] == "Two."


def test_missing_input_field_means_no_input(tmp_path):
    rows, _ = load_rows(str(write_rows(tmp_path / "d.json", [{"instruction": "Hi?", "output": "Hello."}])))
    assert rows == [{"instruction": "Hi?", "input": "", "output": "Hello."}]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([ROWS[0], {"instruction": "x"}], "row 2: missing 'output'"),
        ([ROWS[0], {"output": "y"}], "row 2: missing 'instruction'"),
        ([{"output": "y"}, {"output": "z"}], "no 'instruction' column; the rows have output"),
        ([ROWS[0], ROWS[1], {"instruction": "x", "output": 5}], "row 3: 'output' is int, not text"),
        ([{"instruction": "x", "input": ["a"], "output": "y"}], "row 1: 'input' is list, not text"),
        ([{"instruction": "  ", "output": "y"}], "row 1: 'instruction' is blank"),
        (["just text"], "row 1: expected an object"),
        ([], "no rows"),
    ],
)
def test_bad_rows_are_named_by_number(rows, message):
    with pytest.raises(UserError, match=message):
        check_rows(rows, "data.json")


def test_many_bad_rows_are_summarised_in_one_line():
    rows = [ROWS[0]] + [{"instruction": "x"}] * 7
    with pytest.raises(UserError) as err:
        check_rows(rows, "data.json")
    assert "row 2" in str(err.value) and "and 4 more rows" in str(err.value)
    assert "\n" not in str(err.value)


def test_val_split_by_count_and_fraction():
    rows = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(100)]
    train, val = split_rows(rows, 10, seed=1)
    assert len(val) == 10 and len(train) == 90
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in val)
    assert split_rows(rows, 10, seed=1) == (train, val), "the split is reproducible"
    train, val = split_rows(rows, 0.25, seed=1)
    assert len(val) == 25
    with pytest.raises(UserError, match="val_set_size 100"):
        split_rows(rows, 100, seed=1)


# ---- tokenization and labels -----------------------------------------------------------


@pytest.fixture
def tok(tokenizer):
    return prepare_tokenizer(tokenizer)


def encode(tok, rows, cutoff_len=4096, **kwargs):
    example_tokenizer = ExampleTokenizer(tok, Prompter("alpaca"), cutoff_len, **kwargs)
    return example_tokenizer({k: [r[k] for r in rows] for k in ("instruction", "input", "output")})


def test_labels_are_exactly_the_response_and_eos(tok):
    rows, _ = load_rows(str(SAMPLE))
    rows = rows[:40]
    out = encode(tok, rows)
    prompter = Prompter("alpaca")
    for row, ids, labels in zip(rows, out["input_ids"], out["labels"]):
        prompt_ids = tok(prompter.generate_prompt(row["instruction"], row["input"]), add_special_tokens=False)[
            "input_ids"
        ]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, "one BOS, at position 0"
        assert ids[1 : 1 + len(prompt_ids)] == prompt_ids, "prompt ids are an exact prefix"
        n_prompt = 1 + len(prompt_ids)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt, "every prompt position is masked"
        assert all(label != IGNORE_INDEX for label in labels[n_prompt:]), "every response token is a label"
        assert labels[-1] == tok.eos_token_id and ids[-1] == tok.eos_token_id
        response_labels = [label for label in labels if label != IGNORE_INDEX]
        assert tok.decode(response_labels[:-1]).strip() == row["output"].strip()
        assert tok.decode(response_labels).endswith(tok.eos_token)


def test_train_on_inputs_labels_the_prompt_too(tok):
    out = encode(tok, ROWS, train_on_inputs=True)
    for ids, labels in zip(out["input_ids"], out["labels"]):
        assert labels == ids


def test_response_merged_across_the_boundary_keeps_prompt_prefix(tok):
    """Find a word that tokenizes differently when split, and put the split at the boundary."""
    words = {w.strip(".,?") for r in load_rows(str(SAMPLE))[0] for w in r["output"].split() if len(w) > 6}
    prompter = Prompter("alpaca")
    case = None
    for word in sorted(words):
        for cut in range(1, len(word)):
            prompt = prompter.generate_prompt("Spell it.") + word[:cut]
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            j = tok(prompt + word[cut:], add_special_tokens=False)["input_ids"]
            if j[: len(p)] != p:
                case = (word, cut)
                break
        if case:
            break
    assert case, "the tiny tokenizer should merge some word across a split"
    word, cut = case
    prompter.template = {**prompter.template, "prompt_no_input": prompter.template["prompt_no_input"] + word[:cut]}
    example_tokenizer = ExampleTokenizer(tok, prompter, 4096)
    out = example_tokenizer({"instruction": ["Spell it."], "input": [""], "output": [word[cut:]]})
    prompt_ids = tok(prompter.generate_prompt("Spell it."), add_special_tokens=False)["input_ids"]
    assert out["input_ids"][0][1 : 1 + len(prompt_ids)] == prompt_ids
    labels = [label for label in out["labels"][0] if label != IGNORE_INDEX]
    assert tok.decode(labels[:-1]).strip() == word[cut:] and labels[-1] == tok.eos_token_id


TRICKY_OUTPUTS = [
    " A leading space.",
    "\nA leading newline.",
    "\n\nTwo.",
    "Ends with </s> as text.",
    "한국어와 이모지 😀.",
    "x",
    "   ",
    "tab\there",
    "<s>starts with BOS text",
]


def columns_of(rows):
    return {key: [row[key] for row in rows] for key in ("instruction", "input", "output")}


def two_pass(example_tokenizer):
    """The same ExampleTokenizer made to tokenize each prompt whole and take the joint prompt + response
    pass for every row, as if no character split cleanly."""
    example_tokenizer.clean = lambda char: False
    return example_tokenizer


@pytest.mark.parametrize("template", ["alpaca", "alpaca_short", "alpaca_ko"])
def test_one_pass_tokenization_equals_the_two_pass_one(tok, template):
    from platy.data.examples import splits_cleanly_after

    assert splits_cleanly_after(tok, "\n"), "the tiny Llama tokenizer takes the one-pass path"
    rows = load_rows(str(SAMPLE))[0] + [
        {"instruction": "Say it.", "input": context, "output": output}
        for output in TRICKY_OUTPUTS
        for context in ("", "Some context.")
    ]
    batch = columns_of(rows)
    for kwargs in (
        dict(cutoff_len=4096),
        dict(cutoff_len=60, add_eos_token=True),
        dict(cutoff_len=90, train_on_inputs=True),
    ):
        fast = ExampleTokenizer(tok, Prompter(template), **kwargs)
        slow = two_pass(ExampleTokenizer(tok, Prompter(template), **kwargs))
        assert fast(batch) == slow(batch), kwargs


def backend_variant(tok, change):
    """A fast tokenizer whose backend definition is the tiny one after change(spec)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    change(spec)
    return prepare_tokenizer(
        PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
        )
    )


def add_tokens(*tokens, merges=()):
    def change(spec):
        vocab = spec["model"]["vocab"]
        for token in tokens:
            vocab[token] = len(vocab)
        spec["model"]["merges"] = [list(merge) for merge in merges] + spec["model"]["merges"]

    return change


def test_one_pass_is_refused_where_a_token_could_cross_the_prompt_end(tok):
    from platy.data.examples import splits_cleanly_after

    # a vocabulary that merges the prompt's last newline with the response's first letter
    crossing = backend_variant(tok, add_tokens("\n", "\nB", merges=[("\n", "B")]))
    prompt = Prompter("alpaca").generate_prompt("Why?")
    prompt_ids = crossing(prompt, add_special_tokens=False)["input_ids"]
    joint_ids = crossing(prompt + "Because.", add_special_tokens=False)["input_ids"]
    assert joint_ids[: len(prompt_ids)] != prompt_ids, "this vocabulary does merge across the boundary"
    assert not splits_cleanly_after(crossing, "\n")
    rows = [{"instruction": "Why?", "input": "", "output": "Because."}, *load_rows(str(SAMPLE))[0][:20]]
    batch = columns_of(rows)
    got = ExampleTokenizer(crossing, Prompter("alpaca"), 4096)(batch)
    assert got == two_pass(ExampleTokenizer(crossing, Prompter("alpaca"), 4096))(batch)
    # each other way a token or a match could reach across the boundary is refused too
    refused = {
        "byte-fallback newline continued": backend_variant(tok, add_tokens("<0x0A>B")),
        "an added token matching by its neighbours": backend_variant(
            tok, lambda spec: spec["added_tokens"][2].update(lstrip=True)
        ),
        "a pre-tokenizer that splits": backend_variant(tok, lambda spec: spec["pre_tokenizer"].update(split=True)),
        "byte-level BPE": backend_variant(
            tok,
            lambda spec: spec.update(
                pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
            ),
        ),
    }
    for name, variant in refused.items():
        assert not splits_cleanly_after(variant, "\n"), name
    assert not splits_cleanly_after(tok, " ") and not splits_cleanly_after(tok, "e")


def test_one_pass_handles_the_older_llama_normalizer(tok):
    """Llama tokenizers saved by older libraries add the leading marker in a Prepend normalizer."""
    from platy.data.examples import splits_cleanly_after

    older = backend_variant(
        tok,
        lambda spec: spec.update(
            pre_tokenizer=None,
            normalizer={
                "type": "Sequence",
                "normalizers": [
                    {"type": "Prepend", "prepend": "\u2581"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
                ],
            },
        ),
    )
    assert (
        older("Hi there", add_special_tokens=False)["input_ids"]
        == tok("Hi there", add_special_tokens=False)["input_ids"]
    ), "the same tokenizer in its older form"
    assert splits_cleanly_after(older, "\n")
    rows = load_rows(str(SAMPLE))[0] + [{"instruction": "Say it.", "input": "", "output": o} for o in TRICKY_OUTPUTS]
    batch = columns_of(rows)
    assert ExampleTokenizer(older, Prompter("alpaca"), 4096)(batch) == two_pass(
        ExampleTokenizer(older, Prompter("alpaca"), 4096)
    )(batch)


def test_tokenizing_in_processes_gives_the_same_dataset(tok, monkeypatch):
    import platy.data.tokenize

    for name in ("TOKENIZE_BATCH", "PROCESS_BATCH"):  # many batches from the sample (the workers fork this)
        monkeypatch.setattr(platy.data.tokenize, name, 25)
    rows = load_rows(str(SAMPLE))[0] + [{"instruction": "Long " * 80, "input": "", "output": "Cut away."}]
    example_tokenizer = ExampleTokenizer(tok, Prompter("alpaca"), 100)
    one, one_stats = tokenize_rows(rows, example_tokenizer, num_proc=1)
    two, two_stats = tokenize_rows(rows, example_tokenizer, num_proc=2)
    assert one_stats == two_stats and one_stats["rows"] == len(rows) and one_stats["dropped_cut_away"] == 1
    assert one_stats["kept"] == len(one) == len(rows) - 1
    for column in ("input_ids", "attention_mask", "labels"):
        assert one[column] == two[column], column
    assert one.features == two.features


def dies_at_the_third_batch(start):
    """A tokenizing process's task that kills its process at rows 50..74, as the out-of-memory killer would
    (module level: the process pool pickles it by name)."""
    import signal

    import platy.data.tokenize

    if start == 50:
        os.kill(os.getpid(), signal.SIGKILL)
    return platy.data.tokenize.token_arrays(
        platy.data.tokenize._WORK[1].compact(
            {key: values[start : start + 25] for key, values in platy.data.tokenize._WORK[0].items()}
        )
    )


def test_a_tokenizing_process_that_dies_leaves_the_rest_to_this_one(tok, monkeypatch, capsys):
    import platy.data.tokenize

    for name in ("TOKENIZE_BATCH", "PROCESS_BATCH"):
        monkeypatch.setattr(platy.data.tokenize, name, 25)
    monkeypatch.setattr(platy.data.tokenize, "_tokenize_batch", dies_at_the_third_batch)
    rows = load_rows(str(SAMPLE))[0]
    example_tokenizer = ExampleTokenizer(tok, Prompter("alpaca"), 256)
    expected, expected_stats = tokenize_rows(rows, example_tokenizer, num_proc=1)
    got, stats = tokenize_rows(rows, example_tokenizer, num_proc=2)
    assert "Note: tokenizing in 2 processes failed" in capsys.readouterr().out
    assert stats == expected_stats and got["input_ids"] == expected["input_ids"] and got["labels"] == expected["labels"]


def test_add_eos_token_decides_the_end_of_a_cut_response(tok):
    row = {"instruction": "Count.", "input": "", "output": " ".join(str(i) for i in range(60))}
    prompt_len = len(encode(tok, [{**row, "output": "x"}])["input_ids"][0]) - 2
    cutoff = prompt_len + 10
    plain = encode(tok, [row], cutoff_len=cutoff, add_eos_token=False)
    forced = encode(tok, [row], cutoff_len=cutoff, add_eos_token=True)
    assert len(plain["input_ids"][0]) == cutoff == len(forced["input_ids"][0])
    assert plain["truncated"] == [True] and plain["input_ids"][0][-1] != tok.eos_token_id
    assert forced["input_ids"][0][-1] == tok.eos_token_id and forced["labels"][0][-1] == tok.eos_token_id
    assert forced["input_ids"][0][:-1] == plain["input_ids"][0][:-1]
    # an example that fits ends with EOS whatever the flag
    short = {**row, "output": "0 1 2"}
    for flag in (False, True):
        assert encode(tok, [short], add_eos_token=flag)["labels"][0][-1] == tok.eos_token_id


def test_examples_with_the_response_cut_away_are_dropped_and_counted(tok):
    rows = [
        {"instruction": "Short?", "input": "", "output": "Yes."},
        {"instruction": "Long " * 80, "input": "", "output": "Yes."},
    ]
    example_tokenizer = ExampleTokenizer(tok, Prompter("alpaca"), 80)
    ds, stats = tokenize_rows(rows, example_tokenizer)
    assert len(ds) == 1 and stats["dropped_cut_away"] == 1
    for labels in ds["labels"]:
        assert any(label != IGNORE_INDEX for label in labels[1:]), "no example without a trainable token"


def test_pad_id_never_masks_eos(tok):
    """Even where pad == EOS, the collator pads labels with -100 and leaves the real EOS a label."""
    import transformers

    tok.pad_token = tok.eos_token
    ds, _ = tokenize_rows(ROWS, ExampleTokenizer(tok, Prompter("alpaca"), 4096))
    collator = transformers.DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    batch = collator([ds[0], ds[1]])
    for row, labels in zip(ds, batch["labels"].tolist()):
        assert labels[len(row["input_ids"]) - 1] == tok.eos_token_id
        assert all(label == IGNORE_INDEX for label in labels[len(row["input_ids"]) :])


def test_data_set_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not a local file and could not be loaded as a data set id"):
        load_rows("someone/no-such-set")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello")
    with pytest.raises(UserError, match=r"unsupported file type '\.txt'"):
        load_rows(str(path))


def test_invalid_json_names_the_place(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n{"instruction": ')
    with pytest.raises(UserError, match="rows.json.*not valid JSON"):
        load_rows(str(path))
    assert os.path.exists(path)
