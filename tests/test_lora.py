"""LoRA variants and training knobs: each adapter, merged, equals the model as it was trained.

One tiny run per variant (module fixture, trained in process); the merge and --verify of each are
then checked against the logits the trained model gave in memory, before anything was saved.
"""

import pytest
import torch

from platy import cli, merge_stages
from platy.quantized import LOFTQ_OFFSET, compute_8bit_as_trained
from platy.train import config, recipe
from platy.train.flags import TRAIN_FLAGS
from platy.train.recipe import Recipe

from conftest import SAMPLE, SMALL_RUN, reseal

PROMPTS = ["### Instruction:\nWhat is 12 + 30?\n\n### Response:\n", "다음 두 수의 합을 구하시오. 12, 30"]
# (name, flags): every variant on a 4-bit and an unquantized base (LoftQ is 4-bit only, PiSSA / OLoRA unquantized only),
# and DoRA on an 8-bit base
VARIANTS = {
    "plain-4bit": {},
    "rslora-4bit": {"use_rslora": True, "lora_r": 8},
    "dora-4bit": {"use_dora": True},
    "dora-8bit": {"use_dora": True, "quantization": "8bit", "lora_dropout": 0.05},  # dropout off in eval
    "loftq-4bit": {"init_lora_weights": "loftq"},
    "loftq3-4bit": {"init_lora_weights": "loftq", "loftq_iter": 3},
    "plain-none": {"quantization": "none"},
    "rslora-none": {"quantization": "none", "use_rslora": True, "lora_r": 8},
    "dora-none": {"quantization": "none", "use_dora": True},
    "pissa-none": {"quantization": "none", "init_lora_weights": "pissa"},
    "olora-none": {"quantization": "none", "init_lora_weights": "olora"},
}


def flags(**overrides):
    values = TRAIN_FLAGS.defaults()
    values.update(base_model="builtin:tiny-llama", data_path=str(SAMPLE), report_to="none", **SMALL_RUN)
    values.update(batch_size=2, max_steps=2, cutoff_len=64, learning_rate=5e-3, lora_dropout=0.0, save_steps=100)
    values.update(overrides)
    return values


def logits_of(model, tokenizer):
    model.eval()
    compute_8bit_as_trained(model)
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits.float() for t in PROMPTS], dim=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(name) -> (adapter folder, logits of the trained model in memory, the Recipe); cached."""
    done = {}

    def train(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "adapter"
            prepared = Recipe.from_flags(flags(output_dir=str(out), **VARIANTS[name])).setup()
            prepared.train()
            reference = logits_of(prepared.trainer.model, prepared.tokenizer)
            prepared.save()
            done[name] = out, reference, prepared
        return done[name]

    return train


def merged(adapter, out, method="auto"):
    """merge.py's stages in process (merge_stages.merge): the merged folder written, then --verify's report."""
    values = {**cli.entry_defaults(cli.script_entry("merge")), "peft_model_path": str(adapter), "output_dir": str(out)}
    values.update(dtype="float32", method=method, verify=True)
    return merge_stages.merge(values).verify


@pytest.mark.parametrize("name", VARIANTS)
def test_merged_variant_equals_the_trained_model(trained, name, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, reference, prepared = trained(name)
    report = merged(adapter, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    diff = (logits_of(model, prepared.tokenizer) - reference).abs().max().item()
    assert diff < 1e-4, (name, diff)  # the tolerance of plain LoRA's dequant merge (test_merge.py)
    assert report["max_abs_diff"] < 1e-4 and report["agreement"] == 1.0, report


def test_the_adapters_really_moved(trained):
    """Each variant's trained model differs from its base: the fidelity above is not that of a no-op."""
    from transformers import AutoModelForCausalLM

    _, reference, prepared = trained("dora-none")
    base = AutoModelForCausalLM.from_pretrained(prepared.run.base_model_path, dtype=torch.float32)
    assert (logits_of(base, prepared.tokenizer) - reference).abs().max() > 0.05


def test_pissa_adapter_is_saved_for_the_unchanged_base(trained):
    import json

    adapter, _, prepared = trained("pissa-none")
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 2 * prepared.run.lora_r and saved["init_lora_weights"] is True


