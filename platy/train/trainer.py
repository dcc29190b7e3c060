"""A Trainer that survives faults: atomic checkpoints, preemption, non-finite steps.

- Checkpoints are written into output_dir/.staging and renamed when every rank is done
  (platy/train/checkpoints.py); the checkpoint limit deletes old ones only after that. A write
  that fails on any rank stops every rank with its reason: none waits for another in a collective.
- SIGTERM or Ctrl-C finishes the current optimizer step, saves a checkpoint and stops;
  all ranks agree on the step, so none waits for another in a collective.
- A non-finite loss or gradient is caught before the optimizer applies it: the run stops
  (or, with skip_nonfinite_steps, the update is dropped and counted).
- Each checkpoint gets its manifest (sizes and sha256, platy/integrity.py) last; on resume, a
  state file that cannot be read anyway is named in one line, not a traceback.
"""

import contextlib
import inspect
import os
import pickle
import re
import shutil
import signal
import time
import zipfile
from pathlib import Path

import torch
import transformers
from transformers.trainer_callback import TrainerCallback

from platy.cli import DIVERGED, LOST_PEER, WRITE_FAILED, Stopped, Terminated, UserError, error_detail, say
from platy.data.examples import IGNORE_INDEX
from platy.files import STAGING
from platy.integrity import PICKLE_SUFFIXES, config_hash, file_problem, write_manifest
from platy.quantized import write_loftq_offsets
from platy.train.checkpoints import latest_checkpoint, publish, rotate

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}
# torchrun passes a signal on to its workers, which got it from the terminal already:
# signals this close together are one request, a later one means "stop now"
SAME_REQUEST_SECONDS = 2.0


def any_rank(flags):
    """Element-wise OR of flags over all processes (one tiny all-reduce under torchrun). A flag is a
    bool or a 0-d tensor; tensors stay on their device, so the result is read back once."""
    dist = torch.distributed
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if several:  # the backend's device: nccl reduces on the GPU, gloo on the CPU
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else "cpu"
    else:
        device = next((f.device for f in flags if isinstance(f, torch.Tensor)), "cpu")
    values = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=device) for f in flags])
    if several:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


class StopRequest:
    """SIGTERM / SIGINT during training: note it; the next optimizer step ends with a checkpoint."""

    def __init__(self):
        self.signum, self.first_at, self.previous = None, None, {}

    def __enter__(self):
        for signum in SIGNAL_NAMES:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            if signal.getsignal(signum) == self.handle:  # still ours: a stop under way may have set another
                signal.signal(signum, handler)

    def handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.first_at = signum, now
            say(
                f"\n{SIGNAL_NAMES[signum]} received: finishing this optimizer step, then saving a checkpoint "
                "(send it again to stop at once, without one)",
                err=True,
            )
        elif now - self.first_at > SAME_REQUEST_SECONDS:  # stop now: SIGTERM still exits PREEMPTED
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    @property
    def requested(self):
        return self.signum is not None


class PreemptionCallback(TrainerCallback):
    """At each optimizer step's end: if any rank was signalled, all save and stop here."""

    def __init__(self, request):
        self.request, self.stopped_at = request, None

    def on_step_end(self, args, state, control, **kwargs):
        (requested,) = any_rank([self.request.requested])
        if requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


