"""Merge fidelity of every LoRA variant, side by side: the merged model against the model as trained.

    python bench/lora_variants.py                 # embedded tiny model, CPU, a few minutes
    python bench/lora_variants.py --steps 20

Each variant (plain LoRA, rsLoRA, DoRA, PiSSA, OLoRA, LoftQ, on the bases each supports) is trained
in this process for --steps optimizer steps with a large learning rate (so the adapter moves the
model), then merged into float32 weights by merge.py's stages with each method that applies
(dequant and peft for a quantized base, peft for an unquantized one). Printed per merge: the
largest logit difference between the merged model and the trained model as it was in memory,
greedy next-token agreement, and how far the adapter moved the base (the size of the effect the
merge has to keep). The baseline is the peft method on a quantized base: the original weights
plus the update, which the adapter never saw in training.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from platy import merge_stages  # noqa: E402
from platy.cli import entry_defaults, script_entry  # noqa: E402
from platy.quantized import compute_8bit_as_trained  # noqa: E402
from platy.train.flags import TRAIN_FLAGS  # noqa: E402
from platy.train.recipe import Recipe  # noqa: E402

VARIANTS = [
    ("LoRA", "4bit", {}),
    ("rsLoRA (r 8)", "4bit", {"use_rslora": True, "lora_r": 8}),
    ("DoRA", "4bit", {"use_dora": True}),
    ("LoftQ", "4bit", {"init_lora_weights": "loftq"}),
    ("LoftQ, 3 iterations", "4bit", {"init_lora_weights": "loftq", "loftq_iter": 3}),
    ("LoRA", "8bit", {}),
    ("DoRA", "8bit", {"use_dora": True}),
    ("LoRA", "none", {}),
    ("rsLoRA (r 8)", "none", {"use_rslora": True, "lora_r": 8}),
    ("DoRA", "none", {"use_dora": True}),
    ("PiSSA", "none", {"init_lora_weights": "pissa"}),
    ("OLoRA", "none", {"init_lora_weights": "olora"}),
]
PROMPTS = [
    "### Instruction:\nWhat is the boiling point of water at sea level?\n\n### Response:\n",
    "### Instruction:\nIs 91 a prime number?\n\n### Response:\nNo. 91 = 7 x 13",
    "다음 두 수의 합을 구하시오. 12, 30",
]


def logits(model, tokenizer):
    model.eval()
    compute_8bit_as_trained(model)  # 8-bit layers as training computed them, without int8 activations
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits.float() for t in PROMPTS], dim=1)


def train(folder, quantization, knobs, steps):
    """The adapter folder and the logits of the trained model in memory."""
    flags = {**TRAIN_FLAGS.defaults(), "base_model": "builtin:tiny-llama", "report_to": "none"}
    flags.update(data_path=str(ROOT / "data" / "sample_platypus.json"), output_dir=str(folder))
    flags.update(quantization=quantization, max_steps=steps, batch_size=4, micro_batch_size=2, cutoff_len=128)
    flags.update(learning_rate=5e-3, warmup_steps=0, lora_dropout=0.0, save_steps=10_000, **knobs)
    prepared = Recipe.from_flags(flags).setup()
    prepared.train()
    trained = logits(prepared.trainer.model, prepared.tokenizer)
    prepared.save()
    return trained, prepared


def merged_logits(adapter, out, method, tokenizer):
    from transformers import AutoModelForCausalLM

    flags = {**entry_defaults(script_entry("merge")), "peft_model_path": str(adapter), "output_dir": str(out)}
    flags.update(dtype="float32", method=method)
    merge_stages.merge(flags)
    return logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tokenizer)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for number, (name, quantization, knobs) in enumerate(VARIANTS):
            adapter = Path(tmp) / f"adapter-{number}"
            trained, prepared = train(adapter, quantization, knobs, args.steps)
            base = AutoModelForCausalLM.from_pretrained(prepared.run.base_model_path, dtype=torch.float32)
            effect = (logits(base, prepared.tokenizer) - trained).abs().max().item()
            for method in ("dequant", "peft") if quantization != "none" else ("peft",):
                merged = merged_logits(adapter, Path(tmp) / f"merged-{number}-{method}", method, prepared.tokenizer)
                diff = (merged - trained).abs().max().item()
                agreement = (merged.argmax(-1) == trained.argmax(-1)).float().mean().item()
                rows.append((name, quantization, method, diff, agreement, effect))
    print("\n| variant | base in training | merge | max logit diff to trained | greedy agreement | adapter effect |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, quantization, method, diff, agreement, effect in rows:
        print(f"| {name} | {quantization} | {method} | {diff:.2e} | {100 * agreement:.1f}% | {effect:.2f} |")


if __name__ == "__main__":
    main()
