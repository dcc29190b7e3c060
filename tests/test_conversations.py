"""Conversations: rows, chat templates, assistant-only labels, end-of-turn tokens, cutting and packing."""

import copy
import json

import pytest

from platy.data.examples import IGNORE_INDEX, ExampleTokenizer, prepare_tokenizer
from platy.data.rows import normalise_rows
from platy.prompts import ChatTemplate, Prompter

from conftest import REPO, assert_user_error, finetune, write_rows

CONVERSATIONS = REPO / "tests" / "fixtures" / "conversations.jsonl"
THREE_TURNS = [
    {"role": "system", "content": "You are a terse tutor."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Eleven."},
    {"role": "user", "content": "Is 9 one?"},
    {"role": "assistant", "content": "No: 3 times 3."},
]


@pytest.fixture
def fresh_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(tiny_llama)))


def example_of(tokenizer, messages, template, **kwargs):
    """(ids, labels) of one conversation row."""
    chat = ChatTemplate.resolve(template, tokenizer)
    if chat is not None:
        chat.bind(tokenizer)
    kwargs = {"cutoff_len": 512, **kwargs}
    examples = ExampleTokenizer(tokenizer, Prompter("alpaca"), chat_template=chat, **kwargs)
    out = examples({"instruction": [""], "input": [""], "output": [""], "messages": [messages]})
    return out["input_ids"][0], out["labels"][0], chat


def label_pieces(tokenizer, labels):
    """The labelled stretches of a row, each decoded with its special tokens."""
    pieces, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    return pieces


