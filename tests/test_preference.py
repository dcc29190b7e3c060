"""Preference tuning (--stage dpo, ipo, simpo, orpo): the losses against TRL's, the pairs' data, the reference
and its cache, the step-0 check, and a preference adapter through merge.py and inference.py."""

import json
import math
import shutil
import signal
import sys

import pytest
import torch

from platy import cli
from platy.data.pairs import PairTokenizer, check_pairs
from platy.prompts import Prompter
from platy.reporting import curve_panels
from platy.train import checkpoints
from platy.train.preference import METRICS, PairCollator, pair_loss, reference_logps

from conftest import (
    REPO,
    SMALL_RUN,
    assert_user_error,
    faulty,
    finetune,
    merge_cli,
    run_cli,
    sigterm_after_step,
    write_rows,
)

PAIRS = REPO / "tests" / "fixtures" / "preference_pairs.json"
TOLERANCE = 1e-5  # the losses and gradients against TRL's, in float32


def flags(**overrides):
    values = cli.entry_defaults(cli.script_entry("finetune"))
    values.update(base_model="builtin:tiny-llama", data_path=str(PAIRS), report_to="none", stage="dpo", **SMALL_RUN)
    values.update(overrides)
    return values


# ---- the losses against TRL's -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_dpo(tiny_llama, tmp_path_factory):
    """TRL's DPOTrainer on the tiny base with a LoRA adapter whose weights are random (B != 0), so the policy
    differs from its reference (the base, adapter disabled, as TRL takes it for a new adapter)."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj"])
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        beta=0.3,
        report_to="none",
        use_cpu=True,
        gradient_checkpointing=False,
        precompute_ref_log_probs=False,
    )
    rows = datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(model=base, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    return trainer, tokenizer


def our_batch(tokenizer, pairs):
    """The toolkit's batch of pairs (the Alpaca template), and its dataset."""
    import datasets

    columns, _ = PairTokenizer(tokenizer, Prompter("alpaca"), 256)(pairs, "pairs")
    dataset = datasets.Dataset.from_dict(columns)
    return PairCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))]), dataset


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


def assert_same(ours, theirs, our_grads, their_grads):
    assert abs(ours.item() - theirs.item()) < TOLERANCE, (ours.item(), theirs.item())
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name in our_grads:
        assert torch.allclose(our_grads[name], their_grads[name], atol=TOLERANCE, rtol=0), name
    assert any(g.abs().max() > 1e-4 for g in our_grads.values()), "the gradients are not all zero"


@pytest.mark.parametrize("stage, trl_loss", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trls_loss_and_gradients(trl_dpo, stage, trl_loss):
    trainer, tokenizer = trl_dpo
    model = trainer.model
    model.train()
    pairs = check_pairs(json.loads(PAIRS.read_text())[:3], "pairs")
    batch, dataset = our_batch(tokenizer, pairs)
    # the reference as the toolkit computes it before training: the base with the adapter disabled
    chosen, rejected = reference_logps(model, dataset, PairCollator(tokenizer.pad_token_id), 2, use_adapter=False)
    ours, reward_w, reward_l = pair_loss(
        model, {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}, stage, 0.3, 0.0
    )
    assert (reward_w - reward_l).abs().max() > 1e-3, "the policy differs from its reference"
    our_grads = gradients(model, ours)
    trainer.loss_types, trainer.beta = [trl_loss], 0.3
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
    }
    theirs = trainer._compute_loss(model, inputs, False)  # TRL computes its own reference (adapter disabled)
    assert_same(ours, theirs, our_grads, gradients(model, theirs))


