"""Entry-point plumbing shared by the scripts: user errors, rank-aware printing, quiet imports."""

import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2, no traceback."""


def quiet_libraries():
    """Silence start-up chatter that says nothing about the user's run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes asks for an optional hub kernel package on CPU; it works without it.
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    # peft still calls the v5-deprecated spelling; nothing for the user to change
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def rank():
    return int(os.environ.get("RANK", "0"))


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process():
    return rank() == 0


def say(*parts):
    """Print once per job (rank 0), flushed so it interleaves with progress bars."""
    if is_main_process():
        print(*parts, flush=True)


def run(fn):
    """Run a fire command; UserError becomes one line on stderr and exit status 2.

    Set PLATY_TRACEBACK=1 to see the traceback of a user error too.
    """
    import fire

    try:
        fire.Fire(fn)
    except UserError as err:
        if os.environ.get("PLATY_TRACEBACK"):
            raise
        prog = os.path.basename(sys.argv[0])
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
