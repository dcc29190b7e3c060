"""RunRecord (platy/record.py): every run_config.json the toolkit has written reads, answers as the file
says and writes back unchanged; and it is the only reader of that file in the project.

The fixtures under fixtures/run_configs/ were written by the toolkit as it was before the record (commit
0ab859f): finetune.py on builtin:tiny-llama with data/sample_platypus.json, --max_steps 2 --batch_size 2
--micro_batch_size 1 --cutoff_len 64 --report_to none --save_steps 1, plus the flags in each name:
qlora (the defaults), chatml (--chat_template chatml), full (--quantization none --finetuning full),
eightbit (--quantization 8bit), loftq (--init_lora_weights loftq --loftq_iter 2), pissa
(--init_lora_weights pissa --quantization none), val (--val_set_size 8), checkpoint (qlora's checkpoint-1)
and merged (merge.py --peft_model_path of the qlora run: the copy in the merged folder).
"""

import ast
import json
import shutil
from pathlib import Path

import pytest

from platy.record import RecordedChatTemplate, RunRecord

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "run_configs"
NAMES = ("qlora", "chatml", "full", "eightbit", "loftq", "pissa", "val", "checkpoint", "merged")


def fixture(name, tmp_path):
    """The fixture as a folder's run_config.json, the way every reader finds it."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(FIXTURES / f"{name}.json", folder / "run_config.json")
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_every_fixture_reads_and_writes_back_unchanged(name, tmp_path):
    folder = fixture(name, tmp_path)
    record = RunRecord.read(folder)
    text = (folder / "run_config.json").read_text(encoding="utf-8")
    assert record.to_dict() == json.loads(text)
    assert RunRecord.from_dict(json.loads(text)).to_dict() == json.loads(text)
    out = tmp_path / "out"
    out.mkdir()
    record.write(out)
    assert (out / "run_config.json").read_bytes() == (folder / "run_config.json").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_the_properties_answer_as_the_file_says(name, tmp_path):
    record = RunRecord.read(fixture(name, tmp_path))
    raw = json.loads((FIXTURES / f"{name}.json").read_text())
    resolved = raw["resolved"]
    assert record.base_model == raw["flags"]["base_model"] == "builtin:tiny-llama"
    assert record.base_model_path == resolved["base_model_path"]
    assert record.model_type == "llama"
    assert record.template_name == "alpaca" and record.template["prompt_no_input"].endswith("### Response:\n")
    assert record.precision == resolved["precision"] == "fp32"
    assert record.data_path == "data/sample_platypus.json"
    assert record.data_fingerprint.startswith("sha256:")
    assert record.train_stats["kept"] == raw["data"]["train"]["kept"] > 0
    assert record.strategy == "single"
    assert record.command.startswith("python finetune.py --base_model builtin:tiny-llama")
    assert record.versions == raw["versions"] and record.flags == raw["flags"]
    assert record.finished is (name != "checkpoint")
    assert record.global_step == (None if name == "checkpoint" else 2)


def test_quantization_and_adapter_kind_per_run(tmp_path):
    read = {name: RunRecord.read(fixture(name, tmp_path)) for name in NAMES}
    quantization = {name: record.quantization for name, record in read.items()}
    assert quantization == {
        **dict.fromkeys(("qlora", "chatml", "loftq", "val", "checkpoint", "merged"), "4bit"),
        "full": "none",
        "eightbit": "8bit",
        "pissa": "none",
    }
    assert read["qlora"].quantization_layout["quant_type"] == "nf4"
    assert read["eightbit"].quantization_layout["quantization"] == "8bit"
    assert read["full"].quantization_layout is None and read["pissa"].quantization_layout is None
    assert read["full"].finetuning == "full"
    assert read["full"].lora_scale is None and read["full"].lora_target_modules is None
    assert read["qlora"].finetuning == "lora" and read["qlora"].lora_scale == 1.0
    assert read["qlora"].lora_target_modules == ["gate_proj", "down_proj", "up_proj"]
    assert read["pissa"].init_lora_weights == "pissa" and read["qlora"].init_lora_weights == "default"


def test_chat_template_and_vocabulary(tmp_path):
    chatml = RunRecord.read(fixture("chatml", tmp_path))
    chat = chatml.chat_template
    raw = json.loads((FIXTURES / "chatml.json").read_text())["resolved"]["chat_template"]
    assert isinstance(chat, RecordedChatTemplate) and chat.name == "chatml"
    assert chat.end_of_turn == tuple(raw["end_of_turn"]) == ("<|im_end|>",)
    assert chatml.vocabulary == chat.vocabulary == raw["vocabulary"]
    assert chat.eos_token_id == tuple(raw["eos_token_id"]) and "<|im_start|>" in chat.text
    assert chat.to_dict() == raw
    plain = RunRecord.read(fixture("qlora", tmp_path))
    assert plain.chat_template is None and plain.vocabulary is None


def test_loftq_report_and_whether_offsets_belong(tmp_path):
    loftq = RunRecord.read(fixture("loftq", tmp_path))
    report = json.loads((FIXTURES / "loftq.json").read_text())["resolved"]["loftq"]
    assert loftq.loftq == report and report["iterations"] == 2
    assert report["relative_error_after"] < report["relative_error_before"]
    assert loftq.loftq_iterations == 2 and loftq.has_loftq_offsets
    plain = RunRecord.read(fixture("qlora", tmp_path))
    assert plain.loftq is None and plain.loftq_iterations == 1 and not plain.has_loftq_offsets


def test_validation_stats_recorded(tmp_path):
    val = RunRecord.read(fixture("val", tmp_path))
    assert val.flag("val_set_size") == 8 and val.data["val"]
    assert val.result["eval_loss"] is not None
    assert RunRecord.read(fixture("qlora", tmp_path)).result["eval_loss"] is None


def test_a_minimal_old_file_without_optional_sections(tmp_path):
    """An early run_config.json: no data, no result, no chat template, layout or LoftQ, no finetuning flag."""
    old = {
        "flags": {"base_model": "../llama-7b", "data_path": "old.json", "init_lora_weights": None},
        "resolved": {"base_model_path": "/models/llama-7b", "template": {"name": "alpaca"}},
        "versions": {"torch": "2.1.0"},
    }
    (tmp_path / "run_config.json").write_text(json.dumps(old, indent=2))
    record = RunRecord.read(tmp_path)
    assert record.to_dict() == old
    assert (record.base_model, record.base_model_path) == ("../llama-7b", "/models/llama-7b")
    assert record.template_name == "alpaca" and record.template == {"name": "alpaca"}
    assert record.chat_template is None and record.vocabulary is None
    assert record.quantization_layout is None and record.quantization == "none"
    assert record.loftq is None and record.loftq_iterations == 1 and not record.has_loftq_offsets
    assert record.finetuning == "lora" and record.lora_scale is None and record.precision is None
    assert record.data == {} and record.data_path is None and record.data_fingerprint is None
    assert record.train_stats == {} and record.result is None and record.global_step is None
    assert not record.finished and record.command is None and record.strategy is None
    empty = RunRecord.from_dict({})
    assert empty.base_model is None and empty.template is None and empty.flags == {} and empty.to_dict() == {}


def test_no_file_is_none_and_a_damaged_one_raises(tmp_path):
    assert RunRecord.read(tmp_path) is None
    assert RunRecord.read(tmp_path / "missing") is None
    (tmp_path / "run_config.json").write_text('{"flags": {')
    with pytest.raises(json.JSONDecodeError):
        RunRecord.read(tmp_path)


@pytest.mark.parametrize("name", ("chatml", "loftq", "checkpoint"))
def test_the_writer_builds_the_same_file_through_the_constructor_and_setters(name, tmp_path):
    """As finetune.py builds it: the sections at start, then data, layout, LoftQ, chat template, result."""
    raw = json.loads((FIXTURES / f"{name}.json").read_text())
    later = ("quantization_layout", "loftq", "chat_template")
    resolved = {k: v for k, v in raw["resolved"].items() if k not in later}
    record = RunRecord(flags=raw["flags"], resolved=resolved, versions=raw["versions"], command=raw["command"])
    record.set_data(raw["data"])
    record.set_quantization_layout(raw["resolved"]["quantization_layout"])
    if "loftq" in raw["resolved"]:
        record.set_loftq(raw["resolved"]["loftq"])
    if "chat_template" in raw["resolved"]:
        chat = raw["resolved"]["chat_template"]
        record.set_chat_template(RecordedChatTemplate(**{**chat, "end_of_turn": tuple(chat["end_of_turn"])}))
    if "result" in raw:
        record.set_result(raw["result"])
    record.write(tmp_path)
    assert (tmp_path / "run_config.json").read_bytes() == (FIXTURES / f"{name}.json").read_bytes()


def test_the_card_reads_the_record(tmp_path):
    """adapter_card takes the record and shows what it holds."""
    from platy.model_card import adapter_card

    folder = fixture("chatml", tmp_path)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 16, "target_modules": ["up_proj"]}))
    record = RunRecord.read(folder)
    card = adapter_card(record, folder)
    assert "Chat template:** chatml (each turn ends with `<|im_end|>`" in card
    assert "| lora scale | 1.0 |" in card and "`sample_platypus.json` (fingerprint `sha256:" in card


# ---- the record is the only reader of run_config.json ----------------------------------------------

FILE_NAME = "run_config.json"


def is_the_file(node):
    return (
        (isinstance(node, ast.Name) and node.id == "RUN_CONFIG")
        or (isinstance(node, ast.Attribute) and node.attr == "RUN_CONFIG")
        or (isinstance(node, ast.Constant) and node.value == FILE_NAME)
    )


def file_readers(tree):
    """Lines that open run_config.json or read it through read_run_config: a path to the file used for
    anything but asking whether it exists, removing it or printing it."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.Name, ast.Attribute, ast.alias)):
            name = getattr(node, "name", None) or getattr(node, "id", None) or getattr(node, "attr", None)
            if name == "read_run_config":
                lines.append(getattr(node, "lineno", None) or parents[node].lineno)
        path = isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and is_the_file(node.right)
        named = isinstance(node, ast.Call) and any(is_the_file(arg) for arg in node.args)
        if path or named:
            parent = parents.get(node)
            checked = isinstance(parent, ast.Attribute) and parent.attr in ("exists", "is_file", "unlink")
            if not (checked or isinstance(parent, ast.FormattedValue)):
                lines.append(node.lineno)
    return sorted(set(lines))


