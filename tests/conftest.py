"""Fixtures: tiny random models built from configs, offline, on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample_platypus.json"
sys.path.insert(0, str(REPO))


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """Tests see a CPU without native bf16, so --precision auto is fp32 whatever CPU runs them; the tests of
    the bf16 choice give their own CPU."""
    from platy.train import speed

    monkeypatch.setattr(speed, "native_bf16", lambda: ())


@pytest.fixture(scope="session", autouse=True)
def platy_cache(tmp_path_factory):
    """One tiny-model cache per test session, shared with subprocesses through PLATY_CACHE."""
    cache = os.environ.get("PLATY_TEST_CACHE") or str(tmp_path_factory.mktemp("platy-cache"))
    os.environ["PLATY_CACHE"] = cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return Path(cache)


@pytest.fixture(scope="session")
def tiny_llama(platy_cache):
    from platy import tiny

    return tiny.ensure_model("tiny-llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def build_model(folder, arch, tokenizer_dir, **overrides):
    """A tiny random model of another architecture, sharing the tiny tokenizer."""
    import shutil

    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dims = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    dims.update(overrides)
    from transformers import LlamaConfig, LlamaForCausalLM

    config, cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[arch]
    torch.manual_seed(1)
    model = cls(config(**dims))
    if arch == "qwen2":  # random biases, so a dropped bias would show
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    for name in ("tokenizer.model",):
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, Path(folder) / name)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tiny_llama):
    return build_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tiny_llama)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, tiny_llama):
    return build_model(tmp_path_factory.mktemp("mistral"), "mistral", tiny_llama)


# the scripts whose `python <script> ARGV` runs in the test's own process unless asked otherwise
IN_PROCESS = ("finetune.py", "merge.py", "inference.py", "refine.py")


def run_cli(args, cwd=None, env=None, timeout=600, own_process=False):
    """Run a command line as a user would; returns the CompletedProcess (text).

    `python <one of IN_PROCESS> ...` without env runs in this process (run_entry): importing torch,
    transformers and peft takes a new interpreter about 12 s on these CPUs. Tests of what only a process
    shows (signals, launchers, the environment, closed pipes) pass env or own_process=True."""
    args = [str(a) for a in args]
    script = Path(args[1]) if len(args) > 1 else None
    if not own_process and env is None and args[0] == sys.executable and script and script.parent == REPO:
        if script.name in IN_PROCESS:
            return run_entry(script, args[2:], cwd or REPO)
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(args, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_entry(script, argv, cwd):
    """`python script ARGV` run in this process through the script's own cli.run: its exit status, and what it
    printed to stdout and stderr; an unexpected exception is a traceback on stderr and status 1, as in a
    process. Working directory, environment, sys.argv and the SIGTERM handler are restored afterwards."""
    import contextlib
    import gc
    import io
    import signal
    import traceback

    from platy import cli

    entry = cli.script_entry(script.stem)
    out, err, status = io.StringIO(), io.StringIO(), 0
    saved = (dict(os.environ), sys.argv, signal.getsignal(signal.SIGTERM), os.getcwd())
    try:
        os.chdir(cwd)
        sys.argv = [str(script), *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.run(entry)
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except Exception:
                traceback.print_exc()
                status = 1
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        sys.argv = saved[1]
        signal.signal(signal.SIGTERM, saved[2])
        os.chdir(saved[3])
        gc.collect()
    return subprocess.CompletedProcess([sys.executable, str(script), *argv], status, out.getvalue(), err.getvalue())


# small, fast training settings: a few steps of short examples (the tests' own runs override them)
SMALL_RUN = {
    # the same precision on every CPU: --precision auto picks bf16 on CPUs with native bf16 (test_speed.py)
    "precision": "fp32",
    "batch_size": 4,
    "micro_batch_size": 2,
    "max_steps": 3,
    "warmup_steps": 0,
    "logging_steps": 1,
    "cutoff_len": 256,
}


def finetune(output_dir, *extra, base_model="builtin:tiny-llama", data_path=SAMPLE, cwd=None, env=None):
    """python finetune.py with SMALL_RUN's settings unless `extra` overrides them."""
    small = [word for name, value in SMALL_RUN.items() for word in (f"--{name}", str(value))]
    args = [sys.executable, str(REPO / "finetune.py"), "--base_model", str(base_model), "--data_path", str(data_path)]
    args += ["--output_dir", str(output_dir), *small, *map(str, extra)]
    return run_cli(args, cwd=cwd, env=env)