@pytest.mark.parametrize("turns", [5, 7])  # a system message and 2 or 3 exchanges
@pytest.mark.parametrize(("template", "end"), [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_chat_labels_are_the_assistant_turns_and_their_end_of_turn_token(fresh_tokenizer, template, end, turns):
    messages = THREE_TURNS[:turns]
    ids, labels, chat = example_of(fresh_tokenizer, messages, template)
    expected = [m["content"] + end for m in messages if m["role"] == "assistant"]
    assert label_pieces(fresh_tokenizer, labels) == expected
    assert chat.end_of_turn == (end,)
    rendered = fresh_tokenizer.apply_chat_template(messages, chat_template=chat.text, tokenize=True)
    assert ids == rendered["input_ids"], "the ids are those of the whole rendered conversation"
    assert len(fresh_tokenizer) == 1024 + len(chat.control_tokens()), "the template's tokens were added"


def test_alpaca_template_renders_a_conversation_turn_by_turn(fresh_tokenizer):
    prompter = Prompter("alpaca")
    ids, labels, _ = example_of(fresh_tokenizer, THREE_TURNS, "none")
    answers = [m["content"] for m in THREE_TURNS if m["role"] == "assistant"]
    assert label_pieces(fresh_tokenizer, labels) == [a + "</s>" for a in answers]
    text = (
        prompter.generate_prompt(THREE_TURNS[0]["content"], THREE_TURNS[1]["content"])
        + "Seven.</s>"
        + prompter.generate_prompt("Another?")
        + "Eleven.</s>"
        + prompter.generate_prompt("Is 9 one?")
        + "No: 3 times 3.</s>"
    )
    assert ids[0] == fresh_tokenizer.bos_token_id and fresh_tokenizer.decode(ids[1:]) == text


def test_end_of_turn_stays_a_label_when_pad_is_eos(fresh_tokenizer):
    """The collator pads labels with -100 by position, never by id: EOS (= pad here) stays a target."""
    from transformers import DataCollatorForSeq2Seq

    fresh_tokenizer.pad_token = fresh_tokenizer.eos_token
    long_ids, long_labels, _ = example_of(fresh_tokenizer, THREE_TURNS, "none")
    short_ids, short_labels, _ = example_of(fresh_tokenizer, THREE_TURNS[1:3], "none")
    collate = DataCollatorForSeq2Seq(fresh_tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    batch = collate(
        [
            {"input_ids": i, "attention_mask": [1] * len(i), "labels": la}
            for i, la in ((long_ids, long_labels), (short_ids, short_labels))
        ]
    )
    eos = fresh_tokenizer.eos_token_id
    assert batch["labels"][0].tolist().count(eos) == 3 and batch["labels"][1].tolist().count(eos) == 1
    assert batch["labels"][1].tolist()[len(short_ids) :] == [IGNORE_INDEX] * (len(long_ids) - len(short_ids))


def test_train_on_inputs_labels_everything(fresh_tokenizer):
    ids, labels, _ = example_of(fresh_tokenizer, THREE_TURNS, "chatml", train_on_inputs=True)
    assert labels == ids


def test_a_long_conversation_keeps_whole_turns_and_an_open_cut_turn(fresh_tokenizer):
    full_ids, full_labels, chat = example_of(fresh_tokenizer, THREE_TURNS, "chatml")
    end = chat.end_of_turn_ids(fresh_tokenizer)[0]
    last_end = max(i for i, label in enumerate(full_labels) if label == end)
    cutoff = last_end - 2  # inside the last assistant turn
    ids, labels, _ = example_of(fresh_tokenizer, THREE_TURNS, "chatml", cutoff_len=cutoff)
    assert ids == full_ids[:cutoff] and labels == full_labels[:cutoff]
    assert labels.count(end) == 2, "the cut turn did not end: no end-of-turn token"
    # cut inside the third user turn: that turn goes, the two answered turns stay whole
    third_user = fresh_tokenizer.decode(full_ids).index("Is 9 one?")
    prefix = [i for i in range(len(full_ids)) if len(fresh_tokenizer.decode(full_ids[: i + 1])) <= third_user]
    ids, labels, _ = example_of(fresh_tokenizer, THREE_TURNS, "chatml", cutoff_len=prefix[-1] + 3)
    assert labels[-1] == end and label_pieces(fresh_tokenizer, labels) == ["Seven.<|im_end|>", "Eleven.<|im_end|>"]


@pytest.mark.parametrize("template", ["chatml", "none"])  # a chat template, and the Alpaca one turn by turn
def test_turns_beyond_the_cutoff_are_left_out_before_rendering(fresh_tokenizer, template, monkeypatch):
    chat = ChatTemplate.resolve(template, fresh_tokenizer)
    if chat is not None:
        chat.bind(fresh_tokenizer)
    capped = ExampleTokenizer(fresh_tokenizer, Prompter("alpaca"), cutoff_len=48, chat_template=chat)
    too_long = {"role": "user", "content": "x" * 3 * capped.max_row_chars}
    long = [THREE_TURNS[0]] + THREE_TURNS[1:5] * 40 + [too_long, THREE_TURNS[6]]
    rows = [long, [too_long, *THREE_TURNS[2:]]]
    batch = {"instruction": [""] * 2, "input": [""] * 2, "output": [""] * 2, "messages": rows}
    whole = copy.copy(capped)
    whole.max_turns, whole.max_row_chars = 10**9, 10**12  # no caps: every turn rendered, then cut
    expected = whole.compact(batch)
    rendered, encoded = [], []
    render, encode = ChatTemplate.render, ExampleTokenizer.encode

    def seen_render(self, tokenizer, conversations, **kwargs):
        rendered.extend(conversations)
        texts = render(self, tokenizer, conversations, **kwargs)
        encoded.extend(texts)  # what is rendered is tokenized
        return texts

    def seen_encode(self, texts):
        encoded.extend(texts)
        return encode(self, texts)

    monkeypatch.setattr(ChatTemplate, "render", seen_render)
    monkeypatch.setattr(ExampleTokenizer, "encode", seen_encode)
    assert capped.compact(batch) == expected  # the same ids, labels and counts
    assert expected["truncated"] == [True, True] and expected["n_response"][1] == 0  # nothing fits after too_long
    assert max(map(len, rendered), default=0) <= 49, "no conversation rendered beyond cutoff_len + 1 turns"
    assert max(map(len, encoded)) < capped.max_row_chars + 1000, "no text tokenized far past max_row_chars"


BAD_ROWS = [
    (
        {"messages": [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Q?"}]},
        "turn 1 is an assistant turn",
    ),
    (
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": " "}]},
        "turn 2 (assistant) is blank",
    ),
    ({"conversations": [{"from": "system", "value": "S."}, {"from": "human", "value": "Q?"}]}, "ends with a user turn"),
    ({"messages": "Q? A."}, "'messages' is str, not a list of turns"),
]


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS)
def test_bad_conversation_rows_are_refused_with_a_reason(row, reason):
    good = {"messages": THREE_TURNS}
    clean, rejects = normalise_rows([good, row], "data.json")
    assert clean == [{"messages": THREE_TURNS}]
    assert [(number, reason in why) for number, why, _ in rejects] == [(2, True)], rejects


def test_bad_conversation_rows_through_the_command_line(tmp_path):
    rows = [{"messages": THREE_TURNS}, BAD_ROWS[0][0], {"instruction": "Hi.", "output": "Hello."}, BAD_ROWS[3][0]]
    out = tmp_path / "out"
    result = finetune(out, "--chat_template", "chatml", data_path=write_rows(tmp_path / "bad.json", rows))
    assert_user_error(result, "finetune.py", "row 2: turn 1 is an assistant turn", "row 4: 'messages' is str")
    assert not out.exists(), "nothing written"


def test_mixed_rows_and_conversation_forms_normalise(tmp_path):
    share = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}] * 2}
    clean, rejects = normalise_rows([share, {"instruction": "I.", "output": "O."}], "mixed.json")
    assert not rejects
    assert clean[0] == {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}] * 2}
    assert clean[1] == {"instruction": "I.", "input": "", "output": "O."}
    one = copy.deepcopy(share)
    one["conversations"] = one["conversations"][:2]
    (entry,), _ = normalise_rows([one], "one.json")
    assert entry["instruction"] == "Q?" and entry["output"] == "A." and len(entry["messages"]) == 2


