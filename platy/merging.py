"""Fuse a LoRA adapter into base weights, one tensor at a time, shard by shard.

The base checkpoint is read tensor by tensor and each merged tensor is written at once
into output shards planned from the base headers, so memory holds about one tensor plus
the adapter, whatever the size of the model.
"""

import json
import math
import re
from pathlib import Path

from platy.base_weights import TORCH_TO_SAFETENSORS, TensorSource, base_checkpoint, release_freed_memory
from platy.cli import UserError
from platy.files import ADAPTER_FILES
from platy.integrity import SAFETENSORS_INDEX, Digest, check_folder
from platy.quantized import checked_layout, read_loftq_offsets, rebuild_quantized
from platy.record import RunRecord

DTYPES = {
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
}
METHODS = ("auto", "dequant", "peft")
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
# DoRA's magnitude vector (one per output row of the adapted weight)
MAGNITUDE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
# peft's trainable_token_indices: the trained rows of an embedding (or lm_head), and the grown matrix they sit in
TOKEN_DELTA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$"
)
TOKEN_BASE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\.base_layer\.weight$")
# an adapter still relative to a base that PiSSA or OLoRA changed: a checkpoint-N of such a run
MUTATED_INITS = ("pissa", "olora")


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
    return int(float(match.group(1)) * base**power)


MAX_VOCABULARY = 1 << 22  # 4M token ids: the largest vocabularies in use hold about 256k


def token_indices_problem(given):
    """What is wrong with trainable_token_indices ({module: [token ids]}) before any id sizes a matrix
    (None: every id a distinct whole number below MAX_VOCABULARY)."""
    if not isinstance(given, dict):
        return f"is {type(given).__name__}, not a list or an object"
    for module, indices in given.items():
        if not isinstance(indices, list):
            return f"of {module} is {type(indices).__name__}, not a list of token ids"
        if not all(type(i) is int and 0 <= i < MAX_VOCABULARY for i in indices):
            return f"of {module} holds a value that is no token id (whole numbers from 0 to {MAX_VOCABULARY - 1:,})"
        if len(set(indices)) != len(indices):
            return f"of {module} names a token id twice"
    return None


