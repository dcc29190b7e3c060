"""Cache folders kept private, and the locks their builders take.

What a cache holds is read back as if the toolkit had made it (token ids, embeddings, a built-in
model), so nobody else may be able to write there: a cache folder is created 0700 and refused when
another user owns it or others may write into it, unless the user says the cache is shared
(PLATY_SHARED_CACHE=1). Each entry carries a manifest (platy.integrity) checked before it is used: it
tells a damaged entry from a sound one, but it is no signature (whoever can write the folder can
recompute it), which is why the folder must be private.
"""

import fcntl
import os
import stat
import time
from pathlib import Path

from platy.cli import UserError
from platy.files import cache_root

SHARED_CACHE = "PLATY_SHARED_CACHE"  # "1": use cache folders that others own or may write
LOCK_TIMEOUT = "PLATY_CACHE_LOCK_TIMEOUT"  # seconds a process waits for another's cache build
DEFAULT_LOCK_TIMEOUT_S = 3600  # tokenizing a large data set on one rank while the others wait takes minutes
LOCK_POLL_S = 0.2


def cache_folder(*parts):
    """$PLATY_CACHE/parts..., each level created private and checked (see private_folder)."""
    folder = private_folder(cache_root())
    for part in parts:
        folder = private_folder(folder / part)
    return folder


def private_folder(folder):
    """folder, created 0700 where missing (its missing parents too); a UserError when it is not the
    user's own or others may write into it, unless PLATY_SHARED_CACHE=1. OSError where it cannot be
    made (a read-only disk): callers decide whether the cache is worth the run."""
    folder = Path(folder).expanduser()
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    for level in reversed(missing):
        try:
            level.mkdir(mode=0o700)
        except FileExistsError:  # another process made it first: checked below like any other
            pass
    if os.environ.get(SHARED_CACHE) == "1":
        return folder
    info = folder.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"cache folder {folder} is not a folder; set PLATY_CACHE to a folder of your own")
    if info.st_uid != os.geteuid():
        raise UserError(
            f"cache folder {folder} belongs to another user (uid {info.st_uid}), who could plant its entries; "
            f"set PLATY_CACHE to a folder of your own, or {SHARED_CACHE}=1 to trust it"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UserError(
            f"cache folder {folder} may be written by others (mode {stat.S_IMODE(info.st_mode):o}), who could "
            f"plant its entries; run chmod go-w {folder}, or set {SHARED_CACHE}=1 to trust it"
        )
    return folder


def lock_timeout():
    """Seconds to wait for another process's cache build ($PLATY_CACHE_LOCK_TIMEOUT)."""
    text = os.environ.get(LOCK_TIMEOUT, "")
    try:
        seconds = float(text) if text else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        raise UserError(f"{LOCK_TIMEOUT}={text}: give a number of seconds, e.g. 600") from None
    if not seconds > 0:
        raise UserError(f"{LOCK_TIMEOUT}={text}: give a positive number of seconds, e.g. 600")
    return seconds


class CacheLock:
    """An exclusive lock on a lock file beside a cache entry: acquire and release, or a context manager.

    The file is opened without following a symbolic link and never truncated (a link planted in
    its place must not lead the open to another file), and must be a plain file. Waiting stops after
    `timeout` seconds with TimeoutError: the caller goes on without the cache rather than hang.
    """

    def __init__(self, path, timeout=None):
        self.path = Path(path)
        self.timeout = lock_timeout() if timeout is None else timeout
        self.fd = None

    def acquire(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as err:
            if self.path.is_symlink():
                raise UserError(
                    f"cache lock {self.path} is a symbolic link; remove it (the cache locks are plain files)"
                ) from err
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"cache lock {self.path} is not a plain file; remove it")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise TimeoutError(
                        f"another process has held {self.path} for over {self.timeout:g} s ({LOCK_TIMEOUT})"
                    ) from None
                time.sleep(LOCK_POLL_S)
        self.fd = fd
        return self

    def release(self):
        os.close(self.fd)  # closing releases the lock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
