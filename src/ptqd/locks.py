"""One writer per output: a lock held while a command writes a run directory, checkpoint or samples file.

A second process given the same output is refused at once with a clear message (it does not wait).
Locks are ``filelock`` locks (``flock`` on Unix, released by the kernel when a process dies, so a
killed run never leaves a stale lock). The lock files live in one directory per user under the
system's temporary directory, named by a hash of the output's absolute path, so nothing appears
beside the outputs. Locks are therefore per machine: two processes on different machines writing
to one shared file system are not detected. Under torchrun only rank 0 takes the lock.

Locks are reentrant within a process: ``quantize`` holds its run directory's lock while it
collects the noise statistics that ``collect_stats`` also locks.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import tempfile
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from ptqd.errors import PtqdError

_held: dict[str, list] = {}  # lock file → [FileLock, depth]
_mutex = threading.Lock()


def lock_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"ptqd-locks-{uid}"


def lock_file(output: str | Path) -> Path:
    """The lock file of ``output`` (by its absolute path, symlinks resolved)."""
    key = str(Path(output).expanduser().resolve())
    return lock_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock"


def check_lock_dir(directory: Path | None = None) -> Path:
    """Create the lock directory (0700) or check the existing one: a real directory (not a symlink),
    owned by this user, that no one else can write to or read; else a PtqdError saying how to fix it."""
    import stat

    d = directory or lock_dir()
    fix = f"remove it (rm -rf {d}) so ptqd creates its own, or set TMPDIR to a private directory"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise PtqdError(f"cannot create the lock directory {d} ({e.strerror or e}); {fix}") from None
    try:
        st = os.lstat(d)
    except OSError as e:
        raise PtqdError(f"cannot use the lock directory {d} ({e.strerror or e}); {fix}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PtqdError(f"the lock directory {d} is not a directory (a file or a symbolic link is in its place); {fix}")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PtqdError(f"the lock directory {d} belongs to another user (uid {st.st_uid}), who could hold or break ptqd's locks; {fix}")
    if st.st_mode & 0o077:
        raise PtqdError(f"the lock directory {d} can be used by other users (mode {stat.S_IMODE(st.st_mode):o}, ptqd needs 700); "
                        f"chmod 700 {d}, or {fix}")
    return d


@contextmanager
def output_lock(output: str | Path, what: str = "output") -> Iterator[None]:
    """Hold the lock of ``output`` for the body; a PtqdError if another process holds it."""
    from filelock import FileLock, Timeout

    path = lock_file(output)
    key = str(path)
    with _mutex:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        check_lock_dir(path.parent)
        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise PtqdError(
                f"{what} {output} is being written by another ptqd process right now (lock {path}); "
                "wait for it to finish (rerunning the same command then resumes or reuses its result), or choose another --out"
            ) from None
        except OSError as e:
            raise PtqdError(f"cannot take the lock {path} of {what} {output} ({e.strerror or e}); remove {path} and rerun") from None
        with _mutex:
            entry = _held[key] = [lock, 1]
    try:
        yield
    finally:
        with _mutex:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[key]
        if last:
            entry[0].release()


def holds_lock(argument: str, what: str = "output"):
    """Decorator: hold the lock of the function's ``argument`` (a path; None: no lock) while it runs.

    Under torchrun (``WORLD_SIZE`` > 1 with a process group) only rank 0 locks, and tells the other
    ranks whether it could, so every rank stops with the same message."""

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            from ptqd import distributed

            target = sig.bind(*args, **kwargs).arguments.get(argument)
            if target is None:
                return fn(*args, **kwargs)
            ctx = distributed.context()
            grouped = ctx.active and _group_ready()
            if not ctx.main and grouped:
                err = distributed.broadcast(None, ctx)
                if err is not None:
                    raise PtqdError(err)
                return fn(*args, **kwargs)
            if not ctx.main:
                return fn(*args, **kwargs)
            with ExitStack() as stack:
                try:
                    stack.enter_context(output_lock(target, what))
                except PtqdError as e:
                    if grouped:
                        distributed.broadcast(str(e), ctx)
                    raise
                if grouped:
                    distributed.broadcast(None, ctx)
                return fn(*args, **kwargs)

        return run

    return wrap


def _group_ready() -> bool:
    try:
        import torch.distributed as td

        return td.is_available() and td.is_initialized()
    except ImportError:
        return False
