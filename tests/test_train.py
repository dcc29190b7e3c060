"""Training end to end: outputs, what changes, what is learned, models, quantization modes."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from platy import cli
from platy.train import config
from platy.train.recipe import Recipe

from conftest import REPO, SAMPLE, SMALL_RUN, assert_user_error, finetune, write_rows


def flags(**overrides):
    """finetune.train's defaults, with small settings for the tests, then overrides."""
    values = cli.entry_defaults(cli.script_entry("finetune"))
    values.update(base_model="builtin:tiny-llama", data_path=str(SAMPLE), report_to="none", **SMALL_RUN)
    values.update(overrides)
    return values


def resolved(**overrides):
    """The TrainRun of flags(**overrides), after the flag check, as finetune.py resolves it."""
    values = flags(**overrides)
    cli.fail_on(config.check_flags(values))
    return config.resolve(values)


def build(tmp_path, **overrides):
    prepared = Recipe.from_flags(flags(output_dir=str(tmp_path / "out"), **overrides)).setup()
    return prepared.run, prepared.trainer


def test_lora_weights_change_and_base_weights_do_not(tmp_path):
    run, trainer = build(tmp_path, learning_rate=1e-3)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen_4bit = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    trainer.train()
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n), "every lora_B was trained"
    base = [n for n in before if "lora_" not in n]
    assert base and all(torch.equal(before[n], after[n]) for n in base), "base weights untouched"
    assert frozen_4bit, "the base really is 4-bit"


