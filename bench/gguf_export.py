"""Time and peak memory of merge.py --gguf against writing the GGUF with every tensor held in memory.

    python bench/gguf_export.py                  # the merge-memory benchmark's 2.1 GB fp16 Llama-shaped model
    python bench/gguf_export.py --layers 4       # a quicker, smaller run

Builds bench/merge_memory.py's synthetic checkpoint and LoRA adapter (with the embedded tiny model's
tokenizer, its vocabulary padded to the 32,000 embedding rows), then runs in separate processes:
the merge alone, the merge with --gguf f16,q8_0, and for each type a baseline that converts every
tensor first and hands them all to GGUFWriter before writing (GGUFWriter's add_tensor path, as a
plain conversion script uses it). Each process reports its peak resident memory (ru_maxrss) and the
resident memory of its loaded libraries.
"""

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from merge_memory import build_adapter, build_checkpoint, current_rss  # noqa: E402
from merge_memory import run_child as merge_child  # noqa: E402

TYPES = ("f16", "q8_0")


def child(mode, base, adapter, out):
    """One run in this process; prints its figures as JSON."""
    import gguf  # noqa: F401  (every library loaded before the baseline RSS is read)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from platy import cli, gguf_export

    libraries = current_rss()
    started = time.time()
    argv = ["--base_model_name_or_path", base, "--peft_model_path", adapter, "--output_dir", out]
    argv += ["--method", "peft", "--device", "cpu"]
    result = {"mode": mode}
    if mode == "merge":
        cli.call(cli.script_entry("merge"), argv)
    elif mode == "merge+gguf":
        cli.call(cli.script_entry("merge"), [*argv, "--gguf", ",".join(TYPES)])
        written = json.loads((Path(out) / "merge_config.json").read_text())["gguf"]
        result["files"] = {t: {"bytes": w["bytes"], "seconds": w["seconds"]} for t, w in written.items()}
    elif mode.startswith("stream-"):  # the export alone, as merge.py runs it, from the merged folder `base`
        metadata = {"name": "bench", "description": "streaming"}
        result["bytes"] = gguf_export.write_gguf(Path(base), mode.split("-", 1)[1], Path(out), metadata)["bytes"]
    else:  # baseline-<type>, from the merged folder `base`
        result["bytes"] = write_all_in_memory(Path(base), mode.split("-", 1)[1], Path(out))
    result.update(
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        libraries=libraries,
        seconds=time.time() - started,
    )
    print(json.dumps(result))


def write_all_in_memory(folder, gguf_type, destination):
    """The baseline: the same tensors and metadata, all converted first, then written by GGUFWriter."""
    import gguf

    from platy import gguf_export as ge
    from platy.base_weights import TensorSource, base_checkpoint

    config = json.loads((folder / "config.json").read_text())
    arch = getattr(gguf.MODEL_ARCH, ge.ARCHITECTURES[config["model_type"]])
    qtype = getattr(gguf.GGMLQuantizationType, ge.GGUF_TYPES[gguf_type][0])
    sources = [TensorSource(p) for p in base_checkpoint(folder, "--output_dir")]
    plan = ge.tensor_plan(sources, arch, config, qtype)
    rows = next(shape[0] for _, name, _, _, shape in plan if name == "model.embed_tokens.weight")
    writer = gguf.GGUFWriter(str(destination), gguf.MODEL_ARCH_NAMES[arch])
    file_type = getattr(gguf.LlamaFileType, ge.GGUF_TYPES[gguf_type][1])
    ge.add_general(writer, {"name": "bench", "description": "baseline"}, file_type)
    ge.add_hyperparameters(writer, config, rows)
    ge.add_vocabulary(writer, folder, rows)
    for source, name, gguf_name, out_type, _ in plan:
        stored = ge.stored_tensor(source.read(name), name, out_type, config)
        writer.add_tensor(gguf_name, stored, raw_dtype=ge.raw_type(out_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return destination.stat().st_size


def run_child(mode, *paths):
    return merge_child(mode, *paths, script=__file__)


def main(layers=18, hidden=2048, intermediate=5504, vocab=32000, shard_mb=500, workdir=None):
    from platy import tiny

    work = Path(workdir or tempfile.mkdtemp(prefix="gguf-bench-"))
    base, adapter = work / "base", work / "adapter"
    try:
        config = build_checkpoint(base, layers, hidden, intermediate, vocab, shard_mb * 1_000_000)
        build_adapter(adapter, config)
        tokenizer = tiny.ensure_model("tiny-llama")
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            shutil.copy(tokenizer / name, base / name)
        shards = sorted(base.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards)
        merged = run_child("merge", base, adapter, work / "merged")
        exported = run_child("merge+gguf", base, adapter, work / "exported")
        streams = {t: run_child(f"stream-{t}", work / "merged", "-", work / f"stream-{t}.gguf") for t in TYPES}
        baselines = {t: run_child(f"baseline-{t}", work / "merged", "-", work / f"baseline-{t}.gguf") for t in TYPES}
        gb = 1e9
        total = sum(p.stat().st_size for p in shards)
        print(
            f"\nSynthetic Llama-shaped checkpoint: {layers} layers, hidden {hidden}, {total / gb:.2f} GB fp16 in "
            f"{len(shards)} shards (largest {largest / gb:.2f} GB); LoRA r 16 on gate/up/down"
        )
        print("memory: peak RSS minus the RSS of the loaded libraries")
        print(f"{'run':<56}{'peak RSS (GB)':>14}{'memory (GB)':>13}{'x largest shard':>17}{'seconds':>9}")
        rows = [("merge.py (safetensors only)", merged), ("merge.py --gguf f16,q8_0 (merge + both files)", exported)]
        for gguf_type in TYPES:
            rows.append((f"{gguf_type} export alone, streaming (merge.py's)", streams[gguf_type]))
            rows.append((f"{gguf_type} baseline: every tensor in memory, then written", baselines[gguf_type]))
        for label, row in rows:
            row["memory"] = row["peak_rss"] - row["libraries"]
            print(
                f"{label:<56}{row['peak_rss'] / gb:>14.2f}{row['memory'] / gb:>13.2f}"
                f"{row['memory'] / largest:>17.2f}{row['seconds']:>9.1f}"
            )
        for gguf_type, info in exported["files"].items():
            print(
                f"  {gguf_type}: {info['bytes'] / gb:.2f} GB written in {info['seconds']:.1f} s by merge.py "
                f"(baseline {baselines[gguf_type]['bytes'] / gb:.2f} GB)"
            )
        exported["memory"] = max(exported["memory"], *(s["memory"] for s in streams.values()))
        verdict = "met" if exported["memory"] <= 2 * largest else "NOT met"
        print(f"goal: merge.py --gguf memory <= 2x largest shard, as for the merge: {verdict}")
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
