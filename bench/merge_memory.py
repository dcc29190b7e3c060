"""Peak memory of merging an adapter: streaming merge.py against PEFT's load-everything merge.

    python bench/merge_memory.py                     # ~2.1 GB fp16 Llama-shaped checkpoint, 5 shards
    python bench/merge_memory.py --layers 4          # a quicker, smaller run

Builds a synthetic multi-shard checkpoint (random weights, Llama layout) and a random LoRA
adapter on gate/up/down (r 16), then runs each merge in its own process and reads that
process's peak resident memory (ru_maxrss). Prints the figures side by side with the size
of the largest shard; the goal is a streaming peak of at most 2x the largest shard.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_checkpoint(folder, layers, hidden, intermediate, vocab, shard_bytes):
    """A Llama-shaped fp16 checkpoint written tensor by tensor (never whole in memory)."""
    import torch
    from transformers import LlamaConfig

    from platy.merging import ShardFile, plan_shards, shard_names

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    config.save_pretrained(folder)
    shapes = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(f"{p}self_attn.{n}.weight", [hidden, hidden]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        shapes += [
            (f"{p}mlp.gate_proj.weight", [intermediate, hidden]),
            (f"{p}mlp.up_proj.weight", [intermediate, hidden]),
            (f"{p}mlp.down_proj.weight", [hidden, intermediate]),
            (f"{p}input_layernorm.weight", [hidden]),
            (f"{p}post_attention_layernorm.weight", [hidden]),
        ]
    shapes += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
    plan = plan_shards([(name, "float16", shape) for name, shape in shapes], shard_bytes)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard_name, shard_plan in zip(shard_names(len(plan)), plan):
        out = ShardFile(Path(folder) / shard_name, shard_plan)
        for name, _, shape, _ in shard_plan:
            tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(*shape, generator=gen) * 0.02
            out.write(name, tensor.to(torch.float16))
            weight_map[name] = shard_name
        out.close()
    if len(plan) > 1:
        (Path(folder) / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return config


def build_adapter(folder, config, rank=16):
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    tensors = {}
    shapes = {
        "gate_proj": (config.intermediate_size, config.hidden_size),
        "up_proj": (config.intermediate_size, config.hidden_size),
        "down_proj": (config.hidden_size, config.intermediate_size),
    }
    for i in range(config.num_hidden_layers):
        for name, (out_f, in_f) in shapes.items():
            key = f"base_model.model.model.layers.{i}.mlp.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "target_modules": list(shapes),
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "base_model_name_or_path": None,
            }
        )
    )


def child(mode, base, adapter, out):
    """One merge, in this process; prints its peak RSS and the RSS of the loaded libraries."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from platy import cli

    libraries = current_rss()  # interpreter + torch + transformers + peft, before any weight is read
    started = time.time()
    if mode == "stream":
        argv = ["--base_model_name_or_path", str(base), "--peft_model_path", str(adapter), "--output_dir", str(out)]
        cli.call(cli.script_entry("merge"), [*argv, "--method", "peft", "--dtype", "float16", "--device", "cpu"])
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float16)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(str(out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "peak_rss": peak, "libraries": libraries, "seconds": time.time() - started}))


def current_rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(mode, *paths, script=__file__):
    """Run `script --child mode paths...` in a fresh process (its own peak memory) and return the JSON it
    prints last."""
    result = subprocess.run([sys.executable, script, "--child", mode, *map(str, paths)], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(layers=18, hidden=2048, intermediate=5504, vocab=32000, shard_mb=500, workdir=None):
    work = Path(workdir or tempfile.mkdtemp(prefix="merge-bench-"))
    base, adapter = work / "base", work / "adapter"
    try:
        config = build_checkpoint(base, layers, hidden, intermediate, vocab, shard_mb * 1_000_000)
        build_adapter(adapter, config)
        shards = sorted(base.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        stream = run_child("stream", base, adapter, work / "out-stream")
        peft = run_child("peft", base, adapter, work / "out-peft")
        gb = 1e9
        print(
            f"\nSynthetic Llama-shaped checkpoint: {layers} layers, hidden {hidden}, {total / gb:.2f} GB fp16 in "
            f"{len(shards)} shards (largest {largest / gb:.2f} GB); LoRA r 16 on gate/up/down"
        )
        print("peak RSS: the whole process; merge memory: peak RSS minus the RSS of the loaded libraries")
        print(f"{'merge':<34}{'peak RSS (GB)':>14}{'merge memory (GB)':>19}{'x largest shard':>17}{'seconds':>9}")
        for label, row in (("streaming (merge.py)", stream), ("PEFT load-everything (baseline)", peft)):
            row["merge"] = row["peak_rss"] - row["libraries"]
            print(
                f"{label:<34}{row['peak_rss'] / gb:>14.2f}{row['merge'] / gb:>19.2f}"
                f"{row['merge'] / largest:>17.2f}{row['seconds']:>9.1f}"
            )
        verdict = "met" if stream["merge"] <= 2 * largest else "NOT met"
        print(
            f"goal: streaming merge memory <= 2x largest shard: {verdict}; "
            f"PEFT / streaming merge memory: {peft['merge'] / stream['merge']:.1f}x"
        )
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        import fire

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        fire.Fire(main)
