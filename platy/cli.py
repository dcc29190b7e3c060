"""Entry-point plumbing shared by the scripts: user errors, rank-aware printing, quiet imports."""

import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2, no traceback."""


class Stopped(Exception):
    """A run that ended early for a known reason (preempted, diverged, disk full).

    Printed as one line `script: <label>: message` with its own exit status. every_rank:
    every process of a job stops for the same reason, so only rank 0 prints it.
    """

    def __init__(self, message, status, label="error", every_rank=False):
        super().__init__(message)
        self.status, self.label, self.every_rank = status, label, every_rank


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, torchrun stopping a job): unwinds like Ctrl-C, so cleanup handlers
    run, and the entry exits PREEMPTED: the job may be requeued. finetune.py turns it into a Stopped that
    says what was saved (platy/train/loop.py signal_stops)."""


# exit statuses of a stopped run, documented in docs/faults.md
DIVERGED = 3  # non-finite loss or gradient
WRITE_FAILED = 74  # a checkpoint or the adapter could not be written (sysexits EX_IOERR)
LOST_PEER = 1  # another process of a torchrun job died
CLOSED_PIPE = 141  # stdout's reader went away (128 + SIGPIPE, as a shell tool ends)
PREEMPTED = 75  # stopped by SIGTERM / Ctrl-C after saving a checkpoint: resume to go on (EX_TEMPFAIL)


TOKENIZER_THREADS_OFF_BY_US = "PLATY_TOKENIZERS_PARALLELISM_DEFAULTED"


def quiet_libraries():
    """Silence start-up chatter that says nothing about the user's run."""
    if "TOKENIZERS_PARALLELISM" not in os.environ:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ[TOKENIZER_THREADS_OFF_BY_US] = "1"  # the user did not ask for it (children inherit both)
    # bitsandbytes asks for an optional hub kernel package on CPU; it works without it.
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    # peft still calls the v5-deprecated spelling; nothing for the user to change
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def error_detail(err, last=False):
    """One line from a library's exception, to quote inside a UserError: its first (or last) line."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = text.splitlines()
    return lines[-1][:200] if last else lines[0]


def rank():
    return int(os.environ.get("RANK", "0"))


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size():
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def is_main_process():
    return rank() == 0


def say(*parts, err=False):
    """Print once per job (rank 0), flushed so it interleaves with progress bars.

    err=True sends it to stderr, for scripts whose stdout is data (inference.py).
    """
    if is_main_process():
        print(*parts, flush=True, file=sys.stderr if err else sys.stdout)


TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off", "none")


def entry_defaults(fn):
    """{flag: default} of an entry: what a run given no flags gets, for tests and benchmarks to override."""
    return fn.flags.defaults()


def fail_on(problems):
    """Fail once with every problem found (a list of sentences); nothing when the list is empty."""
    if problems:
        raise UserError("; ".join(problems))


def problem_of(read, value):
    """The UserError that read(value) raises, as a problem sentence to collect (None when it reads)."""
    try:
        read(value)
    except UserError as err:
        return str(err)
    return None


def call(fn, argv):
    """Run the entry fn on a command line as `python script.py ARGV` would, without the exit handling. fn's
    flags are declared (platy/flags.py): they parse the command line."""
    return fn(**fn.flags.parse(argv, os.path.basename(sys.argv[0])))


def script_entry(script):
    """The entry function that script (finetune, merge, inference, refine or evaluate) hands to run, loaded
    from its file in REPO_ROOT: how tests and benchmarks run a command line in process (call) or read its
    defaults (entry_defaults), without importing the script by name."""
    import importlib.util

    name = f"platy_script_{script}"  # not the bare name: evaluate.py would shadow the evaluate package
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, f"{script}.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)  # print_help reads its docstring there
        spec.loader.exec_module(sys.modules[name])
    # the one function of the script with declared flags (platy/flags.py `declared`)
    (entry,) = [f for f in vars(sys.modules[name]).values() if callable(f) and hasattr(f, "flags")]
    return entry


def print_help(fn):
    """The script's usage (module docstring), the entry's summary and every flag with its default and
    description."""
    import inspect

    module = sys.modules.get(fn.__module__)
    print((module.__doc__ or "").strip() + "\n")
    summary = (inspect.getdoc(fn) or "").partition("Args:")[0]
    print(summary.strip() + "\n\nFlags:")
    print(fn.flags.help())


def close_progress_bars():
    """An open bar redraws itself when it is collected: close it so the error stays the last line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def run(fn):
    """Run a script's entry on its command line; UserError becomes one line on stderr and exit status 2.

    The entry's declared flags (platy/flags.py) read the command line: unknown flags are refused and bool
    flags read before the entry is called; --help prints every flag to stdout.
    Set PLATY_TRACEBACK=1 to see the traceback of a user error too.
    """
    import signal

    def terminated(signum, frame):  # SIGTERM unwinds like Ctrl-C: cleanup handlers run
        raise Terminated

    signal.signal(signal.SIGTERM, terminated)
    argv = sys.argv[1:]
    asks_help = any(a in ("-h", "--help") for a in argv)
    try:
        if asks_help:
            print_help(fn)
            sys.stdout.flush()  # a reader that has gone shows here, inside the handler below
            return
        call(fn, argv)
    except BrokenPipeError:
        # the reader of stdout went away (`--help | head`): stop quietly, as cat and seq do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0 if asks_help else CLOSED_PIPE)
    except Terminated:
        close_progress_bars()
        print(
            f"\n{os.path.basename(sys.argv[0])}: preempted: SIGTERM received, stopped before finishing; run the same "
            "command again",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(PREEMPTED)
    except KeyboardInterrupt:
        print(f"\n{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Stopped as err:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's shutdown signal must not interrupt the exit
        close_progress_bars()
        if is_main_process() or not err.every_rank:
            print(f"{os.path.basename(sys.argv[0])}: {err.label}: {err}", file=sys.stderr, flush=True)
        sys.exit(err.status)
    except UserError as err:
        if os.environ.get("PLATY_TRACEBACK"):
            raise
        close_progress_bars()
        prog = os.path.basename(sys.argv[0])
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
