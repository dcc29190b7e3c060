"""ChatML on a base without its tokens: the grown vocabulary trains, merges and generates."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, finetune, merge_cli

CONVERSATIONS = REPO / "tests" / "fixtures" / "conversations.jsonl"
TASKS = REPO / "tests" / "fixtures" / "eval_tasks"
TABLES = {"model.embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}


@pytest.fixture(scope="module")
def chatml_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("chatml") / "adapter"
    result = finetune(
        out, "--chat_template", "chatml", "--max_steps", 2, "--learning_rate", 5e-3, data_path=CONVERSATIONS
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "New tokens 1024-1025" in result.stdout
    return out


def test_new_rows_train_and_merge_while_old_rows_stay(chatml_adapter, tiny_llama, tmp_path):
    base = load_file(tiny_llama / "model.safetensors")
    saved = load_file(chatml_adapter / "adapter_model.safetensors")
    result = merge_cli(chatml_adapter, tmp_path / "m", "--method", "peft", "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load_file(tmp_path / "m" / "model.safetensors")
    for module, name in TABLES.items():
        old = base[name]
        trained = saved[f"base_model.model.{module}.token_adapter.trainable_tokens_delta"]
        assert merged[name].shape == (old.shape[0] + 2, old.shape[1])
        assert torch.equal(merged[name][: old.shape[0]], old), name  # the base's rows as they were
        assert torch.equal(merged[name][old.shape[0] :], trained), name  # the new rows as trained
        # they moved away from where resizing started them (the mean of the old rows)
        assert (trained - old.mean(0)).abs().max() > 1e-3, name


@pytest.mark.parametrize(
    "indices, fragment",
    [
        ([10**9, 10**9 + 1], "holds a value that is no token id"),
        ([1024, 1024], "names a token id twice"),
        ("1024", "is str, not a list of token ids"),
    ],
)
def test_trainable_token_indices_are_checked_before_they_size_anything(chatml_adapter, tmp_path, indices, fragment):
    import shutil

    from conftest import assert_user_error, reseal

    bad = tmp_path / "bad"
    shutil.copytree(chatml_adapter, bad, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((bad / "adapter_config.json").read_text())
    config["trainable_token_indices"] = {module.rsplit(".", 1)[-1]: indices for module in TABLES}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    reseal(bad)
    result = merge_cli(bad, tmp_path / "m")
    assert_user_error(result, "merge.py", "adapter_config.json's trainable_token_indices", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_recorded_vocabulary_larger_than_the_new_rows_is_refused(chatml_adapter, tmp_path):
    import shutil

    from conftest import assert_user_error, reseal

    bad = tmp_path / "bad"
    shutil.copytree(chatml_adapter, bad, ignore=shutil.ignore_patterns("checkpoint-*"))
    record = json.loads((bad / "run_config.json").read_text())
    record["resolved"]["chat_template"]["vocabulary"] = 10**9  # would be a 10**9-row embedding
    (bad / "run_config.json").write_text(json.dumps(record))
    reseal(bad)
    result = merge_cli(bad, tmp_path / "m")
    assert_user_error(result, "merge.py", "its vocabulary of 1,000,000,000 tokens is larger than the base's 1,024 rows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_merged_model_has_the_grown_vocabulary_and_answers(chatml_adapter, tmp_path):
    from transformers import AutoTokenizer

    result = merge_cli(chatml_adapter, tmp_path / "m", "--method", "dequant", "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Verify: PASS" in result.stdout
    merged = tmp_path / "m"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == len(tokenizer) == 1026
    assert "<|im_start|>" in tokenizer.chat_template
    # both cards say which chat template the model speaks, and where the stop token is
    assert "**Chat template:** chatml (each turn ends with `<|im_end|>`" in (chatml_adapter / "README.md").read_text()
    card = (merged / "README.md").read_text()
    assert "## Chat template (chatml)" in card and "```jinja\n" in card and "<|im_start|>" in card
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    for source in ({"base_model": str(merged)}, {"lora_weights": str(chatml_adapter)}):
        answer = answer_of(prompt="Name a prime.", max_new_tokens=6, **source)
        assert answer.strip(), source


def answer_of(**given):
    """inference.py's answer to --prompt (in this process: the model loads as the command line loads it)."""
    from platy import cli, inference_stages

    flags = {**cli.entry_defaults(cli.script_entry("inference")), **given}
    generator = inference_stages.prepare(flags)
    return generator.generate([{"instruction": flags["prompt"], "input": ""}])[0]


def test_lm_eval_scores_the_grown_model_and_adapter_with_the_chat_template(chatml_adapter, tmp_path):
    """evaluate.py --apply_chat_template on the merged model and on the adapter: both load with 1026 rows, the
    harness gets the template and the system instruction, and the tables' heading says so."""
    import sys

    from conftest import run_cli

    merged = tmp_path / "m"
    assert merge_cli(chatml_adapter, merged, "--dtype", "float32").returncode == 0
    out = tmp_path / "eval"
    args = ["--models", f"{merged},{chatml_adapter}", "--suite", "tiny_gen", "--include_path", TASKS, "--limit", 2]
    args += ["--apply_chat_template", "True", "--system_instruction", "Answer briefly.", "--output_dir", out]
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = run_cli([sys.executable, str(REPO / "evaluate.py"), *map(str, args)], cwd=TASKS, env=offline)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = (out / "results.md").read_text()
    assert tables.startswith(
        "Prompts: each model's chat template (--apply_chat_template); few-shot examples as earlier turns; "
        "system instruction 'Answer briefly.'."
    )
    harness = [json.loads(p.read_text()) for p in sorted(out.glob("*/*-shot.json"))]
    assert len(harness) == 2
    for results in harness:
        config = results["config"]
        assert "<|im_start|>" in config["chat_template"] and config["system_instruction"] == "Answer briefly."
        assert config["fewshot_as_multiturn"] is True
    flags = json.loads((out / "eval_config.json").read_text())["flags"]
    assert flags["apply_chat_template"] is True and flags["system_instruction"] == "Answer briefly."


def test_a_model_without_a_chat_template_is_refused_before_loading(tmp_path, tiny_llama):
    import sys

    from conftest import assert_user_error, run_cli

    args = ["--models", tiny_llama, "--suite", "tiny_gen", "--include_path", TASKS, "--apply_chat_template", "True"]
    args += ["--fewshot_as_multiturn", "True", "--output_dir", tmp_path / "eval"]
    result = run_cli([sys.executable, str(REPO / "evaluate.py"), *map(str, args)], env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(result, "evaluate.py", f"--apply_chat_template: {tiny_llama} has no chat template")
    assert not (tmp_path / "eval").exists()