class EveryPositionLogits(torch.nn.Module):
    """A model that takes no logits_to_keep: it returns the logits of every position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, logits_to_keep=None, **inputs):
        return self.model(**inputs)


def test_the_lm_head_runs_only_where_an_answer_token_is_predicted(tiny_llama, tokenizer):
    """Through a peft model with activation checkpointing, the lm_head sees one position per answer token (not the
    prompts and padding), and the sums and gradients equal those from every position's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch, _ = our_batch(tokenizer, check_pairs(json.loads(PAIRS.read_text())[:3], "pairs"))
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    kept = pair_loss(model, batch, "simpo", 2.0, 0.7)[0]
    kept_grads = gradients(model, kept)
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert seen[0] == (answer_tokens, base.config.hidden_size)
    assert answer_tokens < batch["input_ids"].numel() / 2, "the batch's prompts and padding are most of it"
    seen.clear()
    full = pair_loss(EveryPositionLogits(model), batch, "simpo", 2.0, 0.7)[0]
    assert seen[0] == batch["input_ids"].shape + (base.config.hidden_size,)
    assert_same(kept, full, kept_grads, gradients(model, full))


def trl_pair_batch(batch, pad_id):
    """A PairCollator batch in the layout of TRL's CPO and ORPO trainers (chosen_* and rejected_* rows)."""
    pairs = batch["row"].shape[0]
    out = {}
    for k, key in enumerate(("chosen", "rejected")):
        rows = slice(k * pairs, (k + 1) * pairs)
        out[f"{key}_input_ids"] = batch["input_ids"][rows]
        out[f"{key}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{key}_labels"] = batch["labels"][rows]
    return out


