"""Run control: the Trainer built for the run, training with preemption and lost peers handled, the
output folder cleared of what --overwrite replaces, and the stop of a preempted run (exit 75).
"""

import contextlib
import os
import time
from pathlib import Path

from platy import cli
from platy.cli import say
from platy.files import PREEMPTED, RUN_CONFIG, write_json
from platy.outputs import own_checkpoints
from platy.train.arguments import training_arguments
from platy.train.checkpoints import latest_checkpoint, remove_leftovers, retire
from platy.train.plan import optimizer_steps
from platy.train.publish import run_result


def build_trainer(run, objective, start, tokenizer, train_set, val_set, record):
    """The objective's Trainer over the model of the LoraStart, with the progress and last-step callbacks."""
    from transformers.trainer_callback import ProgressCallback

    from platy.reporting import loss_progress_callback

    for name, value in (
        ("WANDB_PROJECT", run.wandb_project),
        ("WANDB_WATCH", run.wandb_watch),
        ("WANDB_LOG_MODEL", run.wandb_log_model),
    ):
        if value:
            os.environ[name] = value
    trainer = objective.trainer_class()(
        model=start.model,
        args=training_arguments(run, has_val=val_set is not None, steps=optimizer_steps(run, len(train_set))),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=objective.collator(run, tokenizer),
        processing_class=tokenizer,
        record=record,
        checkpoint_limit=run.save_total_limit,
        skip_nonfinite_steps=run.skip_nonfinite_steps,
        loraplus_lr_ratio=run.loraplus_lr_ratio,
        loftq_offsets=start.loftq_offsets,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(loss_progress_callback())
    trainer.add_callback(last_step_logged())
    return trainer


def last_step_logged():
    """A callback that logs (and evaluates, with held-out rows) the last step, whatever --logging_steps is."""
    from transformers import TrainerCallback

    class LastStepLogged(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
                control.should_evaluate = args.eval_strategy != "no"
            return control

    return LastStepLogged()


def run_training(run, trainer):
    """Train (resuming where --resume_from_checkpoint says); the figures of the finished run."""
    from platy.train.trainer import PreemptionCallback, StopRequest, lost_peer, peer_lost

    out = Path(run.output_dir)
    clear_output_dir(run)
    resume = run.resume.path if run.resume and run.resume.checkpoint else None
    if resume:
        say(f"Resuming from {resume} (global step, optimizer, schedule, RNG and data order continue)")
    started = time.time()
    with StopRequest() as request:
        preemption = PreemptionCallback(request)
        trainer.add_callback(preemption)
        try:
            output = trainer.train(resume_from_checkpoint=resume)
        except RuntimeError as err:
            if run.world_size > 1 and lost_peer(err):
                raise peer_lost(err, out) from None
            raise
    seconds = time.time() - started
    if preemption.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
        stop_preempted(run, trainer.state)
    state = trainer.state
    tokens = int(state.num_input_tokens_seen)
    return run_result(state.log_history, state.global_step, tokens, output.training_loss, seconds)


def clear_output_dir(run):
    """Before training (rank 0): what --overwrite replaces (the earlier run's record and its own checkpoints,
    nothing else), partial writes and the preemption marker go."""
    if not cli.is_main_process():
        return
    out = Path(run.output_dir)
    if run.overwrite and not run.resume:
        # the old run's marker and checkpoints go first: a crash must not leave the folder looking finished
        (out / RUN_CONFIG).unlink(missing_ok=True)
        for old in own_checkpoints(out):
            say(f"--overwrite: removing {old}")
            retire(old)
    remove_leftovers(out)
    (out / PREEMPTED).unlink(missing_ok=True)


def stop_preempted(run, state):
    """Signalled: the checkpoint of this step is written; leave a marker and exit with PREEMPTED."""
    checkpoint = Path(run.output_dir) / f"checkpoint-{state.global_step}"
    if cli.is_main_process():
        record = {
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "checkpoint": str(checkpoint),
            "time": time.time(),
        }
        write_json(Path(run.output_dir) / PREEMPTED, record)
        tell_launcher(record)
    raise cli.Stopped(
        f"stopped at optimizer step {state.global_step} of {state.max_steps}; checkpoint saved in "
        f"{checkpoint}. Run the same command with --resume_from_checkpoint auto to finish",
        cli.PREEMPTED,
        label="preempted",
        every_rank=True,
    )


def tell_launcher(record):
    """fine-tuning.sh turns torchrun's status (1 for any failed worker) back into PREEMPTED when rank 0 left
    this record in PLATY_PREEMPTED_FILE."""
    if os.environ.get("PLATY_PREEMPTED_FILE"):
        write_json(os.environ["PLATY_PREEMPTED_FILE"], record)


@contextlib.contextmanager
def signal_stops(output_dir):
    """SIGTERM outside the optimizer steps (while the data or the model loads, during the final save), or a
    second one within them: exit PREEMPTED like a preempted step, with a line saying what is saved."""
    try:
        yield
    except cli.Terminated:
        last = latest_checkpoint(Path(output_dir).expanduser())
        if cli.is_main_process():
            tell_launcher({"global_step": None, "checkpoint": last, "time": time.time()})
        saved = (
            f"the last complete checkpoint is {last}. Run the same command with --resume_from_checkpoint auto to "
            "continue from it"
            if last
            else "nothing was saved (no checkpoint was written yet). Run the same command again"
        )
        raise cli.Stopped(
            f"SIGTERM received: stopped; {saved}", cli.PREEMPTED, label="preempted", every_rank=True
        ) from None