class Adapter:
    """A saved LoRA adapter: its config, weights grouped per module, and the run's record (RunRecord)."""

    def __init__(self, folder, flag="--peft_model_path", merge=True):
        """merge=False: for peft to apply as it is (DoRA, modules_to_save and the like allowed)."""
        import torch

        self.folder = Path(folder)
        self.flag = flag
        if not self.folder.is_dir():
            raise UserError(
                f"{flag} {folder}: folder not found; give the output_dir of finetune.py or a checkpoint-N folder"
            )
        config_path = self.folder / "adapter_config.json"
        weights = next((self.folder / n for n in ADAPTER_FILES if (self.folder / n).is_file()), None)
        if not config_path.is_file() or weights is None:
            raise UserError(
                f"{flag} {folder}: no adapter_config.json and adapter_model.safetensors "
                "there; give the output_dir of finetune.py or a checkpoint-N folder"
            )
        check_folder(self.folder, f"{flag} {folder}", "copy the adapter again, or use one of its checkpoint-N folders")
        self.config = json.loads(config_path.read_text())
        if merge:
            self._check_supported()
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(weights))
        else:
            tensors = torch.load(str(weights), map_location="cpu", weights_only=True)
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise UserError(
                f"{flag} {folder}: the adapter holds NaN or inf values ({len(bad)} tensors, "
                f"e.g. {bad[0]}); the run diverged: use an earlier checkpoint-N or retrain with a lower "
                "learning rate"
            )
        self.record = RunRecord.read(self.folder)
        self.tokens = self._token_rows(tensors)
        self.modules = self._lora_modules(tensors) if merge else {}
        self.offsets = read_loftq_offsets(self.folder, f"{flag} {folder}", self.record)

    @property
    def vocabulary(self):
        """The vocabulary the adapter was trained with where it grew the base's (a chat template's tokens
        added): the rows of its saved embedding, the run's recorded tokenizer length, or the last new id
        + 1; None for an adapter that did not grow it."""
        if not self.tokens:
            return None
        sizes = [(self.record and self.record.vocabulary) or 0]
        for parts in self.tokens.values():
            sizes.append(max(parts["indices"]) + 1)
            if parts.get("base") is not None:
                sizes.append(parts["base"].shape[0])
        return max(sizes)

    def _token_rows(self, tensors):
        """{module: {"indices", "delta", "base"}}: the rows peft's trainable_token_indices trained, which
        replace those rows of the (grown) embedding or lm_head; tensors loses their keys."""
        given = self.config.get("trainable_token_indices") or {}
        if isinstance(given, list):  # a bare list means the input embeddings
            given = {"embed_tokens": given}
        if problem := token_indices_problem(given):
            raise UserError(
                f"{self.flag} {self.folder}: adapter_config.json's trainable_token_indices {problem}; "
                "it is not what finetune.py writes: copy the adapter again"
            )
        rows = {}
        for key in list(tensors):
            for part, pattern in (("delta", TOKEN_DELTA_KEY), ("base", TOKEN_BASE_KEY)):
                if match := pattern.match(key):
                    rows.setdefault(match["module"], {})[part] = tensors.pop(key)
        for module, parts in rows.items():
            indices = next((v for k, v in given.items() if module == k or module.endswith(f".{k}")), None)
            if indices is None or "delta" not in parts or len(indices) != parts["delta"].shape[0]:
                raise UserError(
                    f"{self.flag} {self.folder}: the trained token rows of {module} do not match "
                    "adapter_config.json's trainable_token_indices; copy the adapter again"
                )
            parts["indices"] = list(indices)
            parts.setdefault("base", None)
        return rows

    def grow_rows(self, module, weight):
        """The base's embedding (or lm_head) weight grown to the adapter's vocabulary, the trained rows set
        from the adapter; the base's own rows stay as they are."""
        import torch

        parts = self.tokens[module]
        grown = torch.zeros((self.vocabulary, *weight.shape[1:]), dtype=weight.dtype)
        if parts["base"] is not None:  # the rows training started from, where no trained row replaces them
            grown[: parts["base"].shape[0]] = parts["base"].to(weight.dtype)
        grown[: weight.shape[0]] = weight
        index = torch.tensor(parts["indices"], dtype=torch.long)
        return grown.index_copy(0, index, parts["delta"].to(weight.dtype))

    def base_model(self):
        """The base the adapter was trained on: its flag as typed, or the resolved folder where the typed
        value no longer resolves from here (a relative path from another working directory)."""
        typed = (self.record and self.record.base_model) or self.config.get("base_model_name_or_path")
        resolved = self.record and self.record.base_model_path
        if (
            typed
            and not typed.startswith("builtin:")
            and not Path(typed).expanduser().exists()
            and resolved
            and Path(resolved).is_dir()
        ):
            return resolved
        return typed

    @property
    def quantization_layout(self):
        """How finetune.py quantized the base (run_config.json's resolved quantization_layout, checked), or None."""
        return checked_layout(self.record.quantization_layout if self.record else None, f"{self.flag} {self.folder}")

    def trained_quantization(self):
        """How the base was quantized in training ('4bit', '8bit' or 'none'), from run_config.json."""
        return self.record.quantization if self.record else "none"

    def _lora_modules(self, tensors):
        """{module: {"A": tensor, "B": tensor}}: what the streaming merge adds to each base weight."""
        modules = {}
        dora = bool(self.config.get("use_dora"))
        for key, tensor in tensors.items():
            match = LORA_KEY.match(key)
            if dora and not match and (magnitude := MAGNITUDE_KEY.match(key)):
                modules.setdefault(magnitude["module"], {})["magnitude"] = tensor
                continue
            if not match:
                raise UserError(
                    f"{self.flag} {self.folder}: unexpected tensor {key} in the adapter; only LoRA "
                    "A/B weights and trained token rows can be merged"
                )
            modules.setdefault(match["module"], {})[match["part"]] = tensor
        expected = {"A", "B", "magnitude"} if dora else {"A", "B"}
        incomplete = [m for m, parts in modules.items() if set(parts) != expected]
        if incomplete or not modules:
            raise UserError(
                f"{self.flag} {self.folder}: adapter weights are incomplete "
                f"({incomplete[0] if incomplete else 'no LoRA weights'})"
            )
        return modules

    def _check_supported(self):
        config = self.config
        if config.get("peft_type", "LORA") != "LORA":
            raise UserError(
                f"{self.flag} {self.folder}: a {config.get('peft_type')} adapter; merge.py fuses LoRA adapters"
            )
        init = str(config.get("init_lora_weights", True)).lower()
        if init.startswith(MUTATED_INITS):
            raise UserError(
                f"{self.flag} {self.folder}: this adapter was initialised with {config['init_lora_weights']}, which "
                "changed the base weights, and is saved relative to that changed base (a checkpoint-N of the run); "
                "merge the run's final adapter in its output_dir, which finetune.py converts for the unchanged base"
            )
        for key, ok in (("fan_in_fan_out", False),):
            if config.get(key, ok) != ok:
                raise UserError(
                    f"{self.flag} {self.folder}: adapters with {key}={config[key]} are not "
                    "supported by the streaming merge"
                )
        if config.get("modules_to_save"):
            raise UserError(f"{self.flag} {self.folder}: adapters with modules_to_save are not supported")

    def scale(self, module):
        """lora_alpha / r (or / sqrt(r) with rsLoRA); per-module alpha matched on the full path, as peft does."""
        from peft.utils.other import get_pattern_key

        config = self.config
        r = self.modules[module]["A"].shape[0]  # the rank the weights really have
        alpha = config["lora_alpha"]
        patterns = config.get("alpha_pattern") or {}
        if patterns:
            alpha = patterns.get(get_pattern_key(list(patterns), module), alpha)
        return alpha / (r**0.5 if config.get("use_rslora") else r)

    def add_to(self, module, weight):
        """weight += B @ A x scale, in place (weight is float32): no second weight-sized buffer.

        DoRA: then each output row times magnitude / ||row||, the norm of base + update as peft's DoRA layer
        computes it in forward (a constant there: detached from the gradient, so its value is this one)."""
        import torch

        parts = self.modules[module]
        a = parts["A"].to(weight.device, torch.float32)
        b = parts["B"].to(weight.device, torch.float32)
        weight.addmm_(b, a, alpha=self.scale(module))
        if "magnitude" in parts:
            magnitude = parts["magnitude"].to(weight.device, torch.float32)
            weight.mul_((magnitude / torch.linalg.norm(weight, dim=1)).unsqueeze(1))
        return weight


