"""inference.py: batched = sequential greedy, input column used, stop at EOS, files, bad input."""

import json
import sys

import pandas as pd
import pytest

from conftest import REPO, assert_user_error, finetune, merge_cli, run_cli, write_rows

QUESTIONS = [
    {"instruction": "What is 2 + 3?"},
    {"instruction": "Compute the value of the expression.", "input": "12 * 3"},
    {"instruction": "Convert 5 kilometres to metres."},
    {"instruction": "다음 두 수의 합을 구하시오.", "input": "12, 30"},
    {"instruction": "Is 91 a prime number? Explain with a factorisation, please, in detail."},
]


def infer(*args, env=None):
    return run_cli([sys.executable, str(REPO / "inference.py"), *map(str, args)], env=env)


def make_generator(adapter, **overrides):
    from platy import cli, inference_stages

    flags = {
        **cli.entry_defaults(cli.script_entry("inference")),
        "lora_weights": str(adapter),
        "prompt": "x",
        "max_new_tokens": 12,
        "seed": 0,
        **overrides,
    }
    return inference_stages.prepare(flags)


def test_batched_greedy_equals_one_at_a_time(qlora_adapter):
    generator = make_generator(qlora_adapter)
    batched = generator.generate(QUESTIONS)
    single = [generator.generate([q])[0] for q in QUESTIONS]
    assert batched == single
    assert len(set(batched)) > 1 or all(batched), batched


def test_prompt_ids_match_training_and_input_is_used(qlora_adapter):
    from platy.data.examples import ExampleTokenizer

    generator = make_generator(qlora_adapter)
    ids, mask = generator.encode([QUESTIONS[1]])
    training = ExampleTokenizer(generator.tokenizer, generator.prompter, 4096)(
        {"instruction": [QUESTIONS[1]["instruction"]], "input": [QUESTIONS[1]["input"]], "output": ["36"]}
    )
    n_prompt = sum(1 for label in training["labels"][0] if label == -100)
    assert ids[0].tolist() == training["input_ids"][0][:n_prompt], "generation sees the prompt ids training saw"
    assert "12 * 3" in generator.tokenizer.decode(ids[0]) and "### Input:" in generator.tokenizer.decode(ids[0])
    left_padded, _ = generator.encode([QUESTIONS[0], QUESTIONS[4]])
    assert left_padded[0, 0].item() == generator.tokenizer.pad_token_id, "short prompts are padded on the left"


@pytest.fixture(scope="module")
def stopper(tmp_path_factory):
    """A model trained until it answers 'Yes.' and stops: generation must end at its EOS."""
    folder = tmp_path_factory.mktemp("stop")
    data = write_rows(folder / "d.json", [{"instruction": "Say yes.", "output": "Yes."}] * 16)
    out = folder / "adapter"
    result = finetune(
        out,
        "--max_steps",
        40,
        "--learning_rate",
        1e-2,
        "--lora_dropout",
        0.0,
        "--quantization",
        "none",
        "--batch_size",
        4,
        "--micro_batch_size",
        4,
        data_path=data,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_generation_stops_at_eos(stopper):
    generator = make_generator(stopper, max_new_tokens=40)
    input_ids, _ = generator.encode([{"instruction": "Say yes."}])
    import torch

    with torch.no_grad():
        out = generator.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **generator.kwargs
        )
    new = out[0, input_ids.shape[1] :].tolist()
    assert generator.tokenizer.eos_token_id in new and len(new) < 40, "the model learned to stop"
    assert generator.generate([{"instruction": "Say yes."}]) == ["Yes."]


