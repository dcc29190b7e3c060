"""Fuse a LoRA adapter into base weights, one tensor at a time, shard by shard.

Peak memory is about one output shard plus the adapter: the base checkpoint is read lazily
(safetensors) and merged tensors are written as soon as a shard is full.
"""

import json
import os
import re
from pathlib import Path

from platy.cli import UserError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float32": "float32", "fp32": "float32"}
METHODS = ("auto", "dequant", "peft")
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def parse_size(text):
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise UserError(f"--max_shard_size {text}: give a size such as 5GB, 500MB or a byte count")
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(match.group(1)) * base ** power)


class Adapter:
    """A saved LoRA adapter: its config, weights grouped per module, and the run configuration."""

    def __init__(self, folder):
        import torch

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"--peft_model_path {folder}: folder not found; give the output_dir of finetune.py "
                            "or a checkpoint-N folder")
        config_path = self.folder / "adapter_config.json"
        weights = next((self.folder / n for n in ADAPTER_FILES if (self.folder / n).is_file()), None)
        if not config_path.is_file() or weights is None:
            raise UserError(f"--peft_model_path {folder}: no adapter_config.json and adapter_model.safetensors "
                            "there; give the output_dir of finetune.py or a checkpoint-N folder")
        self.config = json.loads(config_path.read_text())
        self._check_supported()
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(weights))
        else:
            tensors = torch.load(str(weights), map_location="cpu", weights_only=True)
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise UserError(f"--peft_model_path {folder}: the adapter holds NaN or inf values ({len(bad)} tensors, "
                            f"e.g. {bad[0]}); the run diverged: use an earlier checkpoint-N or retrain with a lower "
                            "learning rate")
        self.modules = {}
        for key, tensor in tensors.items():
            match = LORA_KEY.match(key)
            if not match:
                raise UserError(f"--peft_model_path {folder}: unexpected tensor {key} in the adapter; only LoRA "
                                "A/B weights can be merged")
            self.modules.setdefault(match["module"], {})[match["part"]] = tensor
        incomplete = [m for m, parts in self.modules.items() if set(parts) != {"A", "B"}]
        if incomplete or not self.modules:
            raise UserError(f"--peft_model_path {folder}: adapter weights are incomplete "
                            f"({incomplete[0] if incomplete else 'no LoRA weights'})")
        run_config_path = self.folder / "run_config.json"
        self.run_config = json.loads(run_config_path.read_text()) if run_config_path.is_file() else None

    def _check_supported(self):
        config = self.config
        if config.get("peft_type", "LORA") != "LORA":
            raise UserError(f"--peft_model_path {self.folder}: a {config.get('peft_type')} adapter; merge.py fuses "
                            "LoRA adapters")
        for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
            if config.get(key, ok) != ok:
                raise UserError(f"--peft_model_path {self.folder}: adapters with {key}={config[key]} are not "
                                "supported by the streaming merge")
        if config.get("modules_to_save"):
            raise UserError(f"--peft_model_path {self.folder}: adapters with modules_to_save are not supported")

    def scale(self, module):
        """lora_alpha / r (or / sqrt(r) with rsLoRA), with per-module overrides."""
        short = module.rsplit(".", 1)[-1]
        r = self.config.get("rank_pattern", {}).get(short, self.config["r"])
        alpha = self.config.get("alpha_pattern", {}).get(short, self.config["lora_alpha"])
        return alpha / (r ** 0.5 if self.config.get("use_rslora") else r)

    def delta(self, module, device="cpu"):
        """B @ A x scale in float32, the update the adapter adds to module.weight."""
        import torch

        parts = self.modules[module]
        a = parts["A"].to(device, torch.float32)
        b = parts["B"].to(device, torch.float32)
        return (b @ a) * self.scale(module)


def base_checkpoint(base_path):
    """(weight files, weight_map) of a local Hugging Face model folder; safetensors preferred."""
    folder = Path(base_path)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            return [folder / f for f in files]
        if (folder / single).is_file():
            return [folder / single]
    raise UserError(f"--base_model {base_path}: no model.safetensors or pytorch_model.bin (or their index) in the "
                    "folder")


