"""One fine-tuning run, in order: the only place that knows the order of finetune.py's stages.

    recipe = Recipe.from_flags(flags)   # every flag checked at once, then resolved (platy/train/config.py)
    recipe.main()                       # describe -> setup -> train -> save (or export a finished checkpoint)

Tests and benchmarks call the same object: `setup()` leaves a ready Trainer (recipe.trainer), `train()`
returns the run's figures, `save()` publishes the adapter. What a stage makes for a later one is kept on
the recipe (tokenizer, chat template, datasets, the LoraStart, the Trainer), never pinned on the model.
The objective (platy/train/objective.py, picked by --stage) says what the rows become, how they are batched,
which Trainer computes the loss and what it adds once the model is loaded (a preference run's reference
log-probs); everything else is the same for every objective.
"""

import os
from pathlib import Path

from platy import cli
from platy.cli import UserError, say
from platy.files import RUN_CONFIG
from platy.record import RunRecord
from platy.train import loop, lora, publish
from platy.train.checkpoints import checkpoint_step
from platy.train.config import check_flags, resolve
from platy.train.objective import objective_of
from platy.train.plan import describe_plan, optimizer_steps, warmup_note


class Recipe:
    """finetune.py's run: the resolved TrainRun, the objective, and what each stage made."""

    def __init__(self, run, objective=None):
        self.run = run
        self.objective = objective or objective_of(run)
        self.record = None  # the RunRecord: described at start, completed by the stages, saved last
        self.tokenizer = self.chat = None
        self.train_set = self.val_set = None
        self.finished = False  # the resumed checkpoint holds the whole run: it is exported, not trained
        self.start = None  # the LoraStart: model, quantization layout, LoftQ offsets, PiSSA's initial adapter
        self.trainer = None
        self.result = None

    @classmethod
    def from_flags(cls, flags, objective=None):
        """The recipe of finetune.py's flags (every flag by name): all problems at once, then the I/O."""
        cli.fail_on(check_flags(flags))
        with loop.signal_stops(flags["output_dir"]):
            return cls(resolve(flags), objective)

    def main(self):
        """The whole run, as finetune.py runs it; SIGTERM at any stage exits PREEMPTED (loop.signal_stops)."""
        with loop.signal_stops(self.run.output_dir):
            self.stages()

    def stages(self):
        """The stages in order: describe -> setup -> train -> save, or export a finished checkpoint."""
        if self.run.already_finished:  # a requeued job of a run that ended: success, nothing changes
            say(self.run.already_finished)
            return
        self.describe()
        if self.run.dry_run:
            say("Dry run: nothing was loaded or written; drop --dry_run to train.")
            return
        self.setup()
        if self.finished:  # the run ended but its final save was cut short
            self.export_finished()
            return
        self.train()
        self.save()

    def describe(self):
        """The run configuration, printed once and kept as the run record."""
        self.record = describe_run(self.run)

    def setup(self):
        """Tokenizer, data, and (unless a checkpoint already finished the run) the model and its Trainer;
        returns the recipe, ready to train."""
        if self.record is None:
            self.describe()
        self.tokenizer, self.chat = tokenizer_and_chat(self.run)
        self.train_set, self.val_set, data = self.objective.datasets(self.run, self.tokenizer, self.chat)
        self.record.set_data(data)
        self.finished = finished_checkpoint(self.run, self.train_set)
        if self.finished:
            return self
        self.start = lora.attach(self.run, self.tokenizer)
        self.record.set_quantization_layout(self.start.layout)
        if self.start.loftq_report:  # measured when the adapter was initialised
            self.record.set_loftq(self.start.loftq_report)
        self.train_set, self.val_set = self.objective.prepare(
            self.run, self.start, self.tokenizer, self.train_set, self.val_set, self.record
        )
        self.trainer = loop.build_trainer(
            self.run, self.objective, self.start, self.tokenizer, self.train_set, self.val_set, self.record
        )
        return self

    def train(self):
        """Train (resuming where --resume_from_checkpoint says); the figures of the finished run."""
        self.result = loop.run_training(self.run, self.trainer)
        return self.result

    def save(self):
        """The adapter, the log, the curves, the card and run_config.json (last) into output_dir."""
        publish.save(self.run, self.trainer, self.start, self.chat, self.record, self.result)

    def export_finished(self):
        """The last checkpoint holds the whole run but the final save was interrupted: export it."""
        publish.export_finished_checkpoint(self.run, self.tokenizer, self.record)