def test_group_by_length_changes_the_sampler(tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    _, trainer = build(tmp_path, group_by_length=True)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    _, trainer = build(tmp_path, group_by_length=False)
    assert not isinstance(trainer._get_train_sampler(), LengthGroupedSampler)


def test_gradients_are_unchanged_by_an_evaluation_pass(tmp_path):
    """bitsandbytes repacks 4-bit weights on CPU in eval mode for a kernel without backward;
    the toolkit keeps the trainable layout, so gradients after an eval pass are the same."""
    run, trainer = build(tmp_path, lora_dropout=0.0)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])

    def lora_grads():
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # a non-zero lora_B, so gradients flow through every layer's adapter
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    fresh = lora_grads()
    model.eval()
    with torch.no_grad():
        model(**batch)
    again = lora_grads()
    assert fresh.keys() == again.keys() and fresh
    for name in fresh:
        torch.testing.assert_close(again[name], fresh[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("packing", [False, True])
def test_the_lm_head_runs_only_where_a_label_is_predicted(tmp_path, packing):
    """The Trainer's loss runs the lm_head at the positions that predict a label only (not the prompts, the padding
    or a row's last position), through peft and 4-bit layers, and its loss and LoRA gradients are those of the
    model's own loss over every position's logits, padded or packed."""
    import transformers

    run, trainer = build(tmp_path, lora_dropout=0.0, micro_batch_size=3, batch_size=3, packing=packing)
    model = trainer.model
    model.train()
    with torch.no_grad():  # a non-zero lora_B, so every adapter has a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    items = (batch["labels"][:, 1:] != -100).sum()
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1]))

    def loss_and_grads(compute_loss, count):
        model.zero_grad()
        loss = compute_loss(trainer, model, dict(batch), num_items_in_batch=count)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert items < batch["input_ids"].numel() / 2, "the batch's prompts and padding are most of it"
    for count in (items, None):  # None: the mean over the micro-batch's labels
        seen.clear()
        kept, kept_grads = loss_and_grads(type(trainer).compute_loss, count)
        assert seen == [(int(items),)]
        seen.clear()
        full, full_grads = loss_and_grads(transformers.Trainer.compute_loss, count)
        assert seen == [batch["input_ids"].shape]
        torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
        assert kept_grads.keys() == full_grads.keys() and len(kept_grads) == 2 * 3 * model.config.num_hidden_layers
        for name in kept_grads:
            torch.testing.assert_close(kept_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_remote_code_and_a_model_over_several_gpus_get_every_positions_logits(tmp_path):
    """The lm_head mask goes only to transformers' own causal LMs on one device: remote code may read
    logits_to_keep as a count, and across GPUs the mask and the hidden states sit on different devices."""
    from platy.train.trainer import slices_logits_by_mask

    _, trainer = build(tmp_path)
    model = trainer.model
    assert slices_logits_by_mask(model)
    base = model.get_base_model()
    base.hf_device_map = {"model.embed_tokens": 0, "model.layers": 0, "lm_head": 1}
    assert not slices_logits_by_mask(model)
    base.hf_device_map = {"": 0}
    assert slices_logits_by_mask(model)
    remote = type("RemoteLlama", (type(base),), {"__module__": "transformers_modules.someone.modeling_llama"})
    base.__class__ = remote
    assert not slices_logits_by_mask(model)


def test_end_to_end_run_writes_everything(tmp_path):
    out = tmp_path / "out"
    result = finetune(out, "--val_set_size", 8, "--save_steps", 2, "--max_steps", 4)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "run_config.json",
        "log_history.json",
        "training_curves.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "run_config.json").read_text())
    assert config["flags"]["learning_rate"] == 4e-4 and config["flags"]["lora_r"] == 16
    assert config["flags"]["lora_target_modules"] == ["gate_proj", "down_proj", "up_proj"]
    assert config["resolved"]["gradient_accumulation_steps"] == 2 and config["resolved"]["world_size"] == 1
    assert config["resolved"]["template"]["name"] == "alpaca"
    assert config["resolved"]["precision"] == "fp32" and config["flags"]["quantization"] == "4bit"
    assert config["data"]["fingerprint"] == "sha256:" + hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert config["data"]["train"]["kept"] + config["data"]["val"]["kept"] == len(json.loads(SAMPLE.read_text()))
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(config["versions"])
    assert config["result"]["global_step"] == 4 and config["result"]["trained_tokens"] > 0
    history = json.loads((out / "log_history.json").read_text())
    assert sum("loss" in r for r in history) == 4 and any("eval_loss" in r for r in history)
    assert (out / "checkpoint-2" / "run_config.json").is_file(), "checkpoints carry the run configuration"
    assert not (out / "checkpoint-2" / "README.md").exists(), "no empty PEFT card in a checkpoint"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    # what the user sees: a progress bar with the loss, and a closing summary
    assert "loss=" in result.stderr
    assert "Done: 4 optimizer steps" in result.stdout and "tokens/s" in result.stdout
    assert str(out / "adapter_model.safetensors") in result.stdout
    # the plan and the LoRA line give one trainable share; the base's loading says what it is
    shares = re.findall(r"trainable(?: of [\d,]+ parameters)? \((\d+\.\d+%)\)", result.stdout)
    assert len(shares) == 2 and shares[0] == shares[1], shares
    assert (
        "base weights 4-bit NF4" in result.stdout
        and "Loading builtin:tiny-llama (4-bit NF4, fp32 compute)" in result.stdout
    )
    assert "wandb_project=" not in result.stdout, "unset flags are left out of the printed configuration"
    # the adapter's own card, not PEFT's template
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card and "A QLoRA adapter for `builtin:tiny-llama`" in card
    assert "base_model:" not in card and "`sample_platypus.json`" in card and "loaded in 4bit nf4" in card
    assert "| learning rate | 0.0004 |" in card and "python finetune.py --base_model builtin:tiny-llama" in card
    # the card's commands name the folder so that they work from where finetune.py ran (here, elsewhere)
    assert f"python merge.py --peft_model_path {out} --output_dir {out}-merged --verify" in card


def test_eval_loss_falls_on_learnable_data(tmp_path):
    out = tmp_path / "out"
    result = finetune(
        out,
        "--val_set_size",
        16,
        "--max_steps",
        30,
        "--eval_steps",
        10,
        "--batch_size",
        8,
        "--micro_batch_size",
        4,
        "--learning_rate",
        3e-3,
        "--lora_dropout",
        0.0,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r["eval_loss"] for r in json.loads((out / "log_history.json").read_text()) if "eval_loss" in r]
    assert len(evals) >= 4  # at start, steps 10, 20, 30 (and the final evaluation)
    assert evals[-1] < evals[0] - 0.5, evals


@pytest.mark.parametrize("model_fixture", ["tiny_qwen2", "tiny_mistral"])
def test_other_architectures_train(tmp_path, model_fixture, request):
    base = request.getfixturevalue(model_fixture)
    out = tmp_path / "out"
    result = finetune(out, "--max_steps", 2, base_model=base)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    keys = load_file(out / "adapter_model.safetensors").keys()
    for module in ("gate_proj", "up_proj", "down_proj"):
        assert any(f"{module}.lora_A" in k for k in keys) and any(f"{module}.lora_B" in k for k in keys)
    assert json.loads((out / "run_config.json").read_text())["resolved"]["model_type"] in ("qwen2", "mistral")


@pytest.mark.parametrize(
    "extra, quant",
    [(["--quantization", "8bit"], "8bit"), (["--quantization", "none"], "none"), (["--double_quant", "True"], "4bit")],
)
def test_quantization_modes(tmp_path, extra, quant):
    out = tmp_path / "out"
    result = finetune(out, "--max_steps", 1, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "run_config.json").read_text())
    assert config["flags"]["quantization"] == quant


