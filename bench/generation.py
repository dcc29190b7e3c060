"""Prompts per second: batched generation (inference.py) against one prompt at a time.

    python bench/generation.py                                  # embedded tiny model, CPU
    python bench/generation.py --base_model ./outputs/merged --batch_size 16 --prompts 64

One-at-a-time is what the original Platypus inference script does. Both runs use greedy
decoding on the same prompts, and the script checks that their answers are identical,
so the work compared is the same. --result_file writes the figures as JSON too.
"""

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(
    base_model="builtin:tiny-llama", lora_weights=None, prompts=64, batch_size=16, max_new_tokens=32, result_file=None
):
    import json

    import torch

    from platy import cli, inference_stages

    rows = json.loads((REPO / "data" / "sample_platypus.json").read_text(encoding="utf-8"))[:prompts]
    rows = [{"instruction": r["instruction"], "input": r["input"]} for r in rows]
    flags = {
        **cli.entry_defaults(cli.script_entry("inference")),
        "base_model": base_model,
        "lora_weights": lora_weights,
        "prompt": "x",
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": 0,
    }
    generator = inference_stages.prepare(flags)
    generator.generate(rows[:2])  # warm-up

    def timed(fn):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    batched, t_batched = timed(
        lambda: [a for i in range(0, len(rows), batch_size) for a in generator.generate(rows[i : i + batch_size])]
    )
    single, t_single = timed(lambda: [generator.generate([r])[0] for r in rows])
    same = sum(a == b for a, b in zip(batched, single))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{len(rows)} prompts, greedy, max_new_tokens {max_new_tokens}, {base_model} on {device}")
    print(f"{'mode':<28}{'seconds':>10}{'prompts/s':>12}")
    print(f"{'one at a time (baseline)':<28}{t_single:>10.2f}{len(rows) / t_single:>12.2f}")
    print(f"{f'batched, batch_size {batch_size}':<28}{t_batched:>10.2f}{len(rows) / t_batched:>12.2f}")
    print(f"speed-up: {t_single / t_batched:.2f}x; identical answers: {same}/{len(rows)}")
    if result_file:
        from platy.files import write_json

        figures = {"prompts": len(rows), "batch_size": batch_size, "max_new_tokens": max_new_tokens}
        figures.update(model=base_model, device=device, seconds_single=t_single, seconds_batched=t_batched)
        figures.update(speedup=t_single / t_batched, identical=same)
        write_json(Path(result_file), figures)


if __name__ == "__main__":
    import fire

    from platy import cli

    cli.quiet_libraries()
    fire.Fire(main)
