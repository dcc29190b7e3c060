"""merge.py: fidelity of both methods, output format, model card, streaming, atomic output, bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, assert_user_error, finetune, merge_cli, reseal

PROMPTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nWhat is 12 + 30?\n\n### Response:\n",
    "### Instruction:\nIs 91 a prime number?\n\n### Response:\nNo. 91 = 7 x 13",
    "다음 두 수의 합을 구하시오. 12, 30",
]


def logits_of(model, tokenizer):
    out = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tokenizer(text, return_tensors="pt")
            out.append(model(**ids).logits.float())
    return torch.cat(out, dim=1)


def reference_logits(adapter, base_path, quantization="4bit"):
    """Base as trained (4-bit) + adapter: what the adapter is meant to do."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from platy.modeling import load_model

    model = load_model(str(base_path), quantization, "fp32", placement={"": "cpu"}, flag="--base_model")
    base_logits = logits_of(model, AutoTokenizer.from_pretrained(adapter))
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return logits_of(model, AutoTokenizer.from_pretrained(adapter)), base_logits


def merged_logits(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return logits_of(model, AutoTokenizer.from_pretrained(folder))


def base_path_of(adapter):
    return json.loads((adapter / "run_config.json").read_text())["resolved"]["base_model_path"]


def test_dequant_merge_matches_4bit_base_plus_adapter(qlora_adapter, tmp_path):
    result = merge_cli(qlora_adapter, tmp_path / "m", "--dtype", "float32", "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    reference, base = reference_logits(qlora_adapter, base_path_of(qlora_adapter))
    merged = merged_logits(tmp_path / "m")
    assert (reference - base).abs().max() > 0.1, "the adapter really changes the model"
    assert (merged - reference).abs().max() < 1e-4
    assert "dequant merge" in result.stdout
    read_back = next(x for x in result.stdout.splitlines() if x.startswith("Read back "))
    assert read_back.startswith("Read back ") and "sizes and sha256 as written; not checked: README.md" in read_back
    files = int(read_back.split()[2])  # the shard and every companion: config, tokenizer, run record
    assert files == len([p for p in (tmp_path / "m").iterdir() if p.name not in ("README.md", "merge_config.json")])
    line = next(x for x in result.stdout.splitlines() if x.startswith("Verify:"))
    assert float(line.split("difference| ")[1].split()[0]) < 1e-4 and "agreement 100.0%" in line


def test_dequant_is_closer_than_peft_for_a_qlora_adapter(qlora_adapter, tmp_path):
    for method in ("dequant", "peft"):
        assert merge_cli(qlora_adapter, tmp_path / method, "--method", method, "--dtype", "float32").returncode == 0
    reference, _ = reference_logits(qlora_adapter, base_path_of(qlora_adapter))
    dequant = (merged_logits(tmp_path / "dequant") - reference).abs().max()
    peft = (merged_logits(tmp_path / "peft") - reference).abs().max()
    assert dequant * 100 < peft, (dequant, peft)


def test_the_logit_tolerance_follows_the_scale_of_the_logits():
    """k units of the exported dtype's rounding (its eps) at the largest reference logit, with the derivation."""
    from platy.merge_stages import verdict

    report = {"max_abs_diff": 0.1, "agreement": 1.0, "positions": 10, "prompts": 1, "max_abs_logit": 30.0}
    report["reference_dtype"] = "float32"  # the reference's compute precision: on a CPU, float32
    judged = verdict(report, "float16")
    assert judged["verdict"] == "PASS" and judged["tolerance"]["max_abs_diff"] == pytest.approx(8 * 2**-10 * 30)
    assert judged["tolerance"]["derivation"] == "8 x float16 eps 0.00098 x max |logit| 30"
    assert verdict({**report, "max_abs_logit": 3.0}, "float16")["verdict"] == "WARN"  # logits 10 x smaller
    assert verdict(report, "float32")["verdict"] == "WARN"  # 64 x 1.2e-7 x 30 = 2.3e-4
    assert verdict({**report, "agreement": 0.98}, "bfloat16")["verdict"] == "WARN"
    on_a_gpu = verdict({**report, "max_abs_diff": 1.5, "reference_dtype": "bfloat16"}, "float16")
    assert on_a_gpu["verdict"] == "PASS" and on_a_gpu["tolerance"]["max_abs_diff"] == pytest.approx(8 * 2**-7 * 30)
    assert (
        on_a_gpu["tolerance"]["derivation"]
        == "8 x bfloat16 eps 0.0078 (the reference computed in bfloat16) x max |logit| 30"
    )


def wrong_merge(monkeypatch, fault):
    """The streaming merge made wrong on purpose: every update scaled by 2, or layer 1's updates left out."""
    from platy import merging

    scale, add_to = merging.Adapter.scale, merging.Adapter.add_to
    if fault == "scaled":
        monkeypatch.setattr(merging.Adapter, "scale", lambda self, module: 2 * scale(self, module))
    elif fault == "layer_missing":
        monkeypatch.setattr(
            merging.Adapter,
            "add_to",
            lambda self, module, weight: weight if ".layers.1." in module else add_to(self, module, weight),
        )


def verify_report(adapter, output_dir):
    result = merge_cli(adapter, output_dir, "--dtype", "float16", "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("Verify:"))
    return json.loads((output_dir / "merge_config.json").read_text())["verify"], line, result.stdout


@pytest.mark.parametrize("fault", [None, "scaled", "layer_missing"])
def test_verify_passes_a_float16_merge_and_warns_on_a_wrong_one(qlora_adapter, tmp_path, monkeypatch, fault):
    wrong_merge(monkeypatch, fault)
    verify, line, out = verify_report(qlora_adapter, tmp_path / "m")
    tolerance = verify["tolerance"]["max_abs_diff"]
    assert f"(tolerance {tolerance:.2g} = 8 x float16 eps 0.00098 x max |logit| " in line
    if fault is None:
        assert verify["verdict"] == "PASS" and line.startswith("Verify: PASS") and verify["max_abs_diff"] < tolerance
    else:
        assert verify["verdict"] == "WARN" and verify["max_abs_diff"] > 10 * tolerance, verify
        assert "Warning: the merged model does not reproduce base + adapter" in out


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory):
    """The real model with an adapter of the quick start's kind (16-bit base, every linear layer) after one step
    at a large learning rate: its effect on the logits is far above float16's rounding."""
    folder = tmp_path_factory.mktemp("smollm2") / "adapter"
    result = finetune(
        folder,
        *("--quantization", "none", "--lora_target_modules", "all-linear", "--learning_rate", 5e-3),
        *("--max_steps", 1, "--batch_size", 2, "--micro_batch_size", 2, "--cutoff_len", 64),
        base_model="builtin:smollm2-135m",
        data_path=REPO / "data" / "toolcalls" / "train.json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_verify_warns_on_a_wrong_merge_of_the_real_model(smollm2_adapter, tmp_path, monkeypatch):
    """SmolLM2-135M's logits reach about 30, where float16 rounds in steps of 0.016: the tolerance grows with
    them, and a merge with one layer's update missing still stays far outside it. (A correct float16 merge of the
    real model passes: tests/test_distributed.py, the README's quick start.)"""
    wrong_merge(monkeypatch, "layer_missing")
    verify, _, _ = verify_report(smollm2_adapter, tmp_path / "m")
    assert verify["verdict"] == "WARN" and verify["max_abs_diff"] > 3 * verify["tolerance"]["max_abs_diff"], verify
    assert verify["max_abs_logit"] > 10, verify


def test_streaming_peft_merge_equals_peft_in_memory_merge(lora_adapter, tmp_path):
    """For an adapter trained without quantization, auto picks peft; equal to peft's merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = merge_cli(lora_adapter, tmp_path / "m", "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peft merge" in result.stdout
    base = AutoModelForCausalLM.from_pretrained(base_path_of(lora_adapter), dtype=torch.float32)
    in_memory = PeftModel.from_pretrained(base, str(lora_adapter)).merge_and_unload().state_dict()
    streamed = load_file(tmp_path / "m" / "model.safetensors")
    assert streamed.keys() == in_memory.keys()
    for name, tensor in streamed.items():
        torch.testing.assert_close(tensor, in_memory[name], rtol=0, atol=1e-6, msg=name)


def test_biases_are_kept_and_merge_is_faithful(qwen2_adapter, tiny_qwen2, tmp_path):
    result = merge_cli(qwen2_adapter, tmp_path / "m", "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load_file(tmp_path / "m" / "model.safetensors")
    base = load_file(tiny_qwen2 / "model.safetensors")
    biases = [k for k in base if k.endswith("bias")]
    assert biases and all(torch.equal(merged[k], base[k]) for k in biases)
    reference, _ = reference_logits(qwen2_adapter, tiny_qwen2)
    assert (merged_logits(tmp_path / "m") - reference).abs().max() < 1e-4


def test_shards_dtype_config_and_reload(qlora_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    result = merge_cli(qlora_adapter, out, "--dtype", "bfloat16", "--max_shard_size", "300KB")
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).stat().st_size < 300_000 + 200_000 for s in shards)
    tensors = {}
    for shard in shards:
        tensors.update(load_file(out / shard))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert set(index["weight_map"]) == set(tensors)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and not getattr(model, "is_loaded_in_4bit", False)


def test_default_is_float16(qlora_adapter, tmp_path):
    assert merge_cli(qlora_adapter, tmp_path / "m").returncode == 0
    assert {t.dtype for t in load_file(tmp_path / "m" / "model.safetensors").values()} == {torch.float16}


def test_model_card_describes_the_model(qlora_adapter, tmp_path):
    assert merge_cli(qlora_adapter, tmp_path / "m").returncode == 0
    card = (tmp_path / "m" / "README.md").read_text()
    run = json.loads((qlora_adapter / "run_config.json").read_text())
    assert "base_model:" not in card.split("---")[1], "a builtin base names no hub page"
    assert "fine-tuned with QLoRA" in card and "- qlora" in card
    assert "`sample_platypus.json`" in card and run["data"]["path"] not in card, "the file's name, not a machine path"
    assert "not checked (merge with `--verify`" in card
    assert "| learning rate | 0.005 |" in card and "| lora rank | 16 |" in card
    assert "| lora target modules | down_proj, gate_proj, up_proj |" in card
    assert "`dequant`" in card and "4bit nf4" in card
    assert "python merge.py" in card


def test_checkpoint_folder_merges_too(qlora_adapter, tmp_path):
    result = merge_cli(qlora_adapter / "checkpoint-4", tmp_path / "m")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dequant merge" in result.stdout


def test_eval_forward_does_not_corrupt_what_dequantize_returns(qlora_adapter):
    """bitsandbytes' CPU eval path repacks 4-bit weights; the toolkit's loader keeps them intact."""
    import bitsandbytes.functional as bnbf

    from platy.quantized import rebuild_quantized

    run = json.loads((qlora_adapter / "run_config.json").read_text())
    from platy.modeling import load_model

    model = load_model(
        run["resolved"]["base_model_path"], "4bit", "fp32", placement={"": "cpu"}, flag="--base_model"
    ).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 12]]))
    layer = model.model.layers[0].mlp.down_proj
    original = load_file(run["resolved"]["base_model_path"] + "/model.safetensors")[
        "model.layers.0.mlp.down_proj.weight"
    ]
    expected = rebuild_quantized(original, run["resolved"]["quantization_layout"])
    got = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- nothing lost, bad input -------------------------------------------------------------


def assert_refused(result, *fragments):
    assert_user_error(result, "merge.py", *fragments)


def tree(folder):
    """Every file under folder with its bytes: what a refused merge must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_merge_replaces_only_an_earlier_merge_and_only_when_asked(qlora_adapter, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):
        refused = merge_cli(qlora_adapter, mine, *extra)
        assert_refused(refused, f"--output_dir {mine} is not empty", "keep.txt", "choose a new or empty folder")
    assert tree(mine) == {Path("keep.txt"): b"mine"}
    out = tmp_path / "m"
    assert merge_cli(qlora_adapter, out).returncode == 0
    assert_refused(merge_cli(qlora_adapter, out), "holds a model merged earlier", "pass --overwrite to replace it")
    result = merge_cli(qlora_adapter, out, "--overwrite", "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "merge_config.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "mine"], "no temporary folder left behind"


def test_overwrite_never_touches_a_folder_holding_the_base(qlora_adapter, tiny_llama, tmp_path, monkeypatch):
    """merge.py --output_dir ./models --overwrite with the base in ./models/llama-2-13b; the home folder."""
    import shutil

    models = tmp_path / "models"
    base = models / "llama-2-13b"
    shutil.copytree(tiny_llama, base)
    (models / "notes.txt").write_text("mine")
    before = tree(models)
    for out in (models, base, base / "merged"):
        result = merge_cli(qlora_adapter, out, "--base_model", base, "--overwrite")
        assert_refused(result, f"--output_dir {out} ", "choose a new or empty folder")
    assert "is inside the base model folder" in result.stderr
    assert tree(models) == before
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert_refused(merge_cli(qlora_adapter, home, "--overwrite"), f"--output_dir {home} is the home folder")
    assert list(home.iterdir()) == []


def test_nan_adapter_is_refused_and_nothing_written(qlora_adapter, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(qlora_adapter, bad, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors = load_file(bad / "adapter_model.safetensors")
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name][0, 0] = math.nan
    save_file(tensors, bad / "adapter_model.safetensors")
    reseal(bad)  # saved so by a run that diverged
    assert_refused(merge_cli(bad, tmp_path / "m"), "NaN or inf", name)
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_adapter_for_another_base_is_refused(qlora_adapter, tiny_llama_wide, tmp_path):
    out = tmp_path / "m"
    result = merge_cli(qlora_adapter, out, "--base_model", tiny_llama_wide)
    assert_refused(result, "adapter does not fit the base model", "mlp")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "key, value",
    [("load_dtype", "Tensor"), ("blocksize", 1 << 40), ("quant_storage", "__class__"), ("double_quant", 1)],
)
def test_a_recorded_quantization_layout_is_checked_before_use(qlora_adapter, tmp_path, key, value):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(qlora_adapter, bad, ignore=shutil.ignore_patterns("checkpoint-*"))
    record = json.loads((bad / "run_config.json").read_text())
    record["resolved"]["quantization_layout"][key] = value
    (bad / "run_config.json").write_text(json.dumps(record))
    reseal(bad)  # a received adapter: anyone can recompute its manifest
    assert_refused(merge_cli(bad, tmp_path / "m"), "run_config.json's quantization_layout", f"'{key}' is")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--method", "slerp"], "--method slerp"),
        (["--dtype", "int4"], "--dtype int4"),
        (["--max_shard_size", "big"], "--max_shard_size big"),
        (["--base_model", "/no/such/base"], "does not exist"),
    ],
)
def test_bad_flags(qlora_adapter, tmp_path, extra, fragment):
    assert_refused(merge_cli(qlora_adapter, tmp_path / "m", *extra), fragment)
    assert not (tmp_path / "m").exists()


def test_missing_adapter_path(tmp_path):
    assert_refused(merge_cli(tmp_path / "nothing", tmp_path / "m"), "--peft_model_path", "not found")


def test_dequant_needs_a_quantized_training_run(lora_adapter, tmp_path):
    assert_refused(merge_cli(lora_adapter, tmp_path / "m", "--method", "dequant"), "--method peft")


def test_output_dir_may_not_be_the_adapter_or_a_file(qlora_adapter, tmp_path):
    before = sorted(p.name for p in qlora_adapter.iterdir())
    assert_refused(merge_cli(qlora_adapter, qlora_adapter, "--overwrite"), "adapter folder")
    assert_refused(merge_cli(qlora_adapter, qlora_adapter / "merged"), "adapter folder")
    assert sorted(p.name for p in qlora_adapter.iterdir()) == before
    a_file = tmp_path / "model.md"
    a_file.write_text("notes")
    assert_refused(merge_cli(qlora_adapter, a_file, "--overwrite"), "is a file")
    assert a_file.read_text() == "notes" and sorted(p.name for p in tmp_path.iterdir()) == ["model.md"]


def test_partial_folder_of_a_killed_merge_is_cleaned_and_output_is_readable(qlora_adapter, tmp_path):
    import os

    stale = tmp_path / ".m.partial-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    result = merge_cli(qlora_adapter, tmp_path / "m")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not stale.exists() and "left by an interrupted merge" in result.stdout
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask


def test_card_of_a_checkpoint_has_no_unknowns(qlora_adapter, tmp_path):
    assert merge_cli(qlora_adapter / "checkpoint-4", tmp_path / "m").returncode == 0
    card = (tmp_path / "m" / "README.md").read_text()
    assert "?" not in card.split("## Hyperparameters")[0]
    assert "intermediate checkpoint" in card and "### Response:" in card


def test_shard_size_below_the_largest_tensor_is_refused(qlora_adapter, tmp_path):
    assert_refused(
        merge_cli(qlora_adapter, tmp_path / "m", "--max_shard_size", "300"),
        "--max_shard_size",
        "smaller than the tensor",
    )
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_per_module_rank_and_alpha_match_peft(tiny_llama, tmp_path):
    """rank_pattern / alpha_pattern keyed by full module path: the streaming merge scales as peft does."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["down_proj", "up_proj"],
        init_lora_weights=False,
        rank_pattern={"model.layers.0.mlp.down_proj": 2},
        alpha_pattern={"model.layers.0.mlp.down_proj": 32, "up_proj": 4},
    )
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    result = merge_cli(tmp_path / "adapter", tmp_path / "m", "--base_model", tiny_llama, "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    expected = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    merged = load_file(tmp_path / "m" / "model.safetensors")
    for name in (
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    ):
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_previous_model_moved_aside_by_a_killed_merge_is_restored(qlora_adapter, tmp_path):
    aside = tmp_path / ".m.old-999999999"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"previous")
    result = merge_cli(qlora_adapter, tmp_path / "m")
    assert result.returncode == 2 and "not empty" in result.stderr  # restored first, then protected
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == b"previous" and not aside.exists()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--method", "dequant"], "--method dequant: the adapter was trained on a 4bit base, and rebuilding it"),
        (["--method", "peft", "--verify"], "--verify: the adapter was trained on a 4bit base, and loading it"),
    ],
)
def test_missing_bitsandbytes_is_named_in_merges_own_flags(qlora_adapter, tmp_path, monkeypatch, extra, fragment):
    """Without bitsandbytes a QLoRA adapter's base cannot be rebuilt or loaded: said before anything is written."""
    from platy import cli, modeling
    from platy.cli import UserError

    monkeypatch.setattr(modeling, "bitsandbytes_missing", lambda quantization: quantization != "none")
    out = tmp_path / "merged"
    argv = ["--peft_model_path", str(qlora_adapter), "--output_dir", str(out), *extra]
    with pytest.raises(UserError, match=f"^{fragment} needs bitsandbytes: pip install bitsandbytes, or "):
        cli.call(cli.script_entry("merge"), argv)
    assert not out.exists()