def project_sources():
    scripts = [p for p in REPO.glob("*.py")]
    return sorted([*scripts, *(REPO / "platy").rglob("*.py"), *(REPO / "bench").rglob("*.py")])


def test_only_the_record_reads_run_config():
    readers = {}
    for path in project_sources():
        name = path.relative_to(REPO).as_posix()
        if name == "platy/record.py":
            continue
        lines = file_readers(ast.parse(path.read_text(encoding="utf-8")))
        if lines:
            readers[name] = lines
    assert not readers, f"run_config.json read outside platy/record.py (use RunRecord.read): {readers}"


def test_the_reader_check_sees_a_reader():
    source = (
        "import json\nfrom platy.files import RUN_CONFIG, read_run_config\n"
        "a = json.loads((folder / 'run_config.json').read_text())\n"
        "b = read_run_config(folder)\n"
        "c = (folder / RUN_CONFIG).exists()\n"
        "say(f'{folder / RUN_CONFIG}')\n"
        "d = open(Path(folder, 'run_config.json'))\n"
    )
    assert file_readers(ast.parse(source)) == [2, 3, 4, 7]
    assert file_readers(ast.parse((REPO / "platy" / "record.py").read_text())) != []


def test_the_prompt_format_is_the_chat_template_else_the_prompt_template(tmp_path):
    chatml = RunRecord.read(fixture("chatml", tmp_path)).prompt_format
    assert chatml.chat.name == "chatml" and "<|im_start|>" in chatml.chat.text
    assert chatml.describe() == "the chat template chatml"
    alpaca = RunRecord.read(fixture("qlora", tmp_path)).prompt_format
    assert alpaca.chat is None and alpaca.template["prompt_input"].startswith("Below is an instruction")
    assert alpaca.describe() == "the prompt template alpaca"
    # a checkpoint of a chat run: the template's text is recorded when the run ends, its name from the start
    raw = json.loads((FIXTURES / "chatml.json").read_text())
    del raw["resolved"]["chat_template"]
    assert RunRecord.from_dict(raw).prompt_format.chat == RecordedChatTemplate(name="chatml")
    assert RunRecord.from_dict({"flags": {}}).prompt_format is None
