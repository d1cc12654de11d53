"""Output folders that appear whole or not at all.

Everything is written into a temporary folder next to the destination (same filesystem, so the
final rename is atomic) and renamed into place only after the last byte is written. Any exception,
SIGINT included, removes the temporary folder; an existing destination is replaced (with force)
only after success, so a failed run never costs the old copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator


def check_destination(out_dir: str | os.PathLike, force: bool,
                      sources: tuple[str | os.PathLike, ...] = ()) -> str:
    """Refuses an existing destination unless forced, or one that would replace a source."""
    out_dir = os.path.abspath(out_dir)
    for source in sources:
        source = os.path.abspath(source)
        if out_dir == source or source.startswith(out_dir + os.sep):
            raise ValueError(f"output folder {out_dir} would replace its own input {source}")
    if os.path.lexists(out_dir):
        if not force:
            raise FileExistsError(f"output folder {out_dir} already exists; pass --force to "
                                  f"replace it")
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a folder; not replacing it")
    return out_dir


class Interrupted(Exception):
    """SIGINT arrived during a write; raised at the next safe point, turned into
    KeyboardInterrupt once the temporary folder is gone."""


_interrupted = threading.Event()


def check_interrupted() -> None:
    """Raises Interrupted if SIGINT arrived; call between units of work (e.g. tensors)."""
    if _interrupted.is_set():
        raise Interrupted("interrupted")


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[None]:
    """The first SIGINT only sets a flag that `check_interrupted` turns into an exception, so
    no write is cut off while Orbax's and TensorStore's threads still work in the folder we are
    about to delete; a second SIGINT interrupts at once. (Signals reach only the main thread.)"""
    def handler(signum, frame):
        if _interrupted.is_set():
            raise KeyboardInterrupt
        _interrupted.set()

    _interrupted.clear()
    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, force: bool = False) -> Iterator[str]:
    """Yields a fresh temporary folder that becomes `out_dir` when the block succeeds.

    Within the block, SIGINT is deferred to the next `check_interrupted()` (and the block's
    end); the temporary folder is then removed and KeyboardInterrupt raised.
    """
    out_dir = check_destination(out_dir, force)
    parent, name = os.path.split(out_dir)
    with _deferred_sigint():
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would carry over to the result
        except OSError as e:
            raise OSError(e.errno, f"cannot write to {parent}: {e.strerror}") from e
        try:
            yield tmp
            check_interrupted()
            _replace(tmp, out_dir, force)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Interrupted) or _interrupted.is_set():
                raise KeyboardInterrupt from None
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: str, out_dir: str, force: bool) -> None:
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    check_destination(out_dir, force)  # it may have appeared while we were writing
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-",
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