def test_resume_from_checkpoint_continues_the_step_count(tmp_path):
    out = tmp_path / "out"
    first = finetune(out, "--max_steps", 2, "--save_steps", 1)
    assert first.returncode == 0, first.stderr[-3000:]
    again = finetune(out, "--max_steps", 3, "--resume_from_checkpoint", out / "checkpoint-1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from" in again.stdout
    history = json.loads((out / "log_history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3]


def test_resume_from_an_adapter_folder_says_what_restarts(tmp_path):
    first = finetune(tmp_path / "a", "--max_steps", 1)
    assert first.returncode == 0, first.stderr[-3000:]
    again = finetune(tmp_path / "b", "--max_steps", 1, "--resume_from_checkpoint", tmp_path / "a")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "optimizer state and learning-rate schedule restart" in again.stdout


def test_finished_output_dir_is_not_overwritten_unless_asked(tmp_path):
    out = tmp_path / "out"
    assert finetune(out, "--max_steps", 1).returncode == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    second = finetune(out, "--max_steps", 1, "--seed", 7)
    assert second.returncode == 2 and "already holds a finished run" in second.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == before
    third = finetune(out, "--max_steps", 1, "--seed", 7, "--overwrite", "True")
    assert third.returncode == 0, third.stderr[-3000:]
    assert (out / "adapter_model.safetensors").read_bytes() != before


# ---- output folders: finetune.py writes only into a new, empty or its own folder --------------------------


def tree(folder):
    """Every file under folder with its bytes: what a refused command must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_a_base_model_folder_or_one_above_it_is_never_trained_into(tmp_path, tiny_llama):
    import shutil

    models = tmp_path / "models"
    base = models / "llama-2-13b"
    shutil.copytree(tiny_llama, base)
    before = tree(models)
    for out, where in ((base, "is the base model folder"), (models, "is above the base model folder")):
        result = finetune(out, "--overwrite", "True", base_model=base)
        assert_user_error(result, "finetune.py", f"--output_dir {out} {where} {base}", "choose a new or empty folder")
    assert tree(models) == before


def test_a_folder_of_other_files_is_never_trained_into(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.md").write_text("mine")
    for extra in ((), ("--overwrite", "True")):
        result = finetune(out, *extra)
        assert_user_error(
            result, "finetune.py", f"--output_dir {out} is not empty", "README.md", "choose a new or empty folder"
        )
    assert tree(out) == {Path("README.md"): b"mine"}


def test_home_root_and_the_toolkit_folder_are_never_trained_into(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for out, what in ((home, "the home folder"), (Path("/"), "the file system root"), (REPO, "the toolkit's folder")):
        result = finetune(out, "--overwrite", "True")
        assert_user_error(result, "finetune.py", f"--output_dir {out} is {what}", "choose a new or empty folder")
    assert list(home.iterdir()) == []


def test_overwrite_retires_only_what_finetune_wrote(tmp_path):
    from types import SimpleNamespace

    from platy.train.loop import clear_output_dir

    out = tmp_path / "out"
    record = '{"flags": {"base_model": "builtin:tiny-llama"}}'
    for folder in (out, out / "checkpoint-2"):  # a finished run and one of its checkpoints
        folder.mkdir(parents=True)
        (folder / "run_config.json").write_text(record)
    (out / "checkpoint-9").mkdir()  # a folder of the same name that no run of finetune.py wrote
    (out / "checkpoint-9" / "optimizer.pt").write_bytes(b"someone else's")
    (out / "checkpoint-notes").write_text("mine")
    clear_output_dir(SimpleNamespace(output_dir=str(out), overwrite=True, resume=None))
    assert tree(out) == {Path("checkpoint-9/optimizer.pt"): b"someone else's", Path("checkpoint-notes"): b"mine"}


def test_rotation_retires_only_checkpoints_finetune_wrote(tmp_path):
    from platy.train.checkpoints import rotate

    out = tmp_path / "out"
    for step, record in ((1, False), (2, True), (3, True)):  # checkpoint-1: complete, but not this toolkit's
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
            (folder / name).write_text("x")
        if record:
            (folder / "run_config.json").write_text('{"flags": {"base_model": "builtin:tiny-llama"}}')
    rotate(out, keep=1, newest=out / "checkpoint-3")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-3"]


def test_tensorboard_reporting_writes_events(tmp_path):
    out = tmp_path / "out"
    result = finetune(out, "--max_steps", 1, "--report_to", "tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(out.rglob("events.out.tfevents.*")), "tensorboard event file"


def test_korean_data_with_korean_template(tmp_path):
    rows = [
        {
            "instruction": "다음 두 수의 합을 구하시오.",
            "input": f"{a}, {a + 1}",
            "output": f"{a} + {a + 1} = {2 * a + 1} 입니다.",
        }
        for a in range(10, 30)
    ]
    data = write_rows(tmp_path / "ko.jsonl", rows)
    out = tmp_path / "out"
    result = finetune(out, "--max_steps", 2, "--prompt_template_name", "alpaca_ko", data_path=data)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "run_config.json").read_text())
    assert config["resolved"]["template"]["response_split"] == "### 응답:"
    assert config["data"]["train"]["label_tokens"] > 0


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_record(tmp_path):
    out = tmp_path / "out"
    assert finetune(out, "--max_steps", 2, "--save_steps", 2).returncode == 0
    record = (out / "run_config.json").read_text()
    # a scheduler's requeue of the same command: success, one line, nothing changed
    again = finetune(out, "--max_steps", 2, "--resume_from_checkpoint", "auto")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip() == f"{out} already finished: 2 optimizer steps; nothing to do"
    # naming that finished checkpoint to train further with the same step count is refused
    again = finetune(out, "--max_steps", 2, "--resume_from_checkpoint", out / "checkpoint-2")
    assert again.returncode == 2 and "already finished the run (2 of 2 steps)" in again.stderr
    assert (out / "run_config.json").read_text() == record


def test_warmup_longer_than_the_run_is_pointed_out(tmp_path):
    result = finetune(tmp_path / "out", "--max_steps", 2, "--warmup_steps", 100)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--warmup_steps 100 covers the whole run (2 optimizer steps)" in result.stdout
    assert result.stdout.count("covers the whole run") == 1
    planned = finetune(tmp_path / "dry", "--max_steps", 2, "--warmup_steps", 100, "--dry_run", True)
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "--warmup_steps 100 covers the whole run (2 optimizer steps)" in planned.stdout


def test_planned_steps_match_the_trainer(tmp_path):
    """The step count behind the warmup note is the Trainer's own."""
    result = finetune(
        tmp_path / "out",
        "--max_steps",
        -1,
        "--num_epochs",
        0.5,
        "--batch_size",
        8,
        "--micro_batch_size",
        2,
        "--warmup_steps",
        1000,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    steps = json.loads((tmp_path / "out" / "run_config.json").read_text())["result"]["global_step"]
    assert f"covers the whole run ({steps} optimizer steps)" in result.stdout


def test_a_run_too_short_for_a_curve_draws_none_and_says_why(tmp_path):
    result = finetune(tmp_path / "out", "--max_steps", 2, "--logging_steps", 10)
    assert result.returncode == 0, result.stderr[-2000:]
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2], "the first and the last step are always logged"
    assert not (tmp_path / "out" / "training_curves.png").exists()
    assert "No training_curves.png: 2 training loss point(s) logged, and a curve needs 3" in result.stdout
    assert "curves:" not in result.stdout


@pytest.mark.parametrize(
    "gpus, world, local_rank, expected",
    [
        (0, 1, 0, {"": "cpu"}),
        (1, 1, 0, {"": 0}),
        (4, 1, 0, "auto"),  # no torchrun, several GPUs: one big model spread over them
        (4, 4, 2, {"": 2}),  # torchrun: each rank a whole (quantized) copy on its own GPU
    ],
)
def test_weights_placement(monkeypatch, gpus, world, local_rank, expected):
    from platy import modeling

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert modeling.device_map() == expected


def test_resuming_from_elsewhere_does_not_overwrite_a_finished_run(tmp_path):
    assert finetune(tmp_path / "a", "--max_steps", 1).returncode == 0
    assert finetune(tmp_path / "b", "--max_steps", 1).returncode == 0
    before = (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    again = finetune(tmp_path / "b", "--max_steps", 1, "--resume_from_checkpoint", tmp_path / "a")
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert (tmp_path / "b" / "adapter_model.safetensors").read_bytes() == before