class NonFiniteGuard(TrainerCallback):
    """Checks the loss and the gradients of the trained weights before every optimizer step."""

    def __init__(self, trainer, skip):
        self.trainer, self.skip, self.skipped, self.overflows = trainer, skip, 0, 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # the Trainer's gradient norm of this step (computed anyway, and global under ZeRO and FSDP):
        # non-finite exactly when some gradient is
        norm, loss_flag = self.trainer.step_grad_norm, self.trainer.loss_went_nonfinite
        bad_loss, bad_grad = any_rank(
            [
                False if loss_flag is None else loss_flag,
                False if norm is None else ~torch.isfinite(torch.as_tensor(norm)),
            ]
        )
        self.trainer.loss_went_nonfinite = None
        step = state.global_step + 1
        if not (bad_loss or bad_grad):
            return
        if self.trainer.accelerator.scaler is not None and not bad_loss:
            self.overflows += 1  # fp16 loss scaling: the scaler skips this step and lowers its scale
            return
        if self.skip:
            for param in self.trainer.trained_parameters:
                param.grad = None  # AdamW leaves weights without a gradient untouched
            self.skipped += 1
            say(
                f"Skipped optimizer step {step}: non-finite {'loss' if bad_loss else 'gradient'} "
                f"({self.skipped} skipped so far)"
            )
            return
        what = "loss" if bad_loss else "gradient norm"
        last = latest_checkpoint(args.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
        raise Stopped(
            f"non-finite {what} at optimizer step {step}; stopped before applying it, {kept}. "
            "Lower --learning_rate, check that step's data rows, or pass --skip_nonfinite_steps "
            "to skip such steps",
            DIVERGED,
            every_rank=True,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        record = state.log_history[-1] if state.log_history else {}  # the Trainer stored a copy of logs
        if "loss" in record and self.skip:
            record["nonfinite_steps_skipped"] = self.skipped
        if "loss" in record and self.overflows:
            record["fp16_overflow_steps"] = self.overflows


def answer_positions(labels):
    """Where the logits predict a label: position t predicts labels[t + 1] (the model shifts inside), so a row's
    last position predicts nothing."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def slices_logits_by_mask(model):
    """Whether the causal LM under its wrappers (DDP, DeepSpeed, peft) takes logits_to_keep as a boolean mask of
    the positions to run the lm_head on: transformers' own causal LMs do (remote code may slice it as a count),
    on one device (across several GPUs the mask would sit on the input's device, the hidden states on another)."""
    model = getattr(model, "module", model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    return (
        type(model).__module__.startswith("transformers.models.")
        and "logits_to_keep" in inspect.signature(model.forward).parameters
        and len(devices) <= 1
    )


class Trainer(transformers.Trainer):
    """transformers.Trainer with atomic checkpoints, the run record inside each, and loss checks."""

    def __init__(
        self,
        *args,
        record,
        checkpoint_limit,
        skip_nonfinite_steps=False,
        loraplus_lr_ratio=None,
        loftq_offsets=None,
        **kwargs,
    ):
        self.loraplus_lr_ratio = loraplus_lr_ratio  # before super(): it may build the optimizer
        super().__init__(*args, **kwargs)
        self.record, self.checkpoint_limit = record, checkpoint_limit  # the RunRecord, saved in each checkpoint
        self.loftq_offsets = loftq_offsets  # saved with every checkpoint: they rebuild the base it trained on
        self.trained_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.loss_went_nonfinite = None  # a tensor flag over the micro-steps of one optimizer step
        self.step_grad_norm = None
        self._staging = False
        self.nonfinite_guard = NonFiniteGuard(self, skip_nonfinite_steps)
        self.add_callback(self.nonfinite_guard)
        # Liger's forward fuses the lm_head with the loss and never computes the logits at all
        self.logits_at_labels_only = slices_logits_by_mask(self.model) and not self.args.use_liger_kernel

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own loss, with the lm_head (and the log-softmax over the vocabulary) run only at the
        positions that predict a label: prompt, padding and each row's last position enter no loss, and over a
        vocabulary of 32k-150k tokens they are a large share of a step's time and memory. The kept positions'
        logits are the ones a full forward computes there, so the loss is the same."""
        labels = inputs.get("labels")
        if labels is not None and self.logits_at_labels_only:
            keep = answer_positions(labels)
            # shift_labels: the loss's targets, already aligned with the kept (flattened) logits
            inputs = {**inputs, "logits_to_keep": keep, "shift_labels": labels[:, 1:][keep[:, :-1]]}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        """--loraplus_lr_ratio: peft's LoRA+ groups (B matrices at ratio x the learning rate) for the optimizer
        --optim names; otherwise the Trainer's own."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        kwargs.pop("lr", None)
        self.optimizer = create_loraplus_optimizer(
            model,
            optimizer_cls,
            lr=self.args.learning_rate,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **kwargs,
        )
        return self.optimizer

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        bad = (~torch.isfinite(loss)).any()  # stays on the device: read once per optimizer step
        self.loss_went_nonfinite = bad if self.loss_went_nonfinite is None else self.loss_went_nonfinite | bad
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        self.step_grad_norm = super()._get_grad_norm(model, grad_norm)
        return self.step_grad_norm

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._staging = True
        try:  # every rank writes its part into .staging (its RNG state; its shard under ZeRO)
            failure = write_attempt(super()._save_checkpoint, model, trial)
        finally:
            self._staging = False
        self.agree_on_writes(failure, f"writing {name}", run_dir)
        if self.args.should_save:  # rank 0 completes the checkpoint and publishes it
            failure = write_attempt(self.publish_checkpoint, run_dir / STAGING / name, run_dir / name)
        self.agree_on_writes(failure, f"writing {name}", run_dir)

    def publish_checkpoint(self, staged, final):
        """The run record, LoftQ offsets and manifest (last) into the staged checkpoint; renamed into place,
        then the checkpoints beyond the limit rotated out."""
        self.record.write(staged)
        write_loftq_offsets(self.loftq_offsets, staged)
        (staged / "README.md").unlink(missing_ok=True)  # PEFT's empty card template
        self.write_manifest(staged)
        publish(staged, final)
        staged.parent.rmdir()  # .staging only ever holds the checkpoint being written
        rotate(final.parent, self.checkpoint_limit, newest=final)

    def agree_on_writes(self, failure, doing, run_dir):
        """Every rank learns whether a write failed on any rank (failure: this rank's, or None): then all stop
        together, rank 0 removing the partial write, or all go on. Never one rank stopped and another left
        waiting for it in a collective."""
        failures = every_rank(failure)
        failed = [(process, text) for process, text in enumerate(failures) if text]
        if not failed:
            return
        # every process stops now; the first to exit makes torchrun signal the others, and that signal must not
        # replace the reason (nor cut rank 0's cleanup and its line short)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.args.should_save:
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
        process, text = failed[0]
        raise write_failed(text, doing, run_dir, process if len(failures) > 1 else None)

    def write_manifest(self, folder):
        """The manifest of a fully written checkpoint or adapter folder: its last file."""
        write_manifest(folder, step=self.state.global_step, config_hash=config_hash(self.record.to_dict()))

    # a resume reads these pickled states; a checkpoint without a manifest may still hold a torn one
    def _load_optimizer_and_scheduler(self, checkpoint):
        with states_readable(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_scaler(self, checkpoint):
        with states_readable(checkpoint):
            super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint):
        with states_readable(checkpoint):
            super()._load_rng_state(checkpoint)


@contextlib.contextmanager
def states_readable(checkpoint):
    """A pickled state of `checkpoint` that torch cannot read becomes one line naming the file."""
    try:
        yield
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        if checkpoint is None or "out of memory" in str(err).lower():
            raise
        which = unreadable_state(Path(checkpoint)) or "one of its optimizer, scheduler or RNG state files"
        raise UserError(
            f"--resume_from_checkpoint {checkpoint}: {which} cannot be read ({error_detail(err)}); resume from "
            "an earlier checkpoint-N, or pass auto to take the newest undamaged one"
        ) from None


def unreadable_state(folder):
    """The first pickled state file of folder that is torn (CRC-32) or that torch cannot load, or None.
    Loads each file once: only ever called after a load failed."""
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted(folder.iterdir()):
        if path.suffix not in PICKLE_SUFFIXES:
            continue
        if file_problem(path, crc=True):
            return path.name
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # whatever torch raises for it, this is the file
            return path.name
    return None


def every_rank(value):
    """value (a small picklable object) of every process, in rank order: [value] without torchrun."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def write_attempt(write, *args):
    """Run a write; what went wrong as text (the system's reason and the file), or None when it worked."""
    try:
        write(*args)
    except OSError as err:
        return failure_text(err)
    return None


def failure_text(err):
    """An OSError as the message says it: the system's reason and the file."""
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return f"{err.strerror or err}{where}"


def write_failed(failure, doing, output_dir, process=None):
    """A Stopped error for a failed write (disk full, quota, permissions), naming what is still good.
    failure: an OSError or write_attempt's text; process: the rank it failed on, when every rank of a
    torchrun job stops with it (rank 0 prints it)."""
    if isinstance(failure, OSError):
        failure = failure_text(failure)
    last = latest_checkpoint(output_dir)
    kept = f"the last complete checkpoint, {last}, is intact" if last else "no complete checkpoint exists yet"
    on = "" if process is None else f" on process {process}"
    return Stopped(
        f"{doing} failed{on}: {failure}; {kept}. Free disk space and continue with --resume_from_checkpoint auto",
        WRITE_FAILED,
        every_rank=process is not None,
    )


# what the collective backends say when another process of the job is gone
PEER_GONE = (
    "connection reset",
    "connection closed",
    "broken pipe",
    "timed out",
    "nccl communicator was aborted",
    "socket closed",
    "peer",
)


def lost_peer(err):
    """Did a collective fail because another rank died (killed, crashed, out of memory)?"""
    text = str(err).lower()
    return isinstance(err, torch.distributed.DistError) or (
        any(backend in text for backend in ("gloo", "nccl", "c10d")) and any(p in text for p in PEER_GONE)
    )


def peer_lost(err, output_dir):
    last = latest_checkpoint(output_dir)
    kept = f"the last complete checkpoint is {last}" if last else "no complete checkpoint was written yet"
    detail = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0])[:120]  # drop the source path
    return Stopped(
        f"another process of this job stopped (killed, crashed or out of memory), so this one stops too "
        f"[{detail}]; {kept}: run the job again with --resume_from_checkpoint auto",
        LOST_PEER,
    )
