"""Speed features: packing, tokenization cache, partial checkpointing, compile, token budgets."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from test_train import flags, resolved

from platy import cli, merge_stages
from platy.cli import UserError
from platy.data.packing import PackedCollator, pack_dataset, pack_lengths
from platy.train import config, recipe
from platy.train.objective import Supervised
from platy.train.recipe import Recipe

from conftest import assert_user_error, finetune


def lora_setup(tmp_path, **overrides):
    """Unquantized tiny Llama with LoRA, dropout 0: forwards are deterministic, so exact comparisons hold."""
    prepared = Recipe.from_flags(
        flags(output_dir=str(tmp_path / "out"), quantization="none", lora_dropout=0.0, **overrides)
    ).setup()
    run, tokenizer, train_set, model = prepared.run, prepared.tokenizer, prepared.train_set, prepared.trainer.model
    with torch.no_grad():  # a non-zero adapter, so its gradients flow through every layer
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return run, tokenizer, train_set, model


def padded_batch(tokenizer, examples):
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    return collate([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in examples])


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pack_lengths_fills_rows_within_the_budget():
    lengths = [5, 9, 3, 7, 1, 10, 2, 6]
    rows = pack_lengths(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths))), "every example exactly once"
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # 43 tokens need at least 5 rows of 10
    with pytest.raises(ValueError, match="more than the packing budget"):
        pack_lengths([11], 10)


CONVERSATIONS = Path(__file__).parent / "fixtures" / "conversations.jsonl"


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"data_path": str(CONVERSATIONS)},  # several exchanges, labels on the assistant turns only
        {"data_path": str(CONVERSATIONS), "chat_template": "chatml"},  # with new trained token rows
    ],
    ids=["alpaca", "conversations", "chatml-conversations"],
)
def test_packed_loss_gradients_and_logits_equal_unpacked(tmp_path, data):
    """One step on packed rows computes what padded batches of the same examples compute."""
    run, tokenizer, train_set, model = lora_setup(tmp_path, **data)
    examples = train_set.select(range(12))
    packed, stats = pack_dataset(examples, 256)
    assert stats["packed_rows"] < 12 and stats["examples"] == 12, stats
    packed_batch = PackedCollator()([packed[i] for i in range(len(packed))])
    assert "attention_mask" not in packed_batch and packed_batch["input_ids"].shape[0] == 1
    assert packed_batch["use_cache"] is False, "a cache turns off the detection of example boundaries"
    # no pad token anywhere: the packed row is exactly the examples' tokens
    assert packed_batch["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in examples)

    # the Trainer's loss is the mean over the label tokens of a batch: the same set of tokens on both sides
    padded_loss, padded_grads = loss_and_grads(model, padded_batch(tokenizer, list(examples)))
    packed_loss, packed_grads = loss_and_grads(model, packed_batch)
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5, (packed_loss, padded_loss)
    assert padded_grads.keys() == packed_grads.keys() and padded_grads
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # attention never crosses an example: each example's logits in the packed row equal its own forward
    model.eval()
    row = packed[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    assert len(starts) > 2, "the first packed row holds several examples"
    for attention in ("sdpa", "eager"):
        model.base_model.model.set_attn_implementation(attention)
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([row["input_ids"]]),
                position_ids=torch.tensor([row["position_ids"]]),
                use_cache=False,
            ).logits[0]
            for begin, end in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row["input_ids"][begin:end]])).logits[0]
                assert (logits[begin:end] - alone).abs().max().item() < 1e-5, (attention, begin)


def test_finetune_with_packing_and_token_budget_end_to_end(tmp_path):
    out = tmp_path / "packed"
    result = finetune(out, "--packing", "true", "--micro_batch_tokens", 512, "--batch_size", 2, "--micro_batch_size", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Packing: 244 training examples in" in result.stderr + result.stdout
    config = json.loads((out / "run_config.json").read_text())
    packing = config["data"]["train_packing"]
    assert packing["examples"] == 244 and packing["token_budget"] == 512, packing
    tokens = config["data"]["train"]["tokens"]
    assert -(-tokens // 512) <= packing["packed_rows"] <= tokens / 512 / 0.9, (tokens, packing)  # rows 90% full
    assert config["result"]["global_step"] == 3
    assert (out / "adapter_model.safetensors").is_file()


def test_speed_flags_refused_together(tmp_path):
    result = finetune(tmp_path / "bad", "--micro_batch_tokens", 100, "--micro_batch_size", 2)
    assert_user_error(
        result,
        "finetune.py",
        "--micro_batch_tokens fills each micro-step with packed examples",
        "--micro_batch_tokens replaces --micro_batch_size",
    )


def per_example_tokens(tok, rows, **kwargs):
    """The original per-example path: one row at a time, the tokenizer called through transformers."""
    from platy.data.examples import ExampleTokenizer
    from platy.prompts import Prompter

    class PerExample(ExampleTokenizer):
        def encode(self, texts):
            return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

        def clean(self, char):
            return False  # two passes over prompt + response, as the original scripts do

    example_tokenizer = PerExample(tok, Prompter("alpaca"), **kwargs)
    out = [example_tokenizer({k: [row.get(k, "")] for k in ("instruction", "input", "output")}) for row in rows]
    kept = [o for o in out if o["n_response"][0] > 0]
    return {key: [o[key][0] for o in kept] for key in ("input_ids", "attention_mask", "labels")}


@pytest.mark.parametrize(
    "kwargs", [dict(cutoff_len=256), dict(cutoff_len=40, train_on_inputs=True, add_eos_token=True)]
)
def test_cached_equals_batched_equals_per_example(tmp_path, tokenizer, kwargs):
    from platy.data.cache import tokenized_splits
    from platy.data.examples import ExampleTokenizer, prepare_tokenizer
    from platy.data.rows import load_rows
    from platy.prompts import Prompter

    from conftest import SAMPLE

    tok = prepare_tokenizer(tokenizer)
    rows, fingerprint = load_rows(str(SAMPLE))
    rows = rows[:120]
    expected = per_example_tokens(tok, rows, **kwargs)
    tok("warm up", truncation=True, max_length=8)  # leaves truncation set on the backend: must not matter
    example_tokenizer = ExampleTokenizer(tok, Prompter("alpaca"), **kwargs)
    seen = []
    for _ in range(2):
        splits, (where, folder) = tokenized_splits(
            {"train": rows[:100], "val": rows[100:]}, example_tokenizer, fingerprint, {"seed": 42}, root=tmp_path
        )
        seen.append(where)
        got = {key: list(splits["train"][0][key]) + list(splits["val"][0][key]) for key in expected}
        assert got == expected  # bit for bit: ids, mask and labels of every kept example
    assert seen == ["tokenized", "cache"]
    assert splits["train"][1]["rows"] == 100 and splits["val"][1]["rows"] == 20
    # an entry damaged on disk (a crash before the data reached it) is tokenized again, not failed on
    train_file = folder / "train.arrow"
    train_file.write_bytes(train_file.read_bytes()[: train_file.stat().st_size // 2])
    splits, (where, folder) = tokenized_splits(
        {"train": rows[:100], "val": rows[100:]}, example_tokenizer, fingerprint, {"seed": 42}, root=tmp_path
    )
    assert where == "tokenized"
    assert {key: list(splits["train"][0][key]) + list(splits["val"][0][key]) for key in expected} == expected
    # another cutoff_len is another entry
    other = ExampleTokenizer(tok, Prompter("alpaca"), cutoff_len=kwargs["cutoff_len"] + 1)
    _, (where, other_folder) = tokenized_splits(
        {"train": rows[:100], "val": rows[100:]}, other, fingerprint, {"seed": 42}, root=tmp_path
    )
    assert where == "tokenized" and other_folder != folder
    # a cache folder that cannot be written costs the cache, not the run
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    splits, (where, folder) = tokenized_splits(
        {"train": rows[:100], "val": rows[100:]},
        example_tokenizer,
        fingerprint,
        {"seed": 42},
        root=blocked / "tokenized",
    )
    assert (where, folder) == ("uncached", None)
    assert {key: list(splits["train"][0][key]) + list(splits["val"][0][key]) for key in expected} == expected


def test_cache_tokens_false_tokenizes_in_memory_and_writes_nothing(tmp_path, tiny_llama):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / tiny_llama.name).symlink_to(tiny_llama)  # the built model, without the session's token cache
    first = finetune(tmp_path / "run1", "--max_steps", 1, "--cache_tokens", "false", env={"PLATY_CACHE": str(cache)})
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Tokenized data: tokenized in memory, not cached (--cache_tokens false)" in first.stderr + first.stdout
    assert sorted(p.name for p in cache.iterdir()) == [tiny_llama.name], "nothing written beside the model"
    second = finetune(tmp_path / "run2", "--max_steps", 1, env={"PLATY_CACHE": str(cache)})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Tokenized data: tokenized and cached in" in second.stderr + second.stdout
    assert (cache / "tokenized").is_dir()
    stats = [json.loads((tmp_path / run / "run_config.json").read_text())["data"]["train"] for run in ("run1", "run2")]
    assert stats[0] == stats[1] and stats[0]["tokens"] > 0, "the same examples either way"


def test_checkpoint_fraction_counts_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    from platy.train.speed import checkpoint_layers

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    for fraction, expected in ((0.5, 2), (0.3, 2), (1.0, 4), (0.0, 0), (0.25, 1)):
        model = LlamaForCausalLM(config)
        assert checkpoint_layers(model, fraction) == (expected, 4)
        flags_on = [layer.gradient_checkpointing for layer in model.model.layers]
        assert flags_on == [True] * expected + [False] * (4 - expected), (fraction, flags_on)


def test_partial_checkpointing_recomputes_those_layers_and_keeps_gradients(tmp_path):
    torch.manual_seed(0)
    run, tokenizer, train_set, model = lora_setup(tmp_path, gradient_checkpointing=0.5)
    layers = model.base_model.model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    calls = [0, 0]
    for i, layer in enumerate(layers):
        # a pre-hook: the recompute stops as soon as it has the tensors backward needs, before mlp returns
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    batch = padded_batch(tokenizer, list(train_set.select(range(4))))
    model.train()
    loss, grads = loss_and_grads(model, batch)
    assert calls == [2, 1], "the checkpointed layer runs again in backward, the other one does not"
    for layer in layers:
        layer.gradient_checkpointing = False
    plain_loss, plain_grads = loss_and_grads(model, batch)
    assert abs(loss.item() - plain_loss.item()) < 1e-6
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


class QuickCompile(transformers.TrainingArguments):
    """TrainingArguments that compile with aot_eager instead of inductor."""

    def __post_init__(self):
        if self.torch_compile:
            self.torch_compile_backend = "aot_eager"
        super().__post_init__()


def test_torch_compile_leaves_the_first_step_loss_unchanged(tmp_path, monkeypatch):
    """The Trainer compiles the model when --torch_compile is on. Inductor's C++ build takes about 40 s on
    these CPUs, so the test compiles with the aot_eager backend: the same graph capture, no code generation."""
    from test_train import build

    monkeypatch.setattr(transformers, "TrainingArguments", QuickCompile)
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        _, trainer = build(
            tmp_path / str(compiled),
            quantization="none",
            lora_dropout=0.0,
            max_steps=1,
            torch_compile=compiled,
            gradient_checkpointing=False,
        )
        assert trainer.args.torch_compile is compiled
        trainer.train()
        assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule) is compiled
        losses[compiled] = [r["loss"] for r in trainer.state.log_history if "loss" in r][0]
    assert abs(losses[True] - losses[False]) < 1e-5, losses


def test_liger_is_off_with_a_note_where_it_cannot_run(tmp_path, capsys):
    import importlib.util

    assert importlib.util.find_spec("liger_kernel") is None or not torch.cuda.is_available(), (
        "this test is about a machine where Liger cannot run"
    )
    run = resolved(output_dir=str(tmp_path / "out"), liger=True)
    assert run.liger is False, "the Trainer is not asked for kernels that cannot run"
    assert "Note: --liger is off: " in capsys.readouterr().out
    plain = resolved(output_dir=str(tmp_path / "out"), liger=False)
    keys = [field.name for field in dataclasses.fields(run)]
    differing = {key for key in keys if key != "prompter" and getattr(run, key) != getattr(plain, key)}
    assert differing == set(), f"with --liger off the run is the plain one; differs in {differing}"


def test_micro_batch_tokens_bounds_every_micro_step(tmp_path):
    run = resolved(
        output_dir=str(tmp_path / "out"), packing=True, micro_batch_tokens=300, batch_size=2, micro_batch_size=1
    )
    assert run.pack_budget == 300 and run.gradient_accumulation_steps == 2
    tokenizer, chat = recipe.tokenizer_and_chat(run)
    train_set, _, stats = Supervised().datasets(run, tokenizer, chat)
    sizes = [len(ids) for ids in train_set["input_ids"]]
    assert max(sizes) <= 300 and sum(sizes) == stats["train"]["tokens"], "every token once, no row over budget"
    assert len(sizes) == stats["train_packing"]["packed_rows"] < stats["train"]["kept"] / 3
    with pytest.raises(UserError, match="--micro_batch_tokens 100 is below --cutoff_len 256"):
        cli.fail_on(config.check_flags(flags(output_dir=str(tmp_path / "out"), packing=True, micro_batch_tokens=100)))


def test_native_bf16_reads_the_cpu_flags(tmp_path, monkeypatch):
    monkeypatch.undo()  # conftest's CPU without native bf16: this test reads the real function
    from platy.train.speed import native_bf16

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert native_bf16(x86) == ("AMX-BF16", "AVX512-BF16")
    assert native_bf16(arm) == ("Arm BF16",)
    assert native_bf16(avx2) == () and native_bf16(tmp_path / "missing") == ()


def test_bf16_matmul_speedup_is_measured():
    from platy.train.speed import bf16_matmul_speedup

    speedup = bf16_matmul_speedup.__wrapped__(size=64, repeats=2)
    assert 0 < speedup < float("inf")


@pytest.mark.parametrize(
    ("features", "speedup", "chosen", "why"),
    [
        ((), None, "fp32", "auto: this CPU has no native bf16 (AMX-BF16 or AVX512-BF16)"),
        (("AMX-BF16", "AVX512-BF16"), 6.3, "bf16", "natively (AMX-BF16, AVX512-BF16); a bf16 matmul measured 6.3x"),
        (("AVX512-BF16",), 1.2, "fp32", "this CPU has AVX512-BF16, but a bf16 matmul measured only 1.2x fp32"),
    ],
)
def test_precision_auto_on_a_cpu_is_bf16_where_measured_native(tmp_path, monkeypatch, features, speedup, chosen, why):
    from platy.train import plan, speed

    def measured():
        assert speedup is not None, "without native bf16 instructions nothing is timed"
        return speedup

    monkeypatch.setattr(speed, "native_bf16", lambda: features)
    monkeypatch.setattr(speed, "bf16_matmul_speedup", measured)
    run = resolved(output_dir=str(tmp_path / "out"), precision="auto", dry_run=True)
    assert run.precision == chosen and run.plan["precision"] == chosen
    line = next(ln for ln in plan.describe_plan(run).splitlines() if ln.startswith("  precision: "))
    assert line.startswith(f"  precision: {chosen} (auto: ") and why in line
    explicit = resolved(output_dir=str(tmp_path / "out"), precision="fp32", dry_run=True)
    assert explicit.precision == "fp32" and "  precision: fp32 (--precision fp32)" in plan.describe_plan(explicit)


@pytest.mark.parametrize(
    ("available", "fraction", "why"),
    [
        (64.0, 0.0, "off (auto: on a CPU, about 0.0 GiB without it fits in 50% of the 64.0 GiB available)"),
        (0.001, 1.0, "on (auto: on a CPU, about 0.0 GiB without it does not fit in 50% of the 0.0 GiB available)"),
        (None, 1.0, "on (auto: the memory available here is unknown)"),
    ],
)
def test_gradient_checkpointing_auto_on_a_cpu_follows_the_memory(tmp_path, monkeypatch, available, fraction, why):
    from platy.train import plan, speed

    monkeypatch.setattr(speed, "available_memory_gib", lambda: available)
    run = resolved(output_dir=str(tmp_path / "out"), gradient_checkpointing="auto", dry_run=True)
    assert run.checkpoint_fraction == fraction and run.plan["activation_checkpointing"] == fraction
    assert f"  activation checkpointing: {why}" in plan.describe_plan(run)
    on_gpu = plan.checkpointing_choice(run.replace(device="cuda", checkpoint_fraction=None), counts=None)
    assert on_gpu["checkpoint_fraction"] == 1.0, "with a GPU auto keeps checkpointing on, as before"
    planned = plan.checkpointing_choice(run.replace(checkpoint_fraction=None, gpu_memory_gb=80), counts=None)
    assert planned["checkpoint_fraction"] == 1.0, "a plan checked against a GPU is planned as on one"
    explicit = resolved(output_dir=str(tmp_path / "out"), gradient_checkpointing=0.5, dry_run=True)
    assert explicit.checkpoint_fraction == 0.5
    assert "  activation checkpointing: on the first 50% of layers (--gradient_checkpointing 0.5)" in (
        plan.describe_plan(explicit)
    )


def test_bf16_on_a_cpu_trains_a_4bit_base_and_merges_within_verify(tmp_path):
    """--precision auto picks bf16 on CPUs with native bf16: a QLoRA run in bf16 learns, and its adapter
    merges within --verify's tolerances (verify computes in fp32 on a CPU, as before)."""
    prepared = Recipe.from_flags(
        flags(output_dir=str(tmp_path / "out"), precision="bf16", quantization="4bit", max_steps=2, learning_rate=1e-2)
    ).setup()
    model = prepared.trainer.model
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert {p.dtype for p in model.parameters() if p.dtype.is_floating_point} >= {torch.float32}
    prepared.train()
    prepared.save()
    losses = [entry["loss"] for entry in prepared.trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], before) for n, before in lora_before.items() if "lora_B" in n)
    merge_flags = cli.entry_defaults(cli.script_entry("merge"))
    merge_flags.update(
        peft_model_path=str(tmp_path / "out"), output_dir=str(tmp_path / "m"), dtype="float32", verify=True
    )
    merged = merge_stages.merge(merge_flags)
    assert merged.verify["verdict"] == "PASS", merged.verify


