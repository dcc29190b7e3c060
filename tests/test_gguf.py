"""merge.py --gguf: GGUF files that transformers' independent GGUF loader reads back as the merged model.

Three tiny models, each merged from a trained QLoRA adapter: Llama with a sentencepiece tokenizer,
Mistral with a Llama-3-style byte-level BPE tokenizer and Qwen2 (attention biases) with a Qwen2-style
one and a ChatML chat template.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys

import pytest
import torch

from conftest import REPO, assert_user_error, build_model, finetune, merge_cli, run_cli

TYPES = "f16,q8_0"
# largest logit difference to the merged (float16) model: f16 stores the same numbers; q8_0 rounds
# every weight to 8 bits per block of 32
TOLERANCE = {"f16": 1e-5, "q8_0": 0.05}
TEXTS = (
    "다음 두 수의 합을 구하시오: 12, 30. 한국어 문장도 바이트 단위로 나뉩니다.",
    "Emoji 😀🎉👍🏽 and symbols © ± ∑ ≠",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nIs 91 a prime number?\n\n### Response:\n",
)


def bpe_model(tmp_path_factory, arch, split):
    from platy.tiny import train_byte_level_tokenizer

    tokenizer_dir = tmp_path_factory.mktemp(f"{arch}-bpe-tokenizer")
    tokenizer = train_byte_level_tokenizer(tokenizer_dir, split=split)
    folder = build_model(tmp_path_factory.mktemp(f"{arch}-bpe"), arch, tokenizer_dir)
    generation = json.loads((folder / "generation_config.json").read_text())
    # a chat model stops at the end of its turn as well as at EOS
    generation["eos_token_id"] = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama):
    """{family: QLoRA adapter}: three short trainings (4-bit base, large learning rate)."""
    from platy.gguf_export import PRE_TOKENIZERS

    bases = {"llama": tiny_llama}
    for arch, split in (("mistral", PRE_TOKENIZERS["llama-bpe"]), ("qwen2", PRE_TOKENIZERS["qwen2"])):
        bases[arch] = bpe_model(tmp_path_factory, arch, split)
    folders = {family: tmp_path_factory.mktemp(f"{family}-qlora") / "adapter" for family in bases}
    for family, base in bases.items():
        run = finetune(folders[family], "--learning_rate", 1e-2, base_model=base)
        assert run.returncode == 0, run.stderr[-3000:]
    return folders


@pytest.fixture(scope="module")
def exports(tmp_path_factory, adapters):
    """{family: (merged folder with -f16.gguf and -q8_0.gguf, adapter, printed output)}: merge.py's entry
    run once per model with --verify."""
    from platy import cli

    folders = {}
    for family, adapter in adapters.items():
        out = tmp_path_factory.mktemp(f"{family}-merged") / f"tiny-{family}"
        printed = io.StringIO()
        argv = ["--peft_model_path", str(adapter), "--output_dir", str(out), "--gguf", TYPES, "--verify"]
        with contextlib.redirect_stdout(printed):
            cli.call(cli.script_entry("merge"), argv)
        folders[family] = (out, adapter, printed.getvalue())
    return folders


def logits(model, tokenizer):
    with torch.no_grad():
        return torch.cat([model(**tokenizer(text, return_tensors="pt")).logits.float() for text in TEXTS], dim=1)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_transformers_reads_the_gguf_back_as_the_merged_model(exports, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, adapter, _ = exports[family]
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tokenizer)
    base_path = json.loads((adapter / "run_config.json").read_text())["resolved"]["base_model_path"]
    base = logits(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), tokenizer)
    assert (merged - base).abs().max() > 0.1, "the fine-tune changes the model, so a GGUF of the base would fail"
    for gguf_type, tolerance in TOLERANCE.items():
        name = f"{out.name}-{gguf_type}.gguf"
        rebuilt = AutoTokenizer.from_pretrained(out, gguf_file=name)
        for text in TEXTS:
            assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"], (gguf_type, text)
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
        difference = (logits(model, tokenizer) - merged).abs().max().item()
        assert difference < tolerance, (gguf_type, difference)


def read_metadata(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.t")}


def test_metadata_special_tokens_template_and_modelfile(exports):
    from transformers import AutoTokenizer

    from platy.prompts import Prompter

    expected_pre = {"llama": "default", "mistral": "llama-bpe", "qwen2": "qwen2"}
    for family, (out, _, _) in exports.items():
        tokenizer = AutoTokenizer.from_pretrained(out)
        meta = read_metadata(out / f"{out.name}-q8_0.gguf")
        assert meta["general.architecture"] == ("qwen2" if family == "qwen2" else "llama")
        assert meta["general.name"] == out.name and meta["general.base_model.0.name"]
        assert meta["general.dataset.0.name"].endswith("sample_platypus.json")
        assert meta["tokenizer.ggml.model"] == ("llama" if family == "llama" else "gpt2")
        assert meta["tokenizer.ggml.pre"] == expected_pre[family]
        assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
        assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
        # always written: without it llama.cpp adds a BOS to Llama-graph prompts (the BPE Mistral has none)
        assert meta["tokenizer.ggml.add_bos_token"] == (family == "llama")
        modelfile = (out / "Modelfile").read_text()
        assert f"FROM ./{out.name}-f16.gguf" in modelfile
        # trained with the Alpaca template (the bases with a ChatML template too): the file and the Modelfile
        # lay prompts out with it, never with the base's own template
        alpaca = Prompter("alpaca").generate_prompt("{{ .Prompt }}") + "{{ .Response }}"
        assert alpaca in modelfile and "<|im_start|>" not in modelfile
        assert meta["tokenizer.chat_template"] == tokenizer.chat_template
        question = [{"role": "user", "content": "Q"}]
        rendered = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
        bos = tokenizer.bos_token if family == "llama" else ""  # the BPE tokenizers add no BOS
        assert rendered == bos + Prompter("alpaca").generate_prompt("Q")
        assert f'PARAMETER stop "{tokenizer.eos_token}"' in modelfile
        if family == "llama":
            assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
        else:  # a base whose turns end with <|im_end|>: the end of turn travels
            assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
            assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_verify_figures_go_to_merge_config_and_the_card(exports):
    out, _, stdout = exports["qwen2"]
    info = json.loads((out / "merge_config.json").read_text())
    assert list(info["gguf"]) == ["f16", "q8_0"]
    for gguf_type, entry in info["gguf"].items():
        assert entry["file"] == f"{out.name}-{gguf_type}.gguf"
        assert entry["bytes"] == (out / entry["file"]).stat().st_size
        assert entry["sha256"] == hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest()
        assert entry["verify"]["verdict"] == "PASS" and entry["verify"]["max_abs_diff"] < TOLERANCE[gguf_type]
        assert entry["verify"]["tokenizer_same_ids"] == entry["verify"]["tokenizer_texts"]
        assert f"Verify GGUF {gguf_type}:" in stdout
    assert info["gguf"]["q8_0"]["bytes"] < 0.7 * info["gguf"]["f16"]["bytes"]
    card = (out / "README.md").read_text()
    assert f"| `{out.name}-q8_0.gguf` | q8_0 |" in card and "PASS" in card
    assert f"llama-cli -m {out.name}-f16.gguf" in card and "ollama create" in card
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporary file left"


def test_check_verifies_the_gguf_files_the_modelfile_and_the_chat_template(exports, tmp_path):
    """merge.py --check holds every file the merge wrote to its recorded sha256: a flipped byte in a GGUF
    file, the Modelfile or the chat template is found like one in a shard."""
    out = exports["qwen2"][0]
    check = [sys.executable, str(REPO / "merge.py"), "--check"]
    good = run_cli([*check, out])
    assert good.returncode == 0, good.stderr[-2000:]
    recorded = json.loads((out / "merge_config.json").read_text())
    files = {*recorded["checksums"], *(entry["file"] for entry in recorded["gguf"].values()), "Modelfile"}
    assert f"Checked {out}: {len(files)} file(s)" in good.stdout
    assert sorted(files) == sorted(p.name for p in out.iterdir() if p.name not in ("merge_config.json", "README.md"))
    for name in (f"{out.name}-q8_0.gguf", "Modelfile", "chat_template.jinja"):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / name).write_bytes(bytes(data))
        told = f"{copy}: {name} is damaged: its sha256 differs from the one in merge_config.json"
        assert_user_error(run_cli([*check, copy]), "merge.py", told)


# ---- bad input: one line, exit 2 (74 for a full disk), nothing half-written ----------------------------


def assert_nothing_written(tmp_path, *keep):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


@pytest.mark.parametrize(
    "types, fragment",
    [
        ("q9_0", "--gguf q9_0: unknown type; choose from f16, bf16, q8_0"),
        ("f16,q4_k_m", "--gguf q4_k_m: the gguf package cannot write k-quants; export f16 and run llama.cpp's"),
    ],
)
def test_unknown_types_are_refused_before_anything(adapters, tmp_path, types, fragment):
    assert_user_error(merge_cli(adapters["llama"], tmp_path / "m", "--gguf", types), "merge.py", fragment)
    assert_nothing_written(tmp_path)


def test_an_unsupported_architecture_is_refused_before_anything(adapters, tiny_llama, tmp_path):
    other = tmp_path / "phi3-shaped"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    result = merge_cli(adapters["llama"], tmp_path / "m", "--gguf", "q8_0", "--base_model", other)
    supported = "GGUF export supports Llama (Llama-2/3, Yi), Mistral and Qwen2"
    assert_user_error(result, "merge.py", "--gguf: the model is phi3 (Phi3ForCausalLM)", supported)
    assert_nothing_written(tmp_path, "phi3-shaped")


def test_a_missing_gguf_package_is_named_with_its_install_command(adapters, tmp_path):
    shadow = tmp_path / "no-gguf" / "gguf"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'gguf'\")\n")
    path = os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])
    result = merge_cli(adapters["llama"], tmp_path / "m", "--gguf", "q8_0", env={"PYTHONPATH": path})
    assert_user_error(result, "merge.py", "--gguf: the gguf package is missing: pip install gguf")
    assert not (tmp_path / "m").exists()


def test_a_full_disk_while_writing_a_gguf_leaves_no_partial_file(adapters, tmp_path):
    from conftest import REPO

    out = tmp_path / "m"
    env = {"PYTHONPATH": str(REPO / "tests" / "faults"), "PLATY_FAULT": "enospc_in_write=-q8_0.gguf"}
    result = merge_cli(adapters["llama"], out, "--gguf", "f16,q8_0", env=env)
    assert result.returncode == 74, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("merge.py: error: writing m-q8_0.gguf failed: No space left on device"), line
    assert f"the merged model in {out} is complete and so are m-f16.gguf" in line
    assert "Traceback" not in result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "m-f16.gguf" in names and "model.safetensors" in names
    assert not [n for n in names if "q8_0" in n or n.startswith(".")], names


def test_merge_sh_passes_gguf(tmp_path):
    """GGUF= in merge.sh becomes --gguf (a bad type shows it reached merge.py)."""
    result = run_cli(
        ["bash", "merge.sh"],
        env={
            "GGUF": "q9_0",
            "PEFT_MODEL_PATH": str(tmp_path / "a"),
            "OUTPUT_DIR": str(tmp_path / "m"),
            "PYTHON": sys.executable,
        },
    )
    assert_user_error(result, "merge.py", "--gguf q9_0: unknown type")


# the types the merge tests above do not write: their largest logit difference to the merged model
# (bf16: 8 bits of mantissa; q5 / q4: 5 / 4 bits per weight in blocks of 32)
OTHER_TOLERANCE = {"bf16": 0.02, "q5_1": 0.15, "q5_0": 0.15, "q4_1": 0.4, "q4_0": 0.4}


def test_the_other_types_load_back_within_their_rounding(exports, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from platy.gguf_export import write_gguf

    out = tmp_path / "llama"
    shutil.copytree(exports["llama"][0], out, ignore=shutil.ignore_patterns("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tokenizer)
    sizes = {}
    for gguf_type, tolerance in OTHER_TOLERANCE.items():
        info = write_gguf(out, gguf_type, out / f"m-{gguf_type}.gguf", {"name": "m", "description": "test"})
        sizes[gguf_type] = info["bytes"]
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=info["file"], dtype=torch.float32)
        difference = (logits(model, tokenizer) - merged).abs().max().item()
        assert difference < tolerance, (gguf_type, difference)
    assert sizes["q4_0"] < sizes["q4_1"] < sizes["q5_1"] < sizes["bf16"]


def test_llama31_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path, tiny_llama):
    """Llama-3.1's llama3 rope scaling: a rope_freqs tensor of the factor dividing each rotary frequency,
    against the published rule computed here (llama.cpp's own logits agree: BENCHMARKS.md)."""
    import math

    from gguf import GGUFReader

    from platy import gguf_export

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    folder = build_model(tmp_path / "m", "llama", tiny_llama, rope_scaling={"rope_type": "llama3", **scaling})
    path = folder / "m-f16.gguf"
    gguf_export.write_gguf(folder, "f16", path, {"name": "m", "description": "rope"})
    written = next(t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    head_dim = 128 // 4
    expected = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * 10000.0 ** (i / head_dim)
        low, high = (
            scaling["original_max_position_embeddings"] / scaling[k] for k in ("low_freq_factor", "high_freq_factor")
        )
        if wavelength < high:
            expected.append(1.0)
        elif wavelength > low:
            expected.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelength - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    assert {1.0, 8.0} <= set(expected) and len(set(expected)) > 2, "the tiny shape reaches all three regimes"
    assert list(written.shape) == [head_dim // 2]
    assert torch.allclose(torch.tensor(written.data.tolist()), torch.tensor(expected), rtol=1e-5)
    # --verify's read-back through transformers' GGUF loader (which reads no rope_freqs) uses the scaled
    # frequencies: float16 rounding only, not the 1e-2 of default frequencies
    report = gguf_export.compare_with_merged(folder, {"f16": path.name}, ["Is 91 a prime number? Say why. " * 4])
    assert report["f16"]["max_abs_diff"] < 2e-3 and report["f16"]["agreement"] == 1.0, report


# ---- tokenizers: sentencepiece (tokenizer.model or tokenizer.json only) and byte-level BPE --------------


def vocabulary_of(path):
    """Every tokenizer.ggml.* key of a GGUF file: what llama.cpp tokenizes with."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.ggml.")}


def test_a_sentencepiece_tokenizer_saved_as_tokenizer_json_only_exports_as_its_tokenizer_model(tiny_llama, tmp_path):
    """transformers 5 saves a sentencepiece tokenizer as tokenizer.json alone (BPE with byte fallback and a
    Metaspace pre-tokenizer). Its GGUF holds what the tokenizer.model gives llama.cpp's converter: the same
    pieces, sentencepiece's scores (llama.cpp merges by them) and token types; transformers rebuilds the
    same tokenizer from it."""
    import gguf
    from transformers import AutoTokenizer

    from platy.gguf_export import write_gguf

    with_model, json_only = tmp_path / "with-model", tmp_path / "json-only"
    shutil.copytree(tiny_llama, with_model)
    shutil.copytree(tiny_llama, json_only, ignore=shutil.ignore_patterns("tokenizer*"))
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(json_only)
    assert (with_model / "tokenizer.model").is_file() and not (json_only / "tokenizer.model").exists()
    for folder in (with_model, json_only):
        write_gguf(folder, "f16", folder / "m-f16.gguf", {"name": "m", "description": "tokenizer"})
    expected, written = (vocabulary_of(folder / "m-f16.gguf") for folder in (with_model, json_only))
    assert written == expected
    assert written["tokenizer.ggml.model"] == "llama" and written["tokenizer.ggml.pre"] == "default"
    assert written["tokenizer.ggml.add_space_prefix"] is True and written["tokenizer.ggml.add_bos_token"] is True
    types = written["tokenizer.ggml.token_type"]
    kinds = (gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.BYTE, gguf.TokenType.NORMAL)
    assert {int(kind) for kind in kinds} <= set(types)
    assert len(set(written["tokenizer.ggml.scores"])) > 500, "merge priorities, not one constant"
    tokenizer = AutoTokenizer.from_pretrained(json_only)
    rebuilt = AutoTokenizer.from_pretrained(json_only, gguf_file="m-f16.gguf")
    for text in TEXTS:
        assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"], text


@pytest.mark.parametrize(
    "pre_tokenizer, name",
    [
        # SmolLM2 as transformers rebuilds it from its GGUF: ByteLevel's own (GPT-2) split
        ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "gpt-2"),
        # SmolLM / SmolLM2 as published: single digits, then GPT-2's split
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
                ],
            },
            "smollm",
        ),
    ],
)
def test_byte_level_pre_tokenizers_get_the_name_llama_cpp_splits_them_by(tmp_path, pre_tokenizer, name):
    from platy.gguf_export import tokenizer_layout
    from platy.tiny import train_byte_level_tokenizer

    train_byte_level_tokenizer(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert tokenizer_layout(tmp_path, "--gguf")[:2] == ("gpt2", "qwen2")
    spec["pre_tokenizer"] = pre_tokenizer
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert tokenizer_layout(tmp_path, "--gguf")[:2] == ("gpt2", name)


def test_tokenizers_the_export_cannot_write_faithfully_are_refused(tmp_path):
    from platy.cli import UserError
    from platy.gguf_export import tokenizer_layout
    from platy.tiny import train_byte_level_tokenizer

    train_byte_level_tokenizer(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=r"--gguf: the byte-level tokenizer in .* splits text in a way llama.cpp"):
        tokenizer_layout(tmp_path, "--gguf")
    spec["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]]}
    spec["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=r"--gguf: the tokenizer in .* is a Unigram model; GGUF export writes"):
        tokenizer_layout(tmp_path, "--gguf")


def test_the_gguf_tolerance_scales_with_the_logits():
    """A GGUF file's logit difference is judged against its type's rounding step x the merged model's largest
    logit (with a floor for small logits): the real SmolLM2 quick-start adapter's q8_0 file (1.18 at max |logit|
    40.3, agreement 99.5%, the same 30 held-out answers) passes; the same difference on logits of 3 does not,
    nor does a low agreement or a tokenizer that splits a text otherwise."""
    from platy.merge_stages import gguf_verdict

    real = {
        "max_abs_diff": 1.18,
        "max_abs_logit": 40.3,
        "agreement": 0.995,
        "tokenizer_same_ids": 8,
        "tokenizer_texts": 8,
    }
    passed = gguf_verdict("q8_0", real)
    assert passed["verdict"] == "PASS"
    assert passed["tolerance"]["max_abs_diff"] == pytest.approx(8 / 127 * 40.3)
    assert passed["tolerance"]["derivation"] == "8 x q8_0 step 0.0079 x max |logit| 40.3"
    small = gguf_verdict("q8_0", {**real, "max_abs_logit": 3.0})
    assert small["verdict"] == "WARN" and small["tolerance"]["max_abs_diff"] == 0.5
    assert small["tolerance"]["derivation"].startswith("the q8_0 floor 0.5")
    assert gguf_verdict("q8_0", {**real, "agreement": 0.9})["verdict"] == "WARN"
    assert gguf_verdict("q8_0", {**real, "tokenizer_same_ids": 7})["verdict"] == "WARN"
    # f16 of a float16 merge holds the same numbers: a difference of 1 is no rounding at these logits
    assert gguf_verdict("f16", {**real, "max_abs_diff": 1.0})["verdict"] == "WARN"
