"""Fault injection for tests/test_faults.py, loaded by putting this folder on PYTHONPATH.

PLATY_FAULT (with PLATY_FAULT_RANK to hit one rank only) picks one fault:
  sigterm_after_step=K   SIGTERM to this process right after optimizer step K
  sigterm_in_load        SIGTERM to this process as the model starts loading (from_pretrained)
  slow_tokenizer=S       S seconds of delay before the tokenizer loads (one rank lagging behind the other)
  sigkill_after_step=K   SIGKILL (kill -9) right after optimizer step K
  sigkill_in_write=TEXT  SIGKILL halfway through writing the first file whose path contains TEXT
  enospc_in_write=TEXT   "No space left on device" when writing a file whose path contains TEXT
                         (torch.save, safetensors' save_file, a GGUF file's tensors)
"""

import errno
import os
import signal

FAULT = os.environ.get("PLATY_FAULT", "")
WANTED_RANK = os.environ.get("PLATY_FAULT_RANK")


def active():
    return FAULT and (WANTED_RANK is None or os.environ.get("RANK", "0") == WANTED_RANK)


def after_steps(count, signum):
    import torch

    original = torch.optim.AdamW.step
    done = [0]

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        done[0] += 1
        if done[0] == count:
            os.kill(os.getpid(), signum)
        return result

    torch.optim.AdamW.step = step


def before_loading(owner, action):
    """action() at the start of every owner.from_pretrained call."""
    load = owner.from_pretrained.__func__

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        action()
        return load(cls, *args, **kwargs)

    owner.from_pretrained = from_pretrained


def while_loading(signum):
    from transformers import PreTrainedModel

    # Python runs the handler before the next bytecode: inside the load
    before_loading(PreTrainedModel, lambda: os.kill(os.getpid(), signum))


def slow_tokenizer(seconds):
    import time

    from transformers import AutoTokenizer

    before_loading(AutoTokenizer, lambda: time.sleep(seconds))


def in_writes(text, action):
    import safetensors.torch
    import torch

    def wrap(original, path_arg):
        def write(*args, **kwargs):
            path = str(args[path_arg] if len(args) > path_arg else kwargs.get("filename", kwargs.get("f", "")))
            if text in path:
                action(path)
            return original(*args, **kwargs)

        return write

    torch.save = wrap(torch.save, 1)
    safetensors.torch.save_file = wrap(safetensors.torch.save_file, 1)
    try:
        import gguf
    except ImportError:
        return
    tensor_write = gguf.GGUFWriter.write_tensor_data

    def write_tensor_data(self, *args, **kwargs):  # a GGUF file's tensors, after its header is on disk
        if text in str(self.path):
            action(str(self.path))
        return tensor_write(self, *args, **kwargs)

    gguf.GGUFWriter.write_tensor_data = write_tensor_data


def half_write_then_die(path):
    with open(path, "wb") as handle:
        handle.write(b"\0" * 1000)  # a torn file, as a kill in the middle of a write leaves it
    os.kill(os.getpid(), signal.SIGKILL)


def disk_full(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


if active():
    kind, _, arg = FAULT.partition("=")
    if kind == "sigterm_after_step":
        after_steps(int(arg), signal.SIGTERM)
    elif kind == "sigterm_in_load":
        while_loading(signal.SIGTERM)
    elif kind == "slow_tokenizer":
        slow_tokenizer(float(arg))
    elif kind == "sigkill_after_step":
        after_steps(int(arg), signal.SIGKILL)
    elif kind == "sigkill_in_write":
        in_writes(arg, half_write_then_die)
    elif kind == "enospc_in_write":
        in_writes(arg, disk_full)
    else:
        raise SystemExit(f"sitecustomize: unknown PLATY_FAULT {FAULT}")