def test_rslora_scale_is_alpha_over_sqrt_r_in_training_and_merge(trained):
    from platy.merging import Adapter

    adapter, _, prepared = trained("rslora-4bit")
    run = prepared.run
    layers = [m for m in prepared.trainer.model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert layers and {m.scaling["default"] for m in layers} == {run.lora_alpha / run.lora_r**0.5}
    read = Adapter(adapter)
    assert {read.scale(module) for module in read.modules} == {run.lora_alpha / run.lora_r**0.5}
    assert prepared.record.lora_scale == run.lora_alpha / run.lora_r**0.5 != 2.0


def test_loftq_start_is_nearer_the_unquantized_weights(tmp_path):
    """||W - dequantize(base) - scale B A|| of each adapted layer, at the start: LoftQ against plain QLoRA."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    def start_error(init, iterations=1):
        out = tmp_path / f"{init}{iterations}"
        prepared = Recipe.from_flags(flags(output_dir=str(out), init_lora_weights=init, loftq_iter=iterations)).setup()
        weights = load_file(f"{prepared.run.base_model_path}/model.safetensors")
        errors = {}
        for name, module in prepared.trainer.model.named_modules():
            if type(module).__name__ == "Linear4bit" and hasattr(module, "lora_A"):
                base = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
                update = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                key = name.removeprefix("base_model.model.") + ".weight"
                errors[name] = (weights[key].float() - base - update).norm().item()
        return errors, prepared.record.loftq

    plain, _ = start_error("default")
    loftq, report = start_error("loftq")
    assert plain.keys() == loftq.keys() and len(plain) == 6
    assert all(loftq[name] < 0.95 * plain[name] for name in plain), (plain, loftq)
    assert report["layers"] == 6 and report["relative_error_after"] < report["relative_error_before"]
    # LoftQ's alternation: requantizing around the adapter lowers the error further (measured on the weights)
    iterated, iterated_report = start_error("loftq", 3)
    assert sum(iterated.values()) < sum(loftq.values()), (loftq, iterated)
    assert iterated_report["relative_error_after"] < report["relative_error_after"]
    assert iterated_report["relative_error_before"] == pytest.approx(report["relative_error_before"])


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        ("mistral", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        ("qwen2", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ],
)
def test_all_linear_is_every_decoder_linear_but_the_head(arch, expected, request):
    from platy.modeling import load_config, meta_model, resolve_target_modules

    folder = {"llama": "tiny_llama", "mistral": "tiny_mistral", "qwen2": "tiny_qwen2"}[arch]
    model = meta_model(load_config(str(request.getfixturevalue(folder)), flag="--base_model"))
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" in linear
    assert resolve_target_modules(["all-linear"], model, folder) == expected == sorted(linear - {"lm_head"})


def test_all_linear_is_resolved_recorded_and_trained(tmp_path):
    run = config.resolve(flags(output_dir=str(tmp_path / "o"), lora_target_modules="all-linear", dry_run=True))
    assert run.flags()["lora_target_modules"] == ["all-linear"]
    assert run.lora_targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert recipe.lora_resolved(run)["lora_target_modules"] == run.lora_targets


def train_steps(out, steps, resume=None, **overrides):
    # a resume here continues another output_dir's checkpoint: the test's own, so trusted
    resumed = {"resume_from_checkpoint": resume, "trust_checkpoint": resume is not None}
    prepared = Recipe.from_flags(
        flags(output_dir=str(out), max_steps=steps, save_steps=2, **resumed, **overrides)
    ).setup()
    prepared.train()
    return prepared.trainer


def lora_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "knobs",
    [
        {"loraplus_lr_ratio": 16, "optim": "paged_adamw_8bit"},
        {"optim": "adamw_bnb_8bit", "init_lora_weights": "loftq", "loftq_iter": 3},
        {"optim": "paged_adamw_32bit"},
    ],
    ids=["loraplus-paged8bit", "bnb8bit-loftq3", "paged32bit"],
)
def test_optimizers_and_loraplus_resume_bit_identically(tmp_path, knobs):
    whole = train_steps(tmp_path / "whole", 3, **knobs)  # writes checkpoint-2 on its way
    resumed = train_steps(tmp_path / "resumed", 3, resume=str(tmp_path / "whole" / "checkpoint-2"), **knobs)
    optimizer = whole.optimizer.optimizer
    assert type(optimizer).__module__.startswith("bitsandbytes")
    assert (optimizer.args.optim_bits, optimizer.is_paged) == {
        "paged_adamw_8bit": (8, True),
        "adamw_bnb_8bit": (8, False),
        "paged_adamw_32bit": (32, True),
    }[knobs["optim"]]
    a, b = lora_state(whole), lora_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # a LoftQ run with iterations keeps the offsets of its base in every checkpoint, and resumes on that base
    assert (tmp_path / "whole" / "checkpoint-2" / LOFTQ_OFFSET).is_file() == ("loftq_iter" in knobs)
    if "loraplus_lr_ratio" in knobs:
        groups = [g for g in whole.optimizer.param_groups if g["params"]]
        lr = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
        named = dict(whole.model.named_parameters())
        a_lr = {lr[id(p)] for n, p in named.items() if "lora_A" in n}
        b_lr = {lr[id(p)] for n, p in named.items() if "lora_B" in n}
        assert a_lr == {flags()["learning_rate"]} and b_lr == {16 * flags()["learning_rate"]}


def test_neftune_changes_training_only(tmp_path):
    """Same seed: the training loss differs with NEFTune; the eval loss before training (with the noise hook
    on) and the saved adapter's eval-mode answers are noise-free."""
    from peft import PeftModel

    from platy.modeling import load_model

    runs = {}
    for alpha in (None, 5.0):
        out = tmp_path / f"neftune-{alpha}"
        prepared = Recipe.from_flags(
            flags(output_dir=str(out), neftune_noise_alpha=alpha, val_set_size=4, max_steps=1)
        ).setup()
        result = prepared.train()
        history = prepared.trainer.state.log_history
        runs[alpha] = ([r["loss"] for r in history if "loss" in r], history[0]["eval_loss"], prepared, result)
        prepared.save()
    (plain_losses, plain_eval, *_), (noisy_losses, noisy_eval, prepared, _) = runs[None], runs[5.0]
    assert plain_losses[0] != noisy_losses[0]
    assert plain_eval == noisy_eval
    embeddings = prepared.trainer.model.get_input_embeddings()
    hooks = [getattr(hook, "__name__", "") for hook in embeddings._forward_hooks.values()]
    assert not [h for h in hooks if "neftune" in h], hooks  # the Trainer took the noise off after training
    trained = logits_of(prepared.trainer.model, prepared.tokenizer)
    base = load_model(prepared.run.base_model_path, "4bit", "fp32", placement={"": "cpu"}, flag="--base_model")
    loaded = PeftModel.from_pretrained(base, prepared.run.output_dir)
    assert torch.equal(logits_of(loaded, prepared.tokenizer), trained)
    assert torch.equal(logits_of(loaded, prepared.tokenizer), trained)  # and again: no noise in eval mode


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"init_lora_weights": "loftq", "quantization": "none"}, ["--init_lora_weights loftq", "--quantization 4bit"]),
        ({"init_lora_weights": "pissa"}, ["--init_lora_weights pissa", "--quantization none"]),
        ({"init_lora_weights": "olora", "quantization": "8bit"}, ["--init_lora_weights olora", "8bit"]),
        ({"use_dora": True, "init_lora_weights": "loftq"}, ["--use_dora", "--init_lora_weights loftq"]),
        ({"neftune_noise_alpha": 5, "packing": True}, ["--neftune_noise_alpha", "--packing"]),
        ({"use_dora": True, "finetuning": "full", "quantization": "none"}, ["--use_dora", "--finetuning full"]),
        ({"optim": "sgd"}, ["--optim sgd", "adamw_torch_fused"]),
        (
            {"init_lora_weights": "pissa_niter_0", "quantization": "none"},
            ["--init_lora_weights pissa_niter_0", "pissa_niter_N"],
        ),
        ({"loraplus_lr_ratio": 0}, ["--loraplus_lr_ratio"]),
        ({"loftq_iter": 3}, ["--loftq_iter 3", "--init_lora_weights loftq"]),
    ],
)
def test_refused_combinations_name_both_flags(overrides, fragments):
    problems = config.check_flags(flags(**overrides))
    assert len(problems) == 1 and all(f in problems[0] for f in fragments), problems