def test_the_cheaper_lora_dropout_drops_what_torchs_does():
    """WideDrawDropout keeps each element with probability 1 - p (p rounded to 1/65536), scales the kept ones so
    the expected output is the input, passes gradients through the same mask, repeats under the same seed, and
    leaves the input alone in evaluation or with p 0."""
    from platy.train.dropout import WideDrawDropout

    x = torch.randn(512, 1536, requires_grad=True)
    dropout = WideDrawDropout(0.05).train()
    torch.manual_seed(0)
    out = dropout(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - 3277 / 65536)) < 2e-3  # 786,432 elements: 4 sigma is 1e-3
    torch.testing.assert_close(out[kept], x[kept] * 65536 / (65536 - 3277))
    assert abs(out.sum().item() - x.sum().item()) < 0.01 * x.abs().sum().item()
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 65536 / (65536 - 3277))
    rows = kept.float().mean(dim=1)
    assert rows.min() > 0.9 and rows.max() < 0.99, "every part of the input is masked, not only its start"
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out), "the same seed gives the same mask (resumed runs repeat their steps)"
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(WideDrawDropout(0.0).train()(x), x)


def test_a_cpu_run_uses_the_cheaper_lora_dropout(tmp_path):
    from platy.train.dropout import WideDrawDropout

    prepared = Recipe.from_flags(flags(output_dir=str(tmp_path / "out"), lora_dropout=0.1)).setup()
    model = prepared.trainer.model
    dropouts = [d for layer in model.modules() if hasattr(layer, "lora_dropout") for d in layer.lora_dropout.values()]
    layers = model.config.num_hidden_layers * len(prepared.run.lora_targets)
    assert len(dropouts) == layers and all(type(d) is WideDrawDropout and d.p == 0.1 for d in dropouts)
