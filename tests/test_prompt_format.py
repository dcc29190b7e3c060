"""One prompt format from training to every consumer, shown on the real instruct model builtin:smollm2-135m, whose
own chat template (ChatML that inserts a default system prompt) is neither the Alpaca template nor the shipped
chatml: inference.py (adapter and merged folder), the adapter's and the merged tokenizer's chat template, the GGUF
metadata, the Ollama Modelfile and the card's llama.cpp line all render the format the run record holds."""

from pathlib import Path

import pytest

from conftest import finetune, merge_cli, write_rows

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM"  # what SmolLM2's own template inserts
QUESTION = "Is 91 a prime number?"
ROWS = [
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
    {"instruction": "Say hi.", "output": "Hi."},
]


@pytest.fixture(scope="module")
def smollm2():
    """The converted SmolLM2 folder: the user's cache holds it after its first use (converting takes minutes)."""
    cached = Path.home() / ".cache" / "platy" / "smollm2-135m-v1"
    if (cached / "model.safetensors").is_file():
        return cached
    from platy import tiny

    return tiny.ensure_model("smollm2-135m")


def expected_prompt(chat):
    """How training laid out one question."""
    from platy.prompts import Prompter

    if chat == "none":
        return Prompter("alpaca").generate_prompt(QUESTION)
    return f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def prompt_text(generator):
    ids, _ = generator.encode([{"instruction": QUESTION}])
    return ids[0].tolist(), generator.tokenizer.decode(ids[0])


def generator_of(**flags):
    from platy import cli, inference_stages

    defaults = cli.entry_defaults(cli.script_entry("inference"))
    return inference_stages.prepare({**defaults, "prompt": QUESTION, "max_new_tokens": 4, **flags})


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    """{chat template flag: (adapter, merged folder)}: one optimizer step each, merged without --verify."""
    runs = {}
    for chat in ("none", "chatml"):
        folder = tmp_path_factory.mktemp(f"smollm2-{chat}")
        adapter, merged = folder / "adapter", folder / "merged"
        data = write_rows(folder / "rows.json", ROWS)
        knobs = ["--quantization", "none", "--max_steps", 1, "--batch_size", 2, "--micro_batch_size", 2]
        result = finetune(
            adapter, *knobs, "--cutoff_len", 64, "--chat_template", chat, base_model=smollm2, data_path=data
        )
        assert result.returncode == 0, result.stderr[-3000:]
        result = merge_cli(adapter, merged)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[chat] = adapter, merged
    return runs


@pytest.mark.parametrize("chat", ["none", "chatml"])
def test_every_consumer_follows_the_recorded_format(trained, chat):
    """The GGUF writer stores the chat template gguf's SpecialVocab reads from the merged folder (tests/test_gguf.py
    reads it back from the file); the Modelfile's TEMPLATE and the card's llama.cpp prompt come from the same."""
    import gguf
    from transformers import AutoTokenizer

    adapter, merged = trained[chat]
    expected = expected_prompt(chat)
    messages = [{"role": "user", "content": QUESTION}]

    ids, text = prompt_text(generator_of(lora_weights=str(adapter)))
    assert text == expected and DEFAULT_SYSTEM not in text
    assert prompt_text(generator_of(base_model=str(merged))) == (ids, text)
    for folder in (adapter, merged):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == ids

    assert gguf.SpecialVocab(merged, load_merges=False).chat_template == tokenizer.chat_template
    from platy.gguf_export import ollama_template
    from platy.model_card import llama_cpp_prompt

    template = ollama_template(merged)
    assert expected.replace(QUESTION, "{{ .Prompt }}") + "{{ .Response }}" in template
    assert DEFAULT_SYSTEM not in template and "{{ .System }}" in template
    assert llama_cpp_prompt(merged, QUESTION) == expected
    card = (merged / "README.md").read_text()
    assert ("## Chat template (chatml)" if chat == "chatml" else "## Prompt template (alpaca)") in card


def test_a_flag_overrides_the_recorded_format_with_a_note(trained, capsys):
    """--chat_template false on the adapter trained with chatml: the Alpaca template, and a line saying what the
    model was trained with. --chat_template true on the one trained with the Alpaca template: the tokenizer's chat
    template, which is that template written as one (the base's own, with its default system prompt, is gone)."""
    from platy.prompts import Prompter

    adapter, _ = trained["chatml"]
    _, text = prompt_text(generator_of(lora_weights=str(adapter), chat_template=False))
    assert text == Prompter("alpaca").generate_prompt(QUESTION)
    assert (
        "--chat_template false: prompts use the prompt template alpaca; the model was trained with the chat "
        "template chatml (its run_config.json)" in capsys.readouterr().err
    )
    adapter, _ = trained["none"]
    generator = generator_of(lora_weights=str(adapter), chat_template=True)
    assert generator.chat is not None and prompt_text(generator)[1] == expected_prompt("none")
    assert "--chat_template true: prompts use the tokenizer's chat template" in capsys.readouterr().err


def test_evaluate_applies_the_recorded_format_as_the_chat_template(qlora_adapter, capsys):
    """evaluate.py --apply_chat_template on an adapter trained with the Alpaca template: the harness's tokenizer
    gets that template written as a chat template, whatever chat template the tokenizer came with."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from platy.evaluate_stages import follow_recorded_format
    from platy.merging import Adapter
    from platy.prompts import Prompter

    tokenizer = AutoTokenizer.from_pretrained(qlora_adapter)
    tokenizer.chat_template = (Path(__file__).parent.parent / "templates" / "chatml.jinja").read_text()
    model = {"adapter": Adapter(qlora_adapter, "--models", merge=False), "spec": str(qlora_adapter), "label": "qlora"}
    follow_recorded_format(SimpleNamespace(tokenizer=tokenizer), model)
    messages = [{"role": "user", "content": QUESTION}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == tokenizer.bos_token + Prompter("alpaca").generate_prompt(QUESTION)
    assert "qlora: prompts laid out with the prompt template alpaca, as in training" in capsys.readouterr().out