def test_simpo_equals_trls_cpo_trainer(trl_dpo, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    dpo, tokenizer = trl_dpo
    model = dpo.model
    args = CPOConfig(
        output_dir=str(tmp_path),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=2.0,
        simpo_gamma=0.7,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    trainer = CPOTrainer(model=model, args=args, train_dataset=dpo.train_dataset, processing_class=tokenizer)
    pairs = check_pairs(json.loads(PAIRS.read_text())[3:6], "pairs")
    batch, _ = our_batch(tokenizer, pairs)
    ours, _, _ = pair_loss(model, batch, "simpo", 2.0, 0.7)
    our_grads = gradients(model, ours)
    theirs, _ = trainer.get_batch_loss_metrics(model, trl_pair_batch(batch, tokenizer.pad_token_id))
    assert_same(ours, theirs, our_grads, gradients(model, theirs))


def test_orpo_equals_trls_orpo_trainer(trl_dpo, tmp_path):
    """TRL's ORPO takes its NLL over the prompt's tokens too, the paper (and the toolkit) over the chosen answer's
    only: the pairs here have a prompt of BOS alone, where the two agree."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    dpo, tokenizer = trl_dpo
    model = dpo.model
    trainer = ORPOTrainer(
        model=model,
        args=ORPOConfig(output_dir=str(tmp_path), beta=0.25, report_to="none", use_cpu=True, bf16=False),
        train_dataset=dpo.train_dataset,
        processing_class=tokenizer,
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    features = []
    for row, (chosen, rejected) in enumerate([(" yes it is", " no"), (" four", " five or six")]):
        feature = {"row": row}
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            ids = [bos, *tokenizer(text, add_special_tokens=False)["input_ids"], eos]
            feature[f"{key}_input_ids"], feature[f"{key}_labels"] = ids, [-100, *ids[1:]]
        features.append(feature)
    batch = PairCollator(tokenizer.pad_token_id)(features)
    ours, _, _ = pair_loss(model, batch, "orpo", 0.25, 0.0)
    our_grads = gradients(model, ours)
    theirs, _ = trainer.get_batch_loss_metrics(model, trl_pair_batch(batch, tokenizer.pad_token_id))
    assert_same(ours, theirs, our_grads, gradients(model, theirs))


# ---- the pairs -----------------------------------------------------------------------------------------

LAYOUTS = [
    {"instruction": "Add 2 and 3.", "input": "Be brief.", "chosen": "5", "rejected": "six"},
    {"prompt": "Add 2 and 3.", "chosen": {"role": "assistant", "content": "5"}, "rejected": "six"},
    {"messages": [{"role": "user", "content": "Add 2 and 3."}], "chosen": "5", "rejected": [{"content": "six"}]},
    {
        "prompt": "Add 2 and 3.",  # UltraFeedback: whole conversations sharing the question
        "chosen": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
        "rejected": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "six"}],
    },
]


def test_every_pair_layout_converts_to_one_prompt_and_two_answers():
    pairs = check_pairs(LAYOUTS, "pairs")
    assert [p["row"] for p in pairs] == [1, 2, 3, 4]
    assert pairs[0]["prompt"] == {"instruction": "Add 2 and 3.", "input": "Be brief."}
    assert pairs[1]["prompt"] == {"instruction": "Add 2 and 3.", "input": ""}
    assert pairs[2]["prompt"] == pairs[3]["prompt"] == {"messages": [{"role": "user", "content": "Add 2 and 3."}]}
    assert all((p["chosen"], p["rejected"]) == ("5", "six") for p in pairs)
    # every assistant role an SFT conversation accepts names an answer too; another role's message is none
    for role in ("gpt", "chatgpt", "bard", "model"):
        pair = check_pairs([{**LAYOUTS[0], "chosen": {"from": role, "value": "5"}}], "pairs")[0]
        assert pair["chosen"] == "5"
    with pytest.raises(cli.UserError, match="'chosen' is a human message; the answers are the assistant's"):
        check_pairs([{**LAYOUTS[0], "chosen": {"from": "human", "value": "5"}}], "pairs")


def test_pairs_render_as_the_sft_rows_with_each_answer_ending_once(tokenizer):
    """Each answer is the supervised row with that answer (same ids), labels on the answer and one EOS, also
    where the answer's text carries the EOS text itself."""
    from platy.data.examples import ExampleTokenizer

    pairs = check_pairs([{**LAYOUTS[0], "chosen": "5</s>"}, LAYOUTS[2]], "pairs")
    columns, stats = PairTokenizer(tokenizer, Prompter("alpaca"), 256)(pairs, "pairs")
    sft = ExampleTokenizer(tokenizer, Prompter("alpaca"), 256)
    expected = sft({"instruction": ["Add 2 and 3."], "input": ["Be brief."], "output": ["5"]})
    assert columns["chosen_input_ids"][0] == expected["input_ids"][0]
    assert columns["chosen_labels"][0] == expected["labels"][0]
    assert stats["end_of_turn_text_removed"] == 1
    for key in ("chosen", "rejected"):
        for labels in columns[f"{key}_labels"]:
            answer = [t for t in labels if t != -100]
            assert answer.count(tokenizer.eos_token_id) == 1 and answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode([t for t in columns["rejected_labels"][1] if t != -100]) == "six</s>"


def test_chat_template_answers_end_with_one_end_of_turn_token(tiny_llama):
    from transformers import AutoTokenizer

    from platy.data.examples import prepare_tokenizer
    from platy.prompts import ChatTemplate

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(tiny_llama)))
    chat = ChatTemplate.resolve("chatml", tokenizer)
    chat.bind(tokenizer)
    pairs = check_pairs(
        [{**LAYOUTS[3], "rejected": [*LAYOUTS[3]["rejected"][:1], {"role": "assistant", "content": "six<|im_end|>"}]}],
        "p",
    )
    columns, stats = PairTokenizer(tokenizer, Prompter("alpaca"), 256, chat_template=chat)(pairs, "pairs")
    assert stats["end_of_turn_text_removed"] == 1
    for key, text in (("chosen", "5<|im_end|>"), ("rejected", "six<|im_end|>")):
        labels = [t for t in columns[f"{key}_labels"][0] if t != -100]
        assert tokenizer.decode(labels).replace(" ", "") == text
        assert "<|im_start|>assistant" in tokenizer.decode(columns[f"{key}_input_ids"][0])
    prompt = [{"role": "user", "content": "word " * 300}]
    long = check_pairs([{"messages": prompt, "chosen": "5", "rejected": "6"}], "p")
    with pytest.raises(cli.UserError, match="row 1: the prompt alone fills --cutoff_len 64"):
        PairTokenizer(tokenizer, Prompter("alpaca"), 64, chat_template=chat)(long, "pairs")


