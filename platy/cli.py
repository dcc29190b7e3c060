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


def parameter_names(fn):
    import inspect

    return list(inspect.signature(fn).parameters)


def entry_defaults(fn):
    """{flag: default} of an entry: what a run given no flags gets, for tests and benchmarks to override."""
    import inspect

    if hasattr(fn, "flags"):  # declared (platy/flags.py)
        return fn.flags.defaults()
    return {name: param.default for name, param in inspect.signature(fn).parameters.items()}


def refuse_unknown_flags(fn, argv):
    """Every --flag must be a parameter of fn: a typo must not train with a default for hours."""
    import difflib

    names = parameter_names(fn)
    known = set(names) | {f"no{n}" for n in names}
    for arg in argv:
        if not arg.startswith("--") or arg == "--":
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean --{close[0]}?" if close else f"; see {os.path.basename(sys.argv[0])} --help"
            raise UserError(f"unknown flag --{name}{hint}")


def protect_strings(fn, argv):
    """Pass the values of str flags verbatim.

    fire reads every value as a Python literal: --input "12, 30" would become a tuple,
    --output_dir 2024 an int and --prompt 1e3 a float. Quoting the value as a literal
    string keeps what the user typed.
    """
    import inspect

    text_flags = {n for n, p in inspect.signature(fn).parameters.items() if p.annotation is str}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name.replace("-", "_") in text_flags:
            if eq:
                out.append(f"--{name}={value!r}")
                i += 1
                continue
            if i + 1 < len(argv):
                out += [arg, repr(argv[i + 1])]
                i += 2
                continue
        out.append(arg)
        i += 1
    return out


def coerce_bools(fn, flags):
    """Flags declared bool accept True/False in any case, yes/no, on/off and 1/0; anything else is an error."""
    import inspect

    problems = []
    for name, param in inspect.signature(fn).parameters.items():
        value = flags.get(name)
        if param.annotation is not bool or isinstance(value, bool) or value is None:
            continue
        word = str(value).strip().lower()
        if word in TRUE_WORDS:
            flags[name] = True
        elif word in FALSE_WORDS:
            flags[name] = False
        else:
            problems.append(f"--{name} {value!r}: give True or False")
    fail_on(problems)
    return flags


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


def with_coerced_bools(fn):
    """fn, called with its bool flags read from any of the words coerce_bools accepts."""
    import functools
    import inspect

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        return fn(**coerce_bools(fn, dict(bound.arguments)))

    return entry


def call(fn, argv):
    """Run the entry fn on a command line as `python script.py ARGV` would, without the exit handling."""
    import fire

    if hasattr(fn, "flags"):  # declared (platy/flags.py)
        return fn(**fn.flags.parse(argv, os.path.basename(sys.argv[0])))

    refuse_unknown_flags(fn, argv)
    return fire.Fire(with_coerced_bools(fn), command=protect_strings(fn, argv))


def script_entry(script):
    """The entry function that script (finetune, merge, inference, refine or evaluate) hands to run, loaded
    from its file in REPO_ROOT: how tests and benchmarks run a command line in process (call) or read its
    defaults (entry_defaults), without importing the script by name."""
    import ast
    import importlib.util

    path = os.path.join(REPO_ROOT, f"{script}.py")
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    runs = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "run"]
    entry = next(n.args[0].id for n in runs if n.args and isinstance(n.args[0], ast.Name))
    name = f"platy_script_{script}"  # not the bare name: evaluate.py would shadow the evaluate package
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)  # print_help reads its docstring there
        spec.loader.exec_module(sys.modules[name])
    return getattr(sys.modules[name], entry)


def print_help(fn):
    """The script's usage (module docstring) and every flag with its default and description."""
    import inspect

    module = sys.modules.get(fn.__module__)
    print((module.__doc__ or "").strip() + "\n")
    doc = inspect.getdoc(fn) or ""
    if hasattr(fn, "flags"):  # declared (platy/flags.py): the entry's first paragraph, then every flag
        print(doc.split("\n\n")[0].strip() + "\n\nFlags:")
        print(fn.flags.help())
        return
    summary, _, rest = doc.partition("Args:")
    print(summary.strip() + "\n\nFlags:")
    descriptions, current = {}, None
    for line in rest.splitlines():
        stripped = line.strip()
        head, sep, tail = stripped.partition(":")
        if sep and line.startswith(" " * 4) and not line.startswith(" " * 8) and head.isidentifier():
            current = head
            descriptions[current] = tail.strip()
        elif current and stripped:
            descriptions[current] += " " + stripped
    for name, param in inspect.signature(fn).parameters.items():
        default = "" if param.default is inspect.Parameter.empty else f" (default: {param.default!r})"
        print(f"  --{name}{default}")
        text = descriptions.get(name, "")
        while text:
            cut = text.rfind(" ", 0, 92) if len(text) > 92 else len(text)
            cut = cut if cut > 0 else len(text)
            print(f"      {text[:cut].strip()}")
            text = text[cut:].strip()


def close_progress_bars():
    """An open bar redraws itself when it is collected: close it so the error stays the last line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def run(fn):
    """Run a fire command; UserError becomes one line on stderr and exit status 2.

    Unknown flags are refused and bool flags read before the entry is called; --help prints every
    flag to stdout.
    Set PLATY_TRACEBACK=1 to see the traceback of a user error too.
    """
    import signal

    def terminated(signum, frame):  # SIGTERM unwinds like Ctrl-C: cleanup handlers run
        raise KeyboardInterrupt

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
    except KeyboardInterrupt:
        print(f"\n{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Stopped as err:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's shutdown signal must not interrupt the exit
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