def tokenizer_and_chat(run):
    """The base's tokenizer, ready for training, and the run's chat template bound to it (its missing control
    tokens added), or None."""
    from platy.data.examples import prepare_tokenizer
    from platy.modeling import load_tokenizer
    from platy.prompts import ChatTemplate

    tokenizer = prepare_tokenizer(load_tokenizer(run.base_model_path, run.trust_remote_code, flag="--base_model"))
    chat = ChatTemplate.resolve(run.chat_template, tokenizer)
    if chat is not None:
        chat.added = chat.bind(tokenizer)
        say(
            f"Chat template {chat.name}: assistant turns end with {', '.join(chat.end_of_turn) or 'no special token'}"
            + (f"; added to the vocabulary: {', '.join(chat.added)}" if chat.added else "")
        )
    return tokenizer, chat


def describe_run(run):
    """The run's RunRecord: printed once at start, saved next to the adapter and in checkpoints."""
    from platy.reporting import library_versions, say_configuration

    flags = run.flags()
    prompter = run.prompter
    resolved = {
        "base_model_path": run.base_model_path,
        "model_type": run.model_config.model_type,
        "template": {"name": prompter.name, "path": str(prompter.path), **prompter.template},
        "precision": run.precision,
        "device": run.device,
        "world_size": run.world_size,
        "gradient_accumulation_steps": run.gradient_accumulation_steps,
        **lora_resolved(run),
        "resume": run.resume and run.resume.recorded(),
        "plan": run.plan,
    }
    shown = {**flags, **{k: v for k, v in resolved.items() if k not in ("template", "plan")}}
    say_configuration(
        "Run configuration (unset flags left out; all of it goes to run_config.json)",
        {k: v for k, v in shown.items() if v not in (None, "")},
    )
    say(describe_plan(run))
    return RunRecord(flags, resolved, data={}, versions=library_versions(), command=launch_command())


def lora_resolved(run):
    """The adapter the run trains, as the merge reads it: the layers adapted (all-linear resolved) and the scale."""
    if run.finetuning != "lora":
        return {}
    root = run.lora_r**0.5 if run.use_rslora else run.lora_r
    return {"lora_target_modules": run.lora_targets, "lora_scale": run.lora_alpha / root}


def launch_command():
    """The command line of this run as typed (finetune.py and its flags), for the adapter card; None when
    finetune.py is not the program (a test or benchmark calling the stages)."""
    import shlex
    import sys

    if os.path.basename(sys.argv[0]) != "finetune.py":
        return None
    return shlex.join(["python", "finetune.py", *sys.argv[1:]])


def finished_checkpoint(run, train_set):
    """Whether the resumed checkpoint already holds every optimizer step of this run with only its final
    save cut short (it is then exported instead of trained). A checkpoint that finished the run in another
    way is refused, and a warmup that covers the whole run is noted."""
    steps = optimizer_steps(run, len(train_set))
    done = checkpoint_step(run.resume.path) if run.resume and run.resume.checkpoint else 0
    # rank 0 alone asks whether the run already ended here: under torchrun it may be exporting this very
    # checkpoint (run_config.json appearing) while the other processes look
    ended_here = cli.is_main_process() and (Path(run.output_dir) / RUN_CONFIG).exists()
    finished = bool(done and done >= steps and Path(run.resume.path).parent == Path(run.output_dir) and not ended_here)
    if done and done >= steps and not finished:
        raise UserError(
            f"--resume_from_checkpoint {run.resume.path}: that checkpoint already finished the run "
            f"({done} of {steps} steps); nothing to train. Raise --num_epochs "
            "or --max_steps to go further"
        )
    counted_in_plan = "optimizer_steps" in run.plan and not run.packing  # the plan already said it
    note = warmup_note(run, steps)
    if note and not counted_in_plan:
        say(note)
    return finished