def test_answers_cut_at_cutoff_len_are_counted(tokenizer):
    pairs = check_pairs([LAYOUTS[0], {**LAYOUTS[0], "chosen": "five " * 100}], "pairs")
    columns, stats = PairTokenizer(tokenizer, Prompter("alpaca"), 160)(pairs, "pairs")
    assert stats["answers_cut_at_cutoff_len"] == 1
    assert len(columns["chosen_input_ids"][1]) == 160
    assert tokenizer.eos_token_id not in columns["chosen_labels"][1], "a cut answer did not end"


def test_bad_pairs_stop_the_run_naming_their_rows(tmp_path):
    rows = [
        LAYOUTS[0],
        {"instruction": "Add 2 and 3.", "chosen": "5"},
        {"instruction": "Add 2 and 3.", "chosen": "5", "rejected": " 5 "},
        {"instruction": "Add 2 and 3.", "chosen": "", "rejected": "6"},
    ]
    result = finetune(tmp_path / "out", "--stage", "dpo", data_path=write_rows(tmp_path / "bad.json", rows))
    assert_user_error(
        result,
        "finetune.py",
        "row 2: missing 'rejected'",
        "row 3: 'chosen' and 'rejected' are the same",
        "row 4: 'chosen' is blank",
    )
    long = [LAYOUTS[0], {"instruction": "word " * 300, "chosen": "5", "rejected": "6"}]
    result = finetune(tmp_path / "out", "--stage", "dpo", data_path=write_rows(tmp_path / "long.json", long))
    assert_user_error(result, "finetune.py", "row 2: the prompt alone fills --cutoff_len 256")
    assert not (tmp_path / "out").exists(), "nothing written"


def test_preference_flags_are_checked_together():
    from platy.train.config import check_flags

    problems = check_flags(flags(stage="kto", beta=0))
    assert any("--stage kto" in p for p in problems) and any("--beta" in p for p in problems)
    problems = check_flags(flags(stage="dpo", simpo_gamma=1.0, packing=True, finetuning="full", quantization="none"))
    assert any("--simpo_gamma" in p for p in problems)
    assert any("--packing does not apply" in p for p in problems)
    assert any("--finetuning" in p and "LoRA adapter" in p for p in problems)
    assert any("--beta applies to preference tuning" in p for p in check_flags(flags(stage="sft", beta=0.5)))


def test_liger_is_turned_off_for_a_preference_stage(capsys):
    """Liger's forward and fused loss are SFT's: a preference stage trains with the model's own layers, saying so."""
    from platy.train.config import derive

    run = derive(flags(stage="dpo", liger=True))
    assert run.liger is False
    assert "Note: --liger is off: --stage dpo computes its own loss" in capsys.readouterr().out


# ---- runs: the reference, its cache, the step-0 check, merge and inference -----------------------------


FAST = ("--quantization", "none", "--gradient_checkpointing", "false", "--cutoff_len", 128)


def log_of(folder):
    return json.loads((folder / "log_history.json").read_text())