def iter_tensors(path):
    """(name, tensor) pairs of one weight file, read one tensor at a time where the format allows."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        for name in list(state):
            yield name, state.pop(name)


def rebuild_quantized(weight, layout):
    """The weight as training saw it: quantized as bitsandbytes did at load time, dequantized."""
    import bitsandbytes.functional as bnbf
    import torch

    if layout["quantization"] == "4bit":
        loaded = weight.to(getattr(torch, layout["load_dtype"])).contiguous()
        packed, state = bnbf.quantize_4bit(loaded, blocksize=layout["blocksize"],
                                           compress_statistics=layout["double_quant"],
                                           quant_type=layout["quant_type"],
                                           quant_storage=getattr(torch, layout["quant_storage"]))
        return bnbf.dequantize_4bit(packed, state).to(torch.float32)
    codes, stats, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return bnbf.int8_vectorwise_dequant(codes, stats).to(torch.float32)


class ShardWriter:
    """Writes tensors into safetensors shards of at most max_bytes, then the index."""

    def __init__(self, folder, max_bytes):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.pending, self.pending_bytes = {}, 0
        self.files, self.weight_map, self.total = [], {}, 0

    def add(self, name, tensor):
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self):
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        """Name shards as transformers expects; write the index when there are several."""
        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        names = []
        for number, (path, keys) in enumerate(self.files, start=1):
            name = f"model-{number:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            self.weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def merge_stream(base_path, adapter, method, layout, out_dtype, out_folder, max_bytes, device="cpu"):
    """Merge shard by shard into out_folder. Returns stats (tensors, merged modules, bytes)."""
    import torch
    from tqdm import tqdm

    dtype = getattr(torch, out_dtype)
    quantized = set(layout["modules"]) if method == "dequant" and layout else set()
    load_dtype = getattr(torch, layout["load_dtype"]) if method == "dequant" and layout else None
    pending_modules = set(adapter.modules)
    writer = ShardWriter(out_folder, max_bytes)
    files = base_checkpoint(base_path)
    for path in files:
        with tqdm(desc=f"Merging {path.name}", unit=" tensors", leave=True, dynamic_ncols=True) as bar:
            for name, tensor in iter_tensors(path):
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if tensor.is_floating_point():
                    if module in quantized:
                        tensor = rebuild_quantized(tensor.to(device), layout)
                    elif load_dtype is not None:
                        tensor = tensor.to(load_dtype)  # as training loaded it
                    if module in adapter.modules:
                        delta = adapter.delta(module, device)
                        if delta.shape != tensor.shape:
                            raise UserError(
                                f"adapter does not fit the base model: {module} is {tuple(tensor.shape)} in the base "
                                f"but the adapter update is {tuple(delta.shape)}; merge with the base model the "
                                "adapter was trained on")
                        tensor = tensor.to(device, torch.float32) + delta
                        pending_modules.discard(module)
                    tensor = tensor.to(dtype)
                writer.add(name, tensor.to("cpu"))
                bar.update(1)
    if pending_modules:
        missing = sorted(pending_modules)
        raise UserError(f"adapter does not fit the base model: {len(missing)} adapted modules are not in the base "
                        f"(e.g. {missing[0]}); merge with the base model the adapter was trained on")
    shards = writer.close()
    return {"shards": shards, "bytes": writer.total, "merged_modules": len(adapter.modules)}


def resolve_local_base(base_model):
    """A local folder for the base weights: as given, the embedded tiny model, or a hub snapshot."""
    from platy.modeling import resolve_base_model

    path = resolve_base_model(base_model)
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    except Exception as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--base_model {base_model}: not a local folder and not downloadable ({detail}); "
                        "download it first or check the name") from err


def output_config(base_path, out_dtype):
    """The base config.json as a plain model: no quantization_config, the output dtype."""
    config = json.loads((Path(base_path) / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = out_dtype
    return config


def swap_into_place(tmp, output_dir):
    """Move the finished tmp folder to output_dir; an old output_dir goes only once the new one is there."""
    import shutil

    output_dir = Path(output_dir)
    old = None
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(old)
    Path(tmp).rename(output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