FAULTS = str(Path(__file__).parent / "faults")


def faulty(fault, rank=None):
    """The environment of a run that tests/faults/sitecustomize.py hits with PLATY_FAULT (PLATY_FAULT_RANK: one
    rank only); passing an env makes run_cli start the script as its own process."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [FAULTS, os.environ.get("PYTHONPATH")])), "PLATY_FAULT": fault}
    if rank is not None:
        env["PLATY_FAULT_RANK"] = str(rank)
    return env


def sigterm_after_step(monkeypatch, step):
    """faulty(f"sigterm_after_step={step}") for a run in this process (no interpreter to start): the same patch of
    tests/faults/sitecustomize.py, undone after the test. Only a signal the run itself handles can be sent here."""
    import importlib.util
    import signal

    import torch

    spec = importlib.util.spec_from_file_location("platy_faults", Path(FAULTS) / "sitecustomize.py")
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)  # without PLATY_FAULT in this environment it patches nothing by itself
    monkeypatch.setattr(torch.optim.AdamW, "step", torch.optim.AdamW.step)
    faults.after_steps(step, signal.SIGTERM)


def write_rows(path, rows):
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_llama_wide(tmp_path_factory, tiny_llama):
    """Same family, other shapes: an adapter of tiny-llama does not fit it."""
    return build_model(tmp_path_factory.mktemp("wide"), "llama", tiny_llama, intermediate_size=512)


def train_adapter(folder, *extra, base_model="builtin:tiny-llama"):
    """A really trained adapter (large learning rate, so its effect is large)."""
    result = finetune(
        folder, "--max_steps", 8, "--learning_rate", 5e-3, "--save_steps", 4, *extra, base_model=base_model
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(folder)


@pytest.fixture(scope="session")
def qlora_adapter(tmp_path_factory):
    return train_adapter(tmp_path_factory.mktemp("qlora") / "adapter")


@pytest.fixture(scope="session")
def qwen2_adapter(tmp_path_factory, tiny_qwen2):
    return train_adapter(
        tmp_path_factory.mktemp("qwen-qlora") / "adapter",
        "--lora_target_modules",
        "[q_proj, k_proj, v_proj, gate_proj, up_proj, down_proj]",
        base_model=tiny_qwen2,
    )


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory):
    return train_adapter(tmp_path_factory.mktemp("lora") / "adapter", "--quantization", "none")


def reseal(folder):
    """A folder's manifest rewritten over files a test changed on purpose: as if they had been saved so."""
    from platy import integrity

    facts = {k: v for k, v in integrity.read_manifest(folder).items() if k not in ("format", "files", "checksum")}
    integrity.write_manifest(folder, **facts)


def merge_cli(adapter, output_dir, *extra, env=None):
    return run_cli(
        [
            sys.executable,
            str(REPO / "merge.py"),
            "--peft_model_path",
            str(adapter),
            "--output_dir",
            str(output_dir),
            *map(str, extra),
        ],
        env=env,
    )


def assert_user_error(result, script, *fragments):
    """A user mistake: exit status 2, no traceback, and the output ends with one `script: error:` line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    # progress bars of stages that ran before the problem showed may precede it
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:], lines
    assert lines[-1].startswith(f"{script}: error: "), lines[-1]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