def test_dpo_run_starts_at_ln2_learns_and_reuses_its_reference_across_betas(tmp_path):
    """From the base: the reference is the base (adapter disabled); the first logged step is ln 2 with rewards
    0 and accuracy 50%; the margins grow; a run with another beta reuses the cached reference log-probs."""
    out = tmp_path / "dpo"
    result = finetune(out, "--stage", "dpo", "--learning_rate", 5e-3, "--max_steps", 4, *FAST, data_path=PAIRS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Reference log-probs (train): computed for 12 pairs" in result.stdout
    assert "loss starts at 0.6931 = ln 2" in result.stdout
    history = [r for r in log_of(out) if "loss" in r]
    first, last = history[0], history[-1]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0 and first["rewards/accuracies"] == 0.5
    assert last["loss"] < first["loss"] and last["rewards/margins"] > 0
    record = json.loads((out / "run_config.json").read_text())
    assert record["resolved"]["reference"]["model"] == "the base (adapter disabled)"
    assert record["resolved"]["reference"]["base_files"]
    card = (out / "README.md").read_text()
    assert "dpo" in card and "beta 0.1" in card and "the base (adapter disabled)" in card
    assert (out / "training_curves.png").is_file() and "margin" in result.stdout and "accuracy" in result.stdout
    panels = curve_panels(log_of(out))
    assert list(panels) == ["Loss", "Learning rate", "Rewards (beta x log-ratio)", "Reward accuracy"]
    assert [label for label, _ in panels["Rewards (beta x log-ratio)"]] == [
        "chosen (train)",
        "rejected (train)",
        "margin (train)",
    ]
    assert len(panels["Reward accuracy"][0][1]) == 4, "one point per logged step"
    again = finetune(tmp_path / "dpo2", "--stage", "dpo", "--beta", 0.5, "--max_steps", 1, *FAST, data_path=PAIRS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Reference log-probs (train): reused from" in again.stdout


@pytest.mark.parametrize(
    "stage, base",
    [
        ("dpo", ("--quantization", "4bit")),
        ("dpo", ("--quantization", "8bit")),
        ("dpo", ("--quantization", "4bit", "--use_dora", "true")),
        ("simpo", ("--quantization", "4bit")),
        ("orpo", ("--quantization", "4bit")),
    ],
    ids=["dpo-4bit", "dpo-8bit", "dpo-4bit-dora", "simpo-4bit", "orpo-4bit"],
)
def test_preference_stages_on_quantized_bases_and_dora(tmp_path, stage, base):
    """The reference pass and the policy's first step through bitsandbytes layers (and DoRA's magnitudes) give the
    same log-probs, so dpo starts at ln 2; every stage learns over a few steps and saves its adapter."""
    out = tmp_path / stage
    knobs = ("--learning_rate", 5e-3, "--max_steps", 4, "--gradient_checkpointing", "false", "--cutoff_len", 128)
    result = finetune(out, "--stage", stage, *knobs, *base, data_path=PAIRS)
    assert result.returncode == 0, result.stderr[-3000:]
    history = [r for r in log_of(out) if "loss" in r]
    first, last = history[0], history[-1]
    if stage == "dpo":
        assert "loss starts at 0.6931 = ln 2" in result.stdout
        assert abs(first["loss"] - math.log(2)) < 1e-4 and first["rewards/accuracies"] == 0.5, first
    assert last["loss"] < first["loss"], history
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] == ("--use_dora" in base)
    record = json.loads((out / "run_config.json").read_text())
    assert record["flags"]["quantization"] == base[1] and record["flags"]["stage"] == stage
    assert (out / "adapter_model.safetensors").stat().st_size > 0


def test_a_policy_that_is_not_its_reference_stops_at_step_0(lora_adapter, tmp_path):
    """An SFT adapter loaded as the start (--resume_from_checkpoint) while the reference is the base."""
    result = finetune(
        tmp_path / "out", "--stage", "dpo", "--resume_from_checkpoint", lora_adapter, *FAST, data_path=PAIRS
    )
    assert_user_error(result, "finetune.py", "the reference is not the starting policy", "row ")


def test_dpo_on_an_sft_adapter_merges_and_answers(lora_adapter, tmp_path):
    """--init_adapter: the reference is the frozen SFT model (step 0 passes only if it is: the SFT adapter
    moves the log-probs far from the base's), the record names it with its weights' hash; the DPO adapter
    merges, verifies and answers as an SFT adapter does."""
    import hashlib

    out = tmp_path / "dpo"
    result = finetune(
        out,
        "--stage",
        "dpo",
        "--init_adapter",
        lora_adapter,
        "--quantization",
        "none",
        "--learning_rate",
        5e-3,
        data_path=PAIRS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loaded the SFT adapter's weights" in result.stdout and "= ln 2" in result.stdout
    reference = json.loads((out / "run_config.json").read_text())["resolved"]["reference"]
    weights = (lora_adapter / "adapter_model.safetensors").read_bytes()
    assert reference["adapter_sha256"] == hashlib.sha256(weights).hexdigest()
    assert reference["model"] == "the frozen SFT adapter on the base"
    merged = merge_cli(out, tmp_path / "merged", "--verify")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "greedy next-token agreement" in merged.stdout
    answer = run_cli(
        [
            sys.executable,
            REPO / "inference.py",
            "--lora_weights",
            out,
            "--prompt",
            "What is 2 + 3?",
            "--max_new_tokens",
            8,
        ]
    )
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.strip()


def preference_curve(folder):
    return [(r["step"], r["loss"], r["rewards/margins"]) for r in log_of(folder) if "loss" in r]


def test_torchrun_two_processes_give_the_single_process_curve(tmp_path):
    """The same global batch over 2 gloo processes: the loss and the margins of every step equal (1e-5) those
    of one process; the rewards count the pairs of both ranks."""
    common = ["--stage", "dpo", "--learning_rate", 5e-3, *FAST, "--data_path", PAIRS, "--report_to", "none"]
    small = [word for name, value in SMALL_RUN.items() if name != "cutoff_len" for word in (f"--{name}", value)]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    args += [REPO / "finetune.py", "--base_model", "builtin:tiny-llama", "--output_dir", tmp_path / "ddp"]
    ddp = run_cli([*args, *small, *common])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = finetune(tmp_path / "single", *common, data_path=PAIRS)
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = preference_curve(tmp_path / "ddp"), preference_curve(tmp_path / "single")
    assert len(two) == len(one) == SMALL_RUN["max_steps"]
    for (step, loss, margin), (step1, loss1, margin1) in zip(two, one):
        assert step == step1 and abs(loss - loss1) < 1e-5 and abs(margin - margin1) < 1e-5
    assert one[-1][2] > 0


# ---- interrupted runs: SIGTERM and kill -9, resumed --------------------------------------------------

RESUMABLE = ("--stage", "dpo", "--learning_rate", 5e-3, "--max_steps", 4, "--save_steps", 2, *FAST)


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def logged_steps(folder):
    return [r for r in log_of(folder) if "loss" in r]


@pytest.fixture(scope="module")
def whole_dpo_run(lora_adapter, tmp_path_factory):
    """A 4-step DPO run on an SFT adapter that nothing interrupts: every resumed run below must end with its
    adapter and its log. On an SFT adapter, a resume that took the reference from the checkpoint's adapter
    instead of the frozen SFT one would end elsewhere."""
    run = (*RESUMABLE, "--init_adapter", lora_adapter)
    out = tmp_path_factory.mktemp("whole-dpo") / "out"
    result = finetune(out, *run, data_path=PAIRS)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, out


def assert_resumed_as_the_whole_run(resumed, out, whole, checkpoint):
    """The resume skipped the step-0 check and ended with the whole run's adapter (1e-5, as tests/test_faults.py's
    resumes) and log: every step once, with the same loss and rewards."""
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {out / checkpoint}" in resumed.stdout and "Step 0" not in resumed.stdout
    ours, theirs = adapter(out), adapter(whole)
    assert ours.keys() == theirs.keys() and ours
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5
    ours, theirs = logged_steps(out), logged_steps(whole)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, len(theirs) + 1))
    for mine, reference in zip(ours, theirs):
        for name in ("loss", *METRICS):
            assert abs(mine[name] - reference[name]) < 1e-5, (mine["step"], name, mine[name], reference[name])