def test_unknown_chat_template_and_auto_without_one(tmp_path, fresh_tokenizer):
    from platy.cli import UserError

    with pytest.raises(UserError, match="--chat_template auto: the base model's tokenizer has no chat_template"):
        ChatTemplate.resolve("auto", fresh_tokenizer)
    result = finetune(tmp_path / "o", "--chat_template", "chatmll", "--dry_run", "true")
    assert_user_error(result, "finetune.py", "--chat_template: unknown chat template 'chatmll'")
    assert json.loads(CONVERSATIONS.read_text().splitlines()[0])["messages"][0]["role"] == "system"


# the first Meta-Llama-3-Instruct release's template: the assistant header follows every rendering
LLAMA3_FIRST_RELEASE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
# SmolLM2-Instruct's: a default system prompt where the conversation has none
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("turns", [3, 5, 7])
@pytest.mark.parametrize(
    ("text", "end"), [(LLAMA3_FIRST_RELEASE, "<|eot_id|>"), (SMOLLM2, "<|im_end|>")], ids=["llama3-first", "smollm2"]
)
def test_published_chat_templates_give_exact_assistant_labels(fresh_tokenizer, tmp_path, text, end, turns):
    """A template that appends the generation prompt to every rendering, and one that inserts a default system
    prompt, label exactly the assistant turns with their end-of-turn token; the ids are apply_chat_template's."""
    messages = THREE_TURNS[:turns] if turns != 3 else THREE_TURNS[1:3]  # 3: no system message
    path = tmp_path / "published.jinja"
    path.write_text(text)
    ids, labels, chat = example_of(fresh_tokenizer, messages, str(path))
    assert chat.end_of_turn == (end,)
    assert label_pieces(fresh_tokenizer, labels) == [m["content"] + end for m in messages if m["role"] == "assistant"]
    rendered = fresh_tokenizer.apply_chat_template(messages, chat_template=text, tokenize=True)
    assert ids == rendered["input_ids"]


def test_a_template_that_reorders_turns_is_refused(fresh_tokenizer, tmp_path):
    path = tmp_path / "reversed.jinja"
    path.write_text(
        "{% for message in messages | reverse %}{{ message['role'] + ': ' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    from platy.cli import UserError

    with pytest.raises(UserError, match="reversed.jinja: the assistant turn's rendering does not follow"):
        example_of(fresh_tokenizer, THREE_TURNS, str(path))
