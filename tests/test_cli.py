"""Bad input through the real command line: one clear line, exit status 2, nothing written."""

import json

import pytest

from conftest import REPO, SAMPLE, finetune, run_cli, write_rows
from conftest import assert_user_error as shared_assert_user_error


def assert_user_error(result, *fragments):
    shared_assert_user_error(result, "finetune.py", *fragments)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "never-written"


def check(result, out, *fragments):
    assert_user_error(result, *fragments)
    assert not out.exists(), "nothing is written into output_dir"


def test_missing_data_file(out, tmp_path):
    check(finetune(out, data_path=tmp_path / "nope.json"), out, "--data_path", "nope.json", "not found")


def test_unreadable_data_file(out, tmp_path):
    # a file that exists but fails to read, even for root: /proc/self/mem at offset 0
    data = tmp_path / "rows.json"
    data.symlink_to("/proc/self/mem")
    check(finetune(out, data_path=data), out, "rows.json", "cannot read")


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("rows.txt", b"instruction: hi\n", ("unsupported file type", ".jsonl")),
        ("rows.json", b'[{"instruction": "a", "output": "b"}, {"instruction": ', ("not valid JSON",)),
        ("rows.parquet", b"not parquet at all", ("not valid PARQUET",)),
    ],
)
def test_file_that_is_not_a_supported_data_file(out, tmp_path, name, content, fragments):
    data = tmp_path / name
    data.write_bytes(content)
    check(finetune(out, data_path=data), out, name, *fragments)


def test_row_without_output_names_the_row(out, tmp_path):
    rows = json.loads(SAMPLE.read_text())[:5] + [{"instruction": "What is 1 + 1?"}]
    check(finetune(out, data_path=write_rows(tmp_path / "d.jsonl", rows)), out, "row 6", "missing 'output'")


def test_non_string_value_names_the_row(out, tmp_path):
    rows = [{"instruction": "a", "output": "x"}, {"instruction": "b", "output": 3}]
    check(finetune(out, data_path=write_rows(tmp_path / "d.json", rows)), out, "row 2", "'output' is int")


def test_empty_data_set_after_filtering(out):
    check(finetune(out, "--cutoff_len", 16), out, "no training example keeps any response token", "--cutoff_len")


def test_empty_file(out, tmp_path):
    check(finetune(out, data_path=write_rows(tmp_path / "d.json", [])), out, "no rows")


def test_unknown_template(out):
    check(
        finetune(out, "--prompt_template_name", "vicuna"),
        out,
        "--prompt_template_name",
        "unknown template",
        "alpaca_short",
    )


def test_base_model_path_does_not_exist(out, tmp_path):
    check(finetune(out, base_model=tmp_path / "no-model"), out, "--base_model", "does not exist")


def test_base_model_hub_id_offline(out):
    check(
        finetune(out, base_model="nobody/no-such-model", env={"HF_HUB_OFFLINE": "1"}),
        out,
        "--base_model nobody/no-such-model",
        "cannot load its config",
    )


def test_resume_checkpoint_does_not_exist(out, tmp_path):
    check(
        finetune(out, "--resume_from_checkpoint", tmp_path / "checkpoint-9"),
        out,
        "--resume_from_checkpoint",
        "folder not found",
    )


def test_resume_auto_without_checkpoint(out):
    check(finetune(out, "--resume_from_checkpoint", "auto"), out, "no complete, undamaged checkpoint")


def test_batch_sizes_that_do_not_divide(out):
    check(finetune(out, "--batch_size", 6, "--micro_batch_size", 4), out, "--batch_size 6", "--micro_batch_size 4")


def test_target_module_the_model_lacks_lists_its_linear_layers(out):
    check(
        finetune(out, "--lora_target_modules", "[gate_proj, c_attn]"),
        out,
        "c_attn",
        "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    )


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--quantization", "3bit"], "--quantization 3bit"),
        (["--precision", "fp16"], "fp16 mixed precision needs a CUDA GPU"),
        (["--wandb_project", "demo", "--report_to", "none"], "--wandb_project is set but --report_to"),
        (["--report_to", "mlflow"], "--report_to mlflow"),
        (["--eval_steps", "5"], "--eval_steps needs held-out rows"),
        (["--val_set_size", "5000"], "--val_set_size 5000"),
        (["--lr_scheduler", "cosine_annealing"], "--lr_scheduler cosine_annealing"),
        (["--double_quant", "True", "--quantization", "none"], "--double_quant needs --quantization 4bit"),
        (["--deepspeed", "/no/ds_config.json"], "--deepspeed /no/ds_config.json"),
        (["--micro_batch_size", "0"], "--micro_batch_size must be a positive integer"),
    ],
)
def test_flag_problems(out, extra, fragment):
    check(finetune(out, *extra), out, fragment)


