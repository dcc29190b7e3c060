"""What verification adds to a checkpoint save, a resume and a merge, on the merge-memory benchmark's model.

    python bench/integrity.py               # the 2.1 GB fp16 Llama-shaped checkpoint of bench/merge_memory.py
    python bench/integrity.py --layers 4    # a quicker, smaller run

Builds the synthetic checkpoint and LoRA adapter of bench/merge_memory.py, then times, side by side:
- save: a LoRA checkpoint of that model (fp32 adapter, AdamW state) written, against its manifest
  (size and sha256 of every file); and the full-model files (what a full fine-tuning checkpoint
  holds besides the optimizer) against their sha256;
- resume: loading that checkpoint's adapter and optimizer state, against verifying it (sizes only,
  and sizes plus sha256);
- merge: merge.py's streaming merge (which hashes each shard as it writes it and checks the base
  headers first) against the same merge with the hashing left out, plus the header checks; and
  `merge.py --check` of the result.
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def lora_checkpoint(folder, adapter):
    """A checkpoint as the Trainer writes one for this adapter: fp32 weights, AdamW moments, schedule."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = {k: v.float() for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    state = {
        i: {"step": torch.tensor(10.0), "exp_avg": t.clone(), "exp_avg_sq": t.square()}
        for i, t in enumerate(weights.values())
    }
    torch.save({"state": state, "param_groups": [{"lr": 1e-4, "params": list(state)}]}, folder / "optimizer.pt")
    torch.save({"last_epoch": 10}, folder / "scheduler.pt")
    shutil.copy(adapter / "adapter_config.json", folder / "adapter_config.json")


def load_checkpoint(folder):
    import torch
    from safetensors.torch import load_file

    load_file(str(folder / "adapter_model.safetensors"))
    torch.load(folder / "optimizer.pt", weights_only=True)


def main(layers=18, hidden=2048, intermediate=5504, vocab=32000, shard_mb=500, workdir=None):
    from bench.merge_memory import build_adapter, build_checkpoint
    from platy import cli, integrity
    from platy.base_weights import base_checkpoint
    from platy.merge_stages import check_folder

    work = Path(workdir or tempfile.mkdtemp(prefix="integrity-bench-"))
    base, adapter, checkpoint, out = work / "base", work / "adapter", work / "checkpoint-10", work / "merged"
    try:
        config = build_checkpoint(base, layers, hidden, intermediate, vocab, shard_mb * 1_000_000)
        build_adapter(adapter, config)
        base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        gb = 1e9
        rows = []

        save_s, _ = timed(lora_checkpoint, checkpoint, adapter)
        manifest_s, manifest = timed(integrity.write_manifest, checkpoint, step=10)
        ckpt_bytes = sum(r["size"] for r in manifest["files"].values())
        rows.append((f"save: LoRA checkpoint ({ckpt_bytes / 1e6:.0f} MB)", save_s, manifest_s, "manifest (sha256)"))
        digest_s, _ = timed(lambda: [integrity.file_digest(p) for p in sorted(base.glob("*.safetensors"))])
        rows.append((f"save: full-model files ({base_bytes / gb:.2f} GB)", None, digest_s, "sha256 of every shard"))

        load_s, _ = timed(load_checkpoint, checkpoint)
        sizes_s, problem = timed(integrity.folder_problem, checkpoint, hashes=False)
        assert problem is None, problem
        hashes_s, problem = timed(integrity.folder_problem, checkpoint, hashes=True)
        assert problem is None, problem
        rows.append(("resume: load adapter + optimizer", load_s, sizes_s, "sizes + headers"))
        rows.append(("resume: load adapter + optimizer", load_s, hashes_s, "sizes + headers + sha256"))

        def merge_into(folder):
            argv = ["--base_model", str(base), "--peft_model_path", str(adapter), "--output_dir", str(folder)]
            return timed(cli.call, cli.script_entry("merge"), [*argv, "--method", "peft", "--device", "cpu"])[0]

        import peft  # noqa: F401  (imported before any merge is timed, as transformers is through it)

        # the same merge with the streamed sha256 left out (its digests do nothing), then as shipped
        with mock.patch.object(integrity.Digest, "update", lambda self, data: None):
            unhashed_s = merge_into(work / "merged-unhashed")
        shutil.rmtree(work / "merged-unhashed")
        merge_s = merge_into(out)
        headers_s, _ = timed(base_checkpoint, base, "--base_model")
        rows.append((f"merge ({base_bytes / gb:.2f} GB fp16) without sha256", unhashed_s, None, "-"))
        verify_s = headers_s + max(merge_s - unhashed_s, 0.0)
        rows.append(
            (f"merge ({base_bytes / gb:.2f} GB fp16)", merge_s, verify_s, "base headers + index; sha256 streamed")
        )
        check_s, _ = timed(check_folder, str(out))
        rows.append(("merge.py --check of the merged model", None, check_s, "sha256 read back + headers"))

        print(f"\nSynthetic Llama-shaped model: {layers} layers, hidden {hidden}; LoRA r 16 on gate/up/down")
        print(f"{'operation':<44}{'seconds':>9}{'verify (s)':>12}{'share':>8}  verification")
        for label, base_s, verify_s, what in rows:
            share = f"{100 * verify_s / base_s:.1f}%" if base_s and verify_s is not None else "-"
            shown = f"{base_s:.2f}" if base_s else "-"
            verified = f"{verify_s:.3f}" if verify_s is not None else "-"
            print(f"{label:<44}{shown:>9}{verified:>12}{share:>8}  {what}")
        hash_rate = base_bytes / digest_s / gb
        print(f"sha256 throughput here: {hash_rate:.2f} GB/s (the merge hashes each shard as it writes it)")
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import fire

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fire.Fire(main)
