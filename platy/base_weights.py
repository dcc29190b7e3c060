"""A base model's weights: where they are (a folder, the embedded tiny model, a hub snapshot) and its
tensors read by name, one at a time, from its checked weight files.

Below merging (the streaming merge), quantized (bitsandbytes replayed on these tensors), gguf_export
and modeling: it imports none of them.
"""

import functools
import json
import os
import sys
from pathlib import Path

from platy.cli import UserError, error_detail, say
from platy.integrity import SAFETENSORS_INDEX, check_index, check_safetensors, file_problem

BUILTIN_PREFIX = "builtin:"


def resolve_base_model(base_model, flag, weights=True):
    """A local folder (its weight files checked unless weights=False, for a tokenizer alone:
    platy/integrity.py), the embedded tiny model (builtin:tiny-llama), or a hub id.

    `flag` names the flag that gave it, for the error messages.
    """
    if base_model.startswith(BUILTIN_PREFIX):
        from platy import tiny

        return str(tiny.ensure_model(base_model[len(BUILTIN_PREFIX) :], flag))
    path = Path(os.path.expanduser(base_model))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{flag} {base_model}: folder has no config.json; point to a Hugging Face model folder")
        if weights:
            check_local_weights(path, flag)
        return str(path.resolve())
    first = base_model.split("/", 1)[0]
    if (
        base_model.startswith((".", "/", "~"))
        or base_model.count("/") > 1
        or path.exists()
        or ("/" in base_model and Path(first).is_dir())
    ):
        raise UserError(f"{flag} {base_model}: folder does not exist; give a model folder or a hub id")
    offline_when_unreachable()  # a hub id: without a network, fail (or read the cache) in seconds, not retries
    return base_model


@functools.cache  # one probe a process: a run resolves its base (and evaluate.py each model) several times
def offline_when_unreachable(timeout=3):
    """One connection attempt to the hub; when it fails, the libraries go offline (read their caches), so each
    request does not wait through its own retries. Nothing to do when offline mode is set or a proxy is used."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy")):
        return
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return
    except OSError as err:
        why = err.strerror or type(err).__name__
    say(f"Note: {url.hostname} cannot be reached ({why}): offline, hub models and data sets come from the local cache")
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # imported already: the environment was read
            setattr(sys.modules[module], name, True)


def resolve_local_base(base_model, flag):
    """A local folder for the base weights: as given, the embedded tiny model, or a hub snapshot; `flag`
    names the flag that gave it, for the error messages."""
    path = resolve_base_model(base_model, flag)
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "tokenizer*", "*.model"])
    except Exception as err:
        detail = error_detail(err)
        raise UserError(
            f"{flag} {base_model}: not a local folder and not downloadable ({detail}); "
            "download it first or check the name"
        ) from err


DOWNLOAD_AGAIN = "download or copy the model again"


def check_local_weights(folder, flag):
    """A local model folder's safetensors files and index, checked before a tensor is read: headers
    only, milliseconds whatever the model's size."""
    from platy.integrity import check_weights

    check_weights(folder, f"{flag} {folder}", DOWNLOAD_AGAIN)


def base_checkpoint(base_path, flag):
    """The weight files of a local Hugging Face model folder, each checked (platy/integrity.py: headers,
    byte ranges, sizes, the index); safetensors preferred. `flag` names the flag that gave the folder."""
    folder = Path(base_path)
    who, fix = f"{flag} {base_path}", "download or copy the whole model again"
    for index_name, single in (
        (SAFETENSORS_INDEX, "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index_name).is_file():
            return check_index(folder, index_name, who, fix)
        if (folder / single).is_file():
            if single.endswith(".safetensors"):
                check_safetensors(folder / single, who, fix)
            elif problem := file_problem(folder / single):
                raise UserError(f"{who}: {single} is {problem}; {fix}")
            return [folder / single]
    raise UserError(f"{flag} {base_path}: no model.safetensors or pytorch_model.bin (or their index) in the folder")


SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class TensorSource:
    """Tensors of one weight file, read one at a time with plain reads.

    Plain reads (not mmap) keep the pages of a shard from staying resident while it is
    merged: memory holds the current tensor only.
    """

    def __init__(self, path):
        import torch

        self.path = Path(path)
        self.entries = {}  # name -> (dtype name, shape, begin, end) in file order
        if self.path.suffix == ".safetensors":
            with open(self.path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            header.pop("__metadata__", None)
            start = 8 + size
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = info["data_offsets"]
                self.entries[name] = (SAFETENSORS_DTYPES[info["dtype"]], info["shape"], start + begin, start + end)
            self.state = None
        else:  # pytorch_model*.bin: memory-mapped torch.load
            self.state = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
            for name, t in self.state.items():
                self.entries[name] = (str(t.dtype).replace("torch.", ""), list(t.shape), None, None)

    def read(self, name):
        import torch

        dtype, shape, begin, end = self.entries[name]
        if self.state is not None:
            return self.state[name].clone()
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as handle:
            handle.seek(begin)
            handle.readinto(buffer)
        if not buffer:
            return torch.empty(shape, dtype=getattr(torch, dtype))
        return torch.frombuffer(buffer, dtype=getattr(torch, dtype)).reshape(shape)


def base_tensors(base_path, flag):
    """{tensor name: its TensorSource} over a local model folder's checked weight files."""
    return {name: source for source in map(TensorSource, base_checkpoint(base_path, flag)) for name in source.entries}


def release_freed_memory():
    """Hand freed heap pages back to the OS.

    glibc raises its mmap threshold after large frees, so later tensors come from the heap
    and freed memory stays resident; trimming keeps a long merge at one tensor's footprint.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