def test_required_flags():
    result = run_cli(["python", str(REPO / "finetune.py")])
    assert_user_error(result, "--base_model is required", "--data_path is required")


def test_dash_spelling_of_data_path(tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        [
            "python",
            str(REPO / "finetune.py"),
            "--base_model",
            "builtin:tiny-llama",
            "--data-path",
            str(SAMPLE),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--batch_size",
            "2",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file()


def test_traceback_on_request(out, tmp_path):
    result = finetune(out, data_path=tmp_path / "nope.json", env={"PLATY_TRACEBACK": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_unknown_flag_is_refused_before_anything_runs(out):
    check(finetune(out, "--lerning_rate", "1e-4"), out, "unknown flag --lerning_rate", "did you mean --learning_rate")


@pytest.mark.parametrize(
    "word, expected", [("false", 5705), ("FALSE", 5705), ("no", 5705), ("0", 5705), ("true", None), ("Yes", None)]
)
def test_boolean_words(tmp_path, word, expected):
    result = finetune(tmp_path / "o", "--train_on_inputs", word, "--max_steps", 1, "--cutoff_len", 4096)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "o" / "run_config.json").read_text())
    assert config["flags"]["train_on_inputs"] is (expected is None)
    labels = config["data"]["train"]["label_tokens"]
    assert (labels == expected) if expected else labels > 5705


def test_non_boolean_word_is_refused(out):
    check(finetune(out, "--overwrite", "maybe"), out, "--overwrite 'maybe': give True or False")


def test_help_lists_every_flag_on_stdout():
    from platy.train.flags import TRAIN_FLAGS

    result = run_cli(["python", str(REPO / "finetune.py"), "--help"])
    assert result.returncode == 0
    for name in TRAIN_FLAGS.names():
        assert f"--{name} (default:" in result.stdout, name
    assert "builtin:tiny-llama" in result.stdout and "response cut by cutoff_len ends without EOS" in " ".join(
        result.stdout.split()
    )


def test_csv_without_output_column_names_the_columns(out, tmp_path):
    import pandas as pd

    data = tmp_path / "d.csv"
    pd.DataFrame({"instruction": ["a", "b"], "response": ["x", "y"]}).to_csv(data, index=False)
    check(finetune(out, data_path=data), out, "no 'output' column", "instruction, response")


def test_typo_in_a_local_path_is_not_sent_to_the_hub(out):
    result = finetune(out, data_path="data/sample_platypus.jsn")
    check(result, out, "file not found: data/sample_platypus.jsn")
    result = finetune(out, base_model="data/llama-7b")
    check(result, out, "--base_model data/llama-7b: folder does not exist")


def test_text_flags_are_passed_verbatim():
    """Values are read as literals; text flags keep exactly what was typed."""
    from platy.flags import Flag, Flags

    show = Flags(
        Flag("prompt", None, str, ""),
        Flag("input", None, str, ""),
        Flag("output_dir", None, str, ""),
        Flag("batch_size", 1, int, ""),
    )
    argv = ["--prompt", "1e3", "--input", "12, 30", "--output_dir=2024", "--batch_size", "4"]
    assert tuple(show.parse(argv, "show.py").values()) == ("1e3", "12, 30", "2024", 4)


def test_non_numeric_hyperparameters(out):
    check(finetune(out, "--weight_decay", "abc", "--lora_alpha", "x"), out, "--weight_decay must be", "--lora_alpha")


def test_zero3_with_a_quantized_base_is_refused(out, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    check(finetune(out, "--deepspeed", config), out, "ZeRO-3", "ZeRO-2")


def test_incomplete_checkpoint_is_refused(out, tmp_path):
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    check(finetune(out, "--resume_from_checkpoint", folder), out, "incomplete", "optimizer.pt")


def test_flag_check_reports_every_value_problem_at_once_without_reading_anything():
    """check_flags looks at the values only: a missing file is resolve's to find, after every value is good."""
    from platy.train.config import check_flags
    from platy.train.flags import TRAIN_FLAGS

    flags = {**TRAIN_FLAGS.defaults(), "base_model": "/no/such/model", "data_path": "/no/such/rows.json"}
    assert check_flags(flags) == []
    flags.update(
        warmup_steps=True, micro_batch_size=0, lr_scheduler="cosine_annealing", packing=False, micro_batch_tokens=8192
    )
    problems = check_flags(flags)
    assert "--warmup_steps must be a non-negative integer, got True" in problems  # a bool is not a step count
    assert "--micro_batch_size must be a positive integer, got 0" in problems
    assert any(p.startswith("--lr_scheduler cosine_annealing: choose one of") for p in problems)
    assert "--micro_batch_tokens fills each micro-step with packed examples: add --packing true" in problems
    assert "--micro_batch_tokens replaces --micro_batch_size (got 0); drop --micro_batch_size" in problems
    assert len(problems) == 5