def plan_shards(items, max_bytes):
    """Split (name, dtype, shape) items, in order, into shards of at most max_bytes (one tensor at least)."""
    import torch

    shards, current, size = [], [], 0
    for name, dtype, shape in items:
        nbytes = math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        if nbytes > max_bytes:
            raise UserError(
                f"--max_shard_size: {max_bytes:,} bytes is smaller than the tensor {name} "
                f"({nbytes:,} bytes); give a larger size with a unit, such as 500MB or 5GB"
            )
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dtype, shape, nbytes))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(count):
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardFile:
    """A safetensors file whose header is written first, from the plan; tensors then stream in."""

    def __init__(self, path, plan):
        self.path = Path(path)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, nbytes in plan:
            header[name] = {
                "dtype": TORCH_TO_SAFETENSORS[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
        self.expected = [(name, dtype, list(shape)) for name, dtype, shape, _ in plan]
        self.digest = Digest()  # the sha256 merge_config.json records, taken as the bytes go out
        self.handle = open(self.path, "wb")
        self._write(len(raw).to_bytes(8, "little") + raw)

    def _write(self, data):
        self.handle.write(data)
        self.digest.update(data)

    def write(self, name, tensor):
        expected_name, dtype, shape = self.expected.pop(0)
        assert (name, dtype, shape) == (expected_name, str(tensor.dtype).replace("torch.", ""), list(tensor.shape))
        tensor = tensor.contiguous()
        if tensor.numel():
            self._write(memoryview(tensor.view(-1).view(__import__("torch").uint8).numpy()))

    def close(self):
        """Close the file; its size and sha256 as written."""
        self.handle.close()
        return self.digest.record()


def merge_stream(base_path, adapter, method, layout, out_dtype, out_folder, max_bytes, device="cpu"):
    """Merge tensor by tensor into out_folder. Returns stats (shards, bytes, merged modules).

    The output shards are planned from the base headers, so each merged tensor is written
    as soon as it is computed: memory holds about one tensor (plus the adapter).
    """
    import torch
    from tqdm import tqdm

    sources = [TensorSource(p) for p in base_checkpoint(base_path, "--base_model")]
    check_fit(adapter, {name: info[1] for source in sources for name, info in source.entries.items()})
    order = []
    for source in sources:
        for name, (dtype, shape, _, _) in source.entries.items():
            is_float = dtype.startswith(("float", "bfloat"))
            if name.removesuffix(".weight") in adapter.tokens:
                shape = [adapter.vocabulary, *shape[1:]]
            order.append((source, name, out_dtype if is_float else dtype, shape))
    plan = plan_shards([(name, dtype, shape) for _, name, dtype, shape in order], max_bytes)
    names = shard_names(len(plan))
    quantized = set(layout["modules"]) if method == "dequant" and layout else set()
    load_dtype = getattr(torch, layout["load_dtype"]) if method == "dequant" and layout else None
    dtype = getattr(torch, out_dtype)
    position, checksums = 0, {}
    for number, (shard_name, shard_plan) in enumerate(zip(names, plan), start=1):
        shard_bytes = sum(nbytes for *_, nbytes in shard_plan)
        with tqdm(
            total=shard_bytes, desc=f"Shard {number}/{len(plan)}", unit="B", unit_scale=True, dynamic_ncols=True
        ) as bar:
            out = ShardFile(Path(out_folder) / shard_name, shard_plan)
            for *_, nbytes in shard_plan:
                source, name, _, _ = order[position]
                position += 1
                tensor = source.read(name)
                if tensor.is_floating_point():
                    module = name[: -len(".weight")] if name.endswith(".weight") else None
                    if module in quantized:
                        tensor = rebuild_quantized(tensor.to(device), layout, adapter.offsets.get(module))
                    elif load_dtype is not None:
                        tensor = tensor.to(load_dtype)  # as training loaded it
                    if module in adapter.tokens:
                        tensor = adapter.grow_rows(module, tensor)
                    if module in adapter.modules:
                        tensor = adapter.add_to(module, tensor.to(device, torch.float32, copy=True))
                    tensor = tensor.to("cpu", dtype)
                out.write(name, tensor)
                del tensor
                release_freed_memory()
                bar.update(nbytes)
            checksums[shard_name] = out.close()
    total = sum(nbytes for shard in plan for *_, nbytes in shard)
    if len(plan) > 1:
        weight_map = {name: shard for shard, shard_plan in zip(names, plan) for name, *_ in shard_plan}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        raw = (json.dumps(index, indent=2) + "\n").encode()
        (Path(out_folder) / SAFETENSORS_INDEX).write_bytes(raw)
        digest = Digest()
        digest.update(raw)
        checksums[SAFETENSORS_INDEX] = digest.record()
    merged = len(adapter.modules) + len(adapter.tokens)
    return {"shards": names, "bytes": total, "merged_modules": merged, "checksums": checksums}


def check_fit(adapter, shapes):
    """Every adapted module exists in the base with the shape its LoRA update has; trained token rows fit
    the base's embedding width, in a vocabulary no smaller than the base's."""
    for module, parts in sorted(adapter.tokens.items()):
        shape = shapes.get(f"{module}.weight")
        if shape is not None and adapter.vocabulary > shape[0] + len(parts["indices"]):
            # the new rows follow the base's: a larger vocabulary would allocate rows nobody trained
            raise UserError(
                f"{adapter.flag} {adapter.folder}: its vocabulary of {adapter.vocabulary:,} tokens is larger than the "
                f"base's {shape[0]:,} rows of {module} and the {len(parts['indices']):,} rows it trained; merge with "
                "the base model the adapter was trained on, or copy the adapter again"
            )
        if shape is None or list(shape[1:]) != list(parts["delta"].shape[1:]) or shape[0] > adapter.vocabulary:
            raise UserError(
                f"adapter does not fit the base model: its trained token rows of {module} "
                f"{tuple(parts['delta'].shape)} do not fit {tuple(shape) if shape else 'nothing'} in the base; "
                "merge with the base model the adapter was trained on"
            )
    for module, (low, high) in sorted(adapter.offsets.items()):
        if list(shapes.get(f"{module}.weight") or []) != [low.shape[0], high.shape[1]]:
            raise UserError(
                f"adapter does not fit the base model: its LoftQ offset of {module} is "
                f"{(low.shape[0], high.shape[1])}, the base's weight {tuple(shapes.get(f'{module}.weight') or ())}; "
                "merge with the base model the adapter was trained on"
            )
    for module, parts in sorted(adapter.modules.items()):
        shape = shapes.get(f"{module}.weight")
        update = [parts["B"].shape[0], parts["A"].shape[1]]
        if shape is None:
            raise UserError(
                f"adapter does not fit the base model: {module} is not in the base; merge with the base "
                "model the adapter was trained on"
            )
        if list(shape) != update:
            raise UserError(
                f"adapter does not fit the base model: {module} is {tuple(shape)} in the base but the "
                f"adapter update is {tuple(update)}; merge with the base model the adapter was trained on"
            )


def output_config(base_path, out_dtype, vocabulary=None):
    """The base config.json as a plain model: no quantization_config, the output dtype, and the vocabulary
    grown to `vocabulary` where the adapter grew it."""
    config = json.loads((Path(base_path) / "config.json").read_text())
    if vocabulary:
        config["vocab_size"] = vocabulary
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = out_dtype
    return config
