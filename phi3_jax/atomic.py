"""Output folders that appear whole or not at all, and never over their own input.

Everything is written into a temporary folder next to the destination (same filesystem, so the
final rename is atomic) and renamed into place only after the last byte is written. An error,
Ctrl-C or SIGTERM removes the temporary folder: phi3_jax.interrupts defers the signal to a safe
point and ignores a second one during the cleanup. An existing destination is replaced (with
force) only after success, so a failed run never costs the old copy.

An output may not overlap an input: not the same folder, and neither inside the other, by any
path (symlinks resolved, and by inode, which also catches bind mounts).

SIGKILL or a power cut leaves the temporary folder behind. Each one records its owner: the
process id in its name (`.OUT.tmp-<pid>-<random>`, which holds the output being written and,
beside it, an `.owner` file with the pid and host) and a lock (flock) on that file, which the
owner holds until the folder is gone; the lock dies with the process. The next
run to the same destination removes those whose owner is gone: the lock can be taken, or, where
there is no lock file, the pid is not alive on this host and the folder is over a minute old. A
live writer's folder is never touched, and folders from older phi3-jax versions (no pid in the
name) are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator

from phi3_jax import interrupts

log = logging.getLogger(__name__)

OWNER = ".owner"
# A folder with no lock file is judged by its pid only when it is older than this: the file is
# created (already locked) right after the folder.
UNLOCKED_GRACE_S = 60.0


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` are the same folder or one contains the other, by any path."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return (_inside(ra, rb) or _inside(rb, ra)
            or _same_as_ancestor(ra, rb) or _same_as_ancestor(rb, ra))


def check_no_overlap(out: str | os.PathLike, source: str | os.PathLike,
                     out_name: str = "output folder", source_name: str = "its input") -> None:
    if overlaps(out, source):
        raise ValueError(f"{out_name} {os.path.abspath(out)} overlaps {source_name} "
                         f"{os.path.abspath(source)} (the same folder, or one inside the other, "
                         f"once links are resolved): writing it could destroy the input; "
                         f"choose another output")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _same_as_ancestor(path: str, folder: str) -> bool:
    """`path` or one of its existing ancestors is the file `folder` is (same device and inode)."""
    try:
        target = os.stat(folder)
    except OSError:
        return False
    while True:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(path), target):
                return True
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent


def check_destination(out_dir: str | os.PathLike, force: bool,
                      sources: Iterable[str | os.PathLike] = ()) -> str:
    """The absolute destination, once it is known not to overlap a source and to be absent
    (or, with force, an existing real folder). Stale temporary folders of earlier runs to it
    are removed first (see the module docstring)."""
    out_dir = os.path.abspath(out_dir)
    sources = [os.path.abspath(s) for s in sources]
    for source in sources:
        check_no_overlap(out_dir, source)
    remove_stale(out_dir, keep=sources)
    _check_existing(out_dir, force)
    return out_dir


def _check_existing(out_dir: str, force: bool) -> None:
    if os.path.lexists(out_dir):
        if not force:
            raise FileExistsError(f"output folder {out_dir} already exists; pass --force to "
                                  f"replace it")
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a folder; not replacing it")


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, force: bool = False,
                     sources: Iterable[str | os.PathLike] = ()) -> Iterator[str]:
    """Yields a fresh temporary folder that becomes `out_dir` when the block succeeds.

    Within the block, SIGINT and SIGTERM wait for the next `interrupts.check_interrupted()` (or
    the block's end); the temporary folder is then removed and KeyboardInterrupt (SIGINT) or
    interrupts.Terminated (SIGTERM, exit status 143) raised.
    """
    sources = [os.path.abspath(s) for s in sources]
    out_dir = check_destination(out_dir, force, sources)
    parent, name = os.path.split(out_dir)
    with interrupts.deferred():
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
        except OSError as e:
            raise OSError(e.errno, f"cannot write to {parent}: {e.strerror}") from e
        owner = None
        try:
            owner = _hold(tmp)
            work = os.path.join(tmp, name)  # the output; its lock file stays outside it
            os.mkdir(work)
            yield work
            interrupts.check_interrupted()
            _replace(work, out_dir, force, sources)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # still locked: nobody else removes it
            if owner is not None:
                os.close(owner)


def _hold(folder: str) -> int:
    """Creates the folder's lock file, locked, recording the owner; returns its fd. It is
    locked before it gets its name, so nobody can take the lock of a live owner."""
    draft = os.path.join(folder, OWNER + ".new")
    fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: the pid must do
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.rename(draft, os.path.join(folder, OWNER))
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale(out_dir: str, keep: Iterable[str] = ()) -> list[str]:
    """Removes the temporary folders of earlier runs to `out_dir` whose owner is gone (never
    one that overlaps a path in `keep`); returns their names.

    A stale `.OUT.old-*` folder holds the previous destination, moved aside just before the new
    one was renamed into place: it is deleted if the destination exists, and otherwise moved
    back, so a crash between the two renames never loses the old copy."""
    parent, name = os.path.split(out_dir)
    pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)-[a-z0-9_]{{8}}")
    try:
        entries = sorted(os.listdir(parent), key=lambda e: ".old-" not in e)  # old ones first
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry)
        folder = os.path.join(parent, entry)
        if (match is None or not os.path.isdir(folder) or os.path.islink(folder)
                or any(overlaps(folder, k) for k in keep)
                or not _owner_gone(folder, int(match[2]))):
            continue
        previous = os.path.join(folder, "previous")
        if match[1] == "old" and not os.path.lexists(out_dir) and os.path.isdir(previous):
            os.rename(previous, out_dir)
            log.warning("restored %s from %s, left by process %s when it was interrupted "
                        "while replacing it", out_dir, entry, match[2])
        else:
            log.warning("removing %s, left by process %s that is gone", folder, match[2])
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(entry)
    return removed


def _owner_gone(folder: str, pid: int) -> bool:
    try:
        fd = os.open(os.path.join(folder, OWNER), os.O_RDONLY)
    except FileNotFoundError:
        return _unlocked_and_dead(folder, pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its owner holds the lock: alive
    except OSError:  # no locks on this filesystem: judge by pid, on the owner's host only
        try:
            host = json.loads(os.read(fd, 4096)).get("host")
        except (OSError, ValueError, AttributeError):
            return False
        return host == socket.gethostname() and not _alive(pid)
    finally:
        os.close(fd)  # releases the lock if we took it
    return True


def _unlocked_and_dead(folder: str, pid: int) -> bool:
    try:
        age = time.time() - os.stat(folder).st_mtime
    except OSError:
        return False
    return age > UNLOCKED_GRACE_S and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def _replace(tmp: str, out_dir: str, force: bool, sources: list[str]) -> None:
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    for source in sources:  # it may have appeared while we were writing
        check_no_overlap(out_dir, source)
    _check_existing(out_dir, force)
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-{os.getpid()}-",
                           dir=os.path.dirname(out_dir))
    previous = os.path.join(old, "previous")
    os.rename(out_dir, previous)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(previous, out_dir)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)