def test_a_dpo_run_stopped_by_sigterm_resumes_to_the_whole_runs_adapter(tmp_path, whole_dpo_run, monkeypatch):
    """SIGTERM between checkpoints: the run saves the step it reached and exits 75; the resume reads the cached
    reference log-probs."""
    run, whole = whole_dpo_run
    out = tmp_path / "out"
    sigterm_after_step(monkeypatch, 1)
    stopped = finetune(out, *run, data_path=PAIRS)
    monkeypatch.undo()
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "finetune.py: preempted: stopped at optimizer step 1 of 4" in stopped.stderr
    assert checkpoints.missing_parts(out / "checkpoint-1") == []
    assert not (out / "adapter_model.safetensors").exists()
    resumed = finetune(out, *run, "--resume_from_checkpoint", "auto", data_path=PAIRS)
    assert "Reference log-probs (train): reused" in resumed.stdout
    assert_resumed_as_the_whole_run(resumed, out, whole, "checkpoint-1")


def test_a_dpo_run_killed_while_writing_a_checkpoint_resumes_to_the_whole_runs_adapter(
    tmp_path, whole_dpo_run, platy_cache
):
    """kill -9 halfway through checkpoint-4's optimizer file: the resume starts from checkpoint-2. The reference
    cache is gone too (a node-local cache on another machine): the resume computes the reference again, from
    the frozen SFT adapter and not from checkpoint-2's, and still ends where the whole run did."""
    run, whole = whole_dpo_run
    out = tmp_path / "out"
    killed = finetune(out, *run, data_path=PAIRS, env=faulty("sigkill_in_write=checkpoint-4/optimizer.pt"))
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints.latest_checkpoint(out) == str(out / "checkpoint-2")
    assert (out / checkpoints.STAGING / "checkpoint-4").is_dir()
    shutil.rmtree(platy_cache / "reference")
    resumed = finetune(out, *run, "--resume_from_checkpoint", "auto", data_path=PAIRS)
    assert "Removing .staging left by an interrupted run" in resumed.stdout
    assert "Reference log-probs (train): computed for 12 pairs" in resumed.stdout
    assert_resumed_as_the_whole_run(resumed, out, whole, "checkpoint-2")