def test_merge_refuses_a_checkpoint_of_a_pissa_run(trained, tmp_path):
    import json
    import shutil

    from platy.cli import UserError
    from platy.merging import Adapter

    adapter, *_ = trained("pissa-none")
    unconverted = tmp_path / "checkpoint-3"
    shutil.copytree(adapter, unconverted, ignore=shutil.ignore_patterns("checkpoint-*"))  # none inside a checkpoint
    saved = json.loads((unconverted / "adapter_config.json").read_text())
    (unconverted / "adapter_config.json").write_text(json.dumps({**saved, "init_lora_weights": "pissa"}))
    reseal(unconverted)  # a checkpoint is saved before the conversion
    with pytest.raises(UserError, match="merge the run's final adapter in its output_dir"):
        Adapter(unconverted)


def test_an_interrupted_final_save_of_a_pissa_run_is_exported_converted(tmp_path):
    """The last checkpoint holds the whole run but the final save was cut: the exported adapter is the
    converted one, as the uninterrupted save wrote it."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    knobs = {"quantization": "none", "init_lora_weights": "pissa_niter_2"}
    values = flags(output_dir=str(out), max_steps=2, save_steps=2, **knobs)
    prepared = Recipe.from_flags(values).setup()
    prepared.train()
    prepared.save()
    converted = load_file(out / "adapter_model.safetensors")
    for name in ("adapter_model.safetensors", "adapter_config.json", "run_config.json"):
        (out / name).unlink()  # as if the final save had been killed after checkpoint-2
    argv = [f"--{k}={v}" for k, v in values.items() if v is not None and k != "report_to"]
    cli.call(cli.script_entry("finetune"), [*argv, "--report_to", "none", "--resume_from_checkpoint", "auto"])
    exported = load_file(out / "adapter_model.safetensors")
    assert exported.keys() == converted.keys()
    assert all(torch.allclose(exported[k], converted[k], atol=1e-6) for k in converted)


def test_a_resumed_loftq_run_trains_on_the_base_of_its_checkpoint(tmp_path):
    """A resume quantizes the base around the checkpoint's saved offsets, not around a new alternation:
    offsets changed on purpose (and resealed) are the ones the resumed base's 4-bit codes come from."""
    from safetensors.torch import load_file, save_file

    from platy.quantized import quantize_4bit_as_loaded

    knobs = {"init_lora_weights": "loftq", "loftq_iter": 3}
    train_steps(tmp_path / "run", 2, **knobs)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = load_file(checkpoint / LOFTQ_OFFSET)
    changed = {key: t * 0.5 if key.endswith(".L") else t for key, t in saved.items()}
    save_file(changed, checkpoint / LOFTQ_OFFSET)
    reseal(checkpoint)
    again = flags(output_dir=str(tmp_path / "again"), max_steps=3, save_steps=2, **knobs)
    prepared = Recipe.from_flags({**again, "resume_from_checkpoint": str(checkpoint), "trust_checkpoint": True}).setup()
    layout = prepared.record.quantization_layout
    weights = load_file(f"{prepared.run.base_model_path}/model.safetensors")
    module = "model.layers.0.mlp.gate_proj"
    layer = prepared.trainer.model.get_base_model().get_submodule(module).get_base_layer()
    weight = weights[f"{module}.weight"]

    def codes(factors):
        return quantize_4bit_as_loaded(weight, layout, (factors[f"{module}.L"], factors[f"{module}.R"]))[0]

    assert not torch.equal(codes(changed), codes(saved))  # the change reaches the 4-bit codes
    assert torch.equal(layer.weight.data, codes(changed))


def test_loftq_offsets_and_the_run_that_made_them_must_agree(trained, tmp_path):
    import shutil

    from platy.cli import UserError
    from platy.merging import Adapter

    adapter, *_ = trained("loftq3-4bit")
    missing = tmp_path / "missing"
    shutil.copytree(adapter, missing, ignore=shutil.ignore_patterns("checkpoint-*"))
    (missing / LOFTQ_OFFSET).unlink()
    reseal(missing)  # as if copied without it
    with pytest.raises(UserError, match=f"{LOFTQ_OFFSET} is missing.*--loftq_iter 3.*copy it from"):
        Adapter(missing)
    stale = tmp_path / "stale"
    shutil.copytree(trained("plain-4bit")[0], stale, ignore=shutil.ignore_patterns("checkpoint-*"))
    shutil.copy(adapter / LOFTQ_OFFSET, stale / LOFTQ_OFFSET)
    reseal(stale)  # an earlier run's file left in the folder
    with pytest.raises(UserError, match="does not belong to this adapter.*delete it"):
        Adapter(stale)