@pytest.fixture(scope="module")
def chat_stopper(tmp_path_factory):
    """Trained on two-exchange ChatML conversations (tokens new to tiny-llama) whose answers are 'Yes.'."""
    folder = tmp_path_factory.mktemp("chat-stop")
    turns = [("Say yes.", "Yes."), ("Once more.", "Yes.")]
    row = {
        "messages": [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    }
    data = write_rows(folder / "d.jsonl", [row] * 16)
    out = folder / "adapter"
    knobs = ["--learning_rate", 1e-2, "--lora_dropout", 0.0, "--quantization", "none", "--batch_size", 4]
    result = finetune(
        out, "--chat_template", "chatml", "--max_steps", 40, *knobs, "--micro_batch_size", 4, data_path=data
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_chat_model_stops_at_the_end_of_its_turn(chat_stopper):
    """The answer ends with <|im_end|>: no second turn, no text up to the token limit."""
    import torch

    generator = make_generator(chat_stopper, max_new_tokens=30)
    input_ids, _ = generator.encode([{"instruction": "Say yes."}])
    assert "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n" in generator.tokenizer.decode(input_ids[0])
    with torch.no_grad():
        out = generator.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **generator.kwargs
        )
    new = out[0, input_ids.shape[1] :].tolist()
    end_of_turn = generator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert new[-1] == end_of_turn and len(new) < 30, generator.tokenizer.decode(new)
    result = infer("--lora_weights", chat_stopper, "--prompt", "Say yes.", "--max_new_tokens", 30)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "Yes."


def test_cli_prompt_with_adapter_and_with_merged_model(stopper, tmp_path):
    result = infer("--lora_weights", stopper, "--prompt", "Say yes.", "--max_new_tokens", 20)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "Yes."
    assert merge_cli(stopper, tmp_path / "merged").returncode == 0
    result = infer("--base_model", tmp_path / "merged", "--prompt", "Say yes.", "--max_new_tokens", 20)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "Yes."


def test_base_model_alone(tmp_path):
    result = infer("--base_model", "builtin:tiny-llama", "--prompt", "What is 2 + 3?", "--max_new_tokens", 5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_prompts_file_round_trip(qlora_adapter, tmp_path, suffix):
    src = tmp_path / f"q{suffix}"
    if suffix == ".csv":
        pd.DataFrame([{"instruction": q["instruction"], "input": q.get("input", "")} for q in QUESTIONS]).to_csv(
            src, index=False
        )
    else:
        write_rows(src, QUESTIONS)
    dst = tmp_path / f"a{suffix}"
    result = infer(
        "--lora_weights",
        qlora_adapter,
        "--prompts_file",
        src,
        "--output_file",
        dst,
        "--max_new_tokens",
        8,
        "--batch_size",
        2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if suffix == ".csv":
        rows = pd.read_csv(dst, keep_default_na=False).to_dict("records")
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in dst.read_text().splitlines()]
    else:
        rows = json.loads(dst.read_text())
    assert [r["instruction"] for r in rows] == [q["instruction"] for q in QUESTIONS]
    assert all("response" in r for r in rows)
    assert "Generating" in result.stderr, "a progress bar over the prompts file"


def test_platypus_csv_flags(qlora_adapter, tmp_path):
    src = tmp_path / "q.csv"
    pd.DataFrame({"instruction": ["What is 2 + 3?"], "input": [""]}).to_csv(src, index=False)
    result = infer(
        "--lora_weights",
        qlora_adapter,
        "--csv_path",
        src,
        "--output_csv_path",
        tmp_path / "a.csv",
        "--max_new_tokens",
        4,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Platypus's inference.py writes its answers to model_output, which its downstream scripts read
    assert list(pd.read_csv(tmp_path / "a.csv").columns) == ["instruction", "input", "model_output"]
    assert "random tiny model" in result.stderr and "meaningless" in result.stderr


def assert_refused(result, *fragments):
    assert_user_error(result, "inference.py", *fragments)


def test_empty_prompts_file(qlora_adapter, tmp_path):
    assert_refused(
        infer("--lora_weights", qlora_adapter, "--prompts_file", write_rows(tmp_path / "q.json", [])),
        "holds no prompts",
    )


def test_missing_instruction_column(qlora_adapter, tmp_path):
    src = tmp_path / "q.csv"
    pd.DataFrame({"question": ["What?"]}).to_csv(src, index=False)
    assert_refused(infer("--lora_weights", qlora_adapter, "--csv_path", src), "no 'instruction' column", "question")


def test_unknown_template(qlora_adapter):
    assert_refused(
        infer("--lora_weights", qlora_adapter, "--prompt", "hi", "--prompt_template", "chatml"),
        "unknown template 'chatml'",
    )


@pytest.mark.parametrize(
    ("given", "chat", "template", "note"),
    [
        ({}, False, "alpaca", None),
        ({"prompt_template": "alpaca"}, False, "alpaca", None),
        ({"chat_template": False}, False, "alpaca", None),
        ({"prompt_template": "alpaca_short"}, False, "alpaca_short", "--prompt_template alpaca_short: prompts use"),
        ({"chat_template": True}, True, "alpaca", "--chat_template true: prompts use the tokenizer's chat template"),
    ],
)
def test_prompts_follow_the_record_unless_a_flag_says_otherwise(qlora_adapter, capsys, given, chat, template, note):
    """The adapter was trained with the Alpaca template: that by default, whatever the tokenizer carries; a flag
    that chooses otherwise is followed, with a line naming what the model was trained with."""
    from platy import cli, inference_stages

    flags = {**cli.entry_defaults(cli.script_entry("inference")), "lora_weights": str(qlora_adapter), "prompt": "x"}
    run = inference_stages.resolve({**flags, **given})
    assert run.chat_template is chat and run.prompter.name == template
    err = capsys.readouterr().err
    if note:
        assert f"{note}" in err and "the model was trained with the prompt template alpaca (its run_config.json)" in err
    else:
        assert "trained with" not in err


def test_adapter_for_another_base(qlora_adapter, tiny_llama_wide):
    assert_refused(
        infer("--lora_weights", qlora_adapter, "--base_model", tiny_llama_wide, "--prompt", "hi"),
        "does not fit --base_model",
    )


def test_no_prompt_source():
    assert_refused(infer("--base_model", "builtin:tiny-llama"), "exactly one of --prompt")


def test_interactive_streams_answers(stopper):
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "inference.py"),
            "--lora_weights",
            str(stopper),
            "--interactive",
            "--max_new_tokens",
            "20",
        ],
        input="Say yes.\n\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Yes." in proc.stdout


def test_adapter_answers_come_from_the_base_as_trained(qlora_adapter):
    result = infer("--lora_weights", qlora_adapter, "--prompt", "What is 2 + 3?", "--max_new_tokens", 4)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(4bit, as trained)" in result.stderr
    assert "Loading" not in result.stdout, "stdout holds only the answer"
    plain = make_generator(qlora_adapter, load_4bit=False)
    assert plain.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.__class__.__name__ == "Linear"
    trained = make_generator(qlora_adapter)
    assert trained.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.__class__.__name__ == "Linear4bit"


def test_template_error_names_this_scripts_flag(qlora_adapter, tmp_path):
    assert_refused(
        infer("--lora_weights", qlora_adapter, "--prompt", "hi", "--prompt_template", tmp_path / "nope.json"),
        "--prompt_template",
        "template file not found",
    )


def test_top_p_without_sampling_is_refused(qlora_adapter):
    assert_refused(
        infer("--lora_weights", qlora_adapter, "--prompt", "hi", "--top_p", 0.9), "--top_p applies to sampling"
    )


def test_messages_rows_are_answered_with_the_chat_template(chat_stopper, stopper, tmp_path):
    """--prompts_file with messages and ShareGPT rows ending with a user turn: each answered in its
    conversation, other columns kept, written back as messages; refused where they cannot be."""
    ask = {"role": "user", "content": "Say yes."}
    rows = [
        {"id": 1, "messages": [ask]},
        {
            "id": 2,
            "messages": [ask, {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Once more."}],
        },
        {"id": 3, "conversations": [{"from": "human", "value": "Say yes."}]},
    ]
    src, dst = write_rows(tmp_path / "q.jsonl", rows), tmp_path / "a.jsonl"
    result = infer("--lora_weights", chat_stopper, "--prompts_file", src, "--output_file", dst, "--max_new_tokens", 12)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [a["id"] for a in answers] == [1, 2, 3] and [a["response"] for a in answers] == ["Yes."] * 3
    assert answers[1]["messages"] == rows[1]["messages"] and answers[2]["messages"] == [ask]
    assert "conversations" not in answers[2]

    # several exchanges on a model without a chat template; a conversation that does not end with a question
    result = infer("--lora_weights", stopper, "--prompts_file", src, "--output_file", tmp_path / "b.jsonl")
    assert_user_error(result, "inference.py", f"--prompts_file {src}: row 2: a conversation of several exchanges")
    assert not (tmp_path / "b.jsonl").exists()
    answered = write_rows(tmp_path / "done.jsonl", [{"messages": [ask, {"role": "assistant", "content": "Yes."}]}])
    result = infer("--lora_weights", chat_stopper, "--prompts_file", answered)
    assert_user_error(result, "inference.py", "row 1: the conversation must end with the user turn to answer")


def test_interactive_keeps_the_conversation_until_cleared(tokenizer, monkeypatch, capsys):
    from platy import inference_stages

    class Recorder:
        chat, asked = True, []

        def __init__(self):
            self.tokenizer = tokenizer

        def generate(self, rows, streamer=None):
            self.asked.append([dict(m) for m in rows[0]["messages"]])
            return [f"answer {len(self.asked)}"]

    lines = iter(["Hello.", "And then?", "/clear", "New topic.", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    inference_stages.interactive_loop(Recorder())
    assert Recorder.asked == [
        [{"role": "user", "content": "Hello."}],
        [
            {"role": "user", "content": "Hello."},
            {"role": "assistant", "content": "answer 1"},
            {"role": "user", "content": "And then?"},
        ],
        [{"role": "user", "content": "New topic."}],
    ]
    assert "/clear starts a new conversation" in capsys.readouterr().out