def test_an_orpo_run_stopped_by_sigterm_resumes_to_the_whole_runs_adapter(tmp_path, monkeypatch):
    """The losses without a reference resume as exactly: ORPO (its supervised term included), stopped after step
    1 of 2."""
    run = ("--stage", "orpo", "--learning_rate", 5e-3, "--max_steps", 2, *FAST)
    whole = finetune(tmp_path / "whole", *run, data_path=PAIRS)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "out"
    sigterm_after_step(monkeypatch, 1)
    stopped = finetune(out, *run, data_path=PAIRS)
    monkeypatch.undo()
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    resumed = finetune(out, *run, "--resume_from_checkpoint", "auto", data_path=PAIRS)
    assert "Reference log-probs" not in resumed.stdout
    assert_resumed_as_the_whole_run(resumed, out, tmp_path / "whole", "checkpoint-1")


def test_the_reference_cache_key_follows_the_scored_tokens():
    """The key holds what the reference scores: the same tokens give the same key whatever produced them, one id
    of another rendering (an edited chat template file, another tokenizer) another key, and so does the reference."""
    from datasets import Dataset

    from platy.train.preference import reference_key

    def pairs(last):
        return Dataset.from_dict(
            {
                "chosen_input_ids": [[1, 5, 6, last]],
                "chosen_labels": [[-100, -100, 6, last]],
                "rejected_input_ids": [[1, 5, 7, 2]],
                "rejected_labels": [[-100, -100, 7, 2]],
            }
        )

    reference = {"model": "the base (adapter disabled)", "base_files": "abc"}
    assert reference_key(reference, pairs(2)) == reference_key(dict(reference), pairs(2))
    assert reference_key(reference, pairs(2)) != reference_key(reference, pairs(3))
    assert reference_key(reference, pairs(2)) != reference_key({**reference, "base_files": "abd"}, pairs(2))
