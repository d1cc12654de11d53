"""Ctrl-C (SIGINT) and SIGTERM: stop promptly, but never in the middle of a write.

`handled()` makes SIGTERM behave like SIGINT for its duration: either one raises at once,
`KeyboardInterrupt` for SIGINT and `Terminated` (a SystemExit with status 143 = 128 + SIGTERM,
what a shell reports for a process SIGTERM killed) for SIGTERM, so `finally` blocks and context
managers clean up instead of the process dying mid-write.

Inside `deferred()` a signal only records itself: the code raises it at a point of its choosing
with `check_interrupted()`, and the block's end raises it otherwise. Further signals while one is
pending are ignored, so a second Ctrl-C or a SIGTERM on top cannot cut a cleanup short (it used
to raise inside Orbax's event loop, leaving a half-deleted folder and an "Event loop is closed"
traceback). Once a signal has been raised, further ones are ignored until the outermost
`handled()` block ends, so a second Ctrl-C cannot interrupt the unwinding and cleanup that the
first one started; a command that is exiting calls `ignore_further()`. SIGKILL remains the way
to stop at once; what it leaves behind is cleaned up by the next run (phi3_jax.atomic).

Only signals still at their default disposition are taken over: a SIGINT that the shell set to
be ignored (a background job) stays ignored, and an application's own handlers are left alone.
Handlers can only be installed from the main thread; elsewhere these are no-ops.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class Terminated(SystemExit):
    """SIGTERM arrived: raised (after cleanup) with exit status 143."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class Interrupted(Exception):
    """A deferred signal, raised by check_interrupted() at a safe point. An ordinary
    Exception, so that it unwinds through libraries' error handling like any write error; the
    deferred() block it leaves turns it into KeyboardInterrupt or Terminated."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
_pending: int | None = None  # the first signal received inside a deferred() block
_deferring = 0  # nesting depth of deferred() blocks
_installed = 0  # nesting depth of the main thread's handled() blocks
_raised = False  # a signal has been raised as an exception in this handled() block


def _exception(signum: int) -> BaseException:
    global _raised
    _raised = True
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, frame) -> None:
    global _pending
    if _raised:
        return  # the first signal is already unwinding the work; let its cleanup finish
    if _deferring:
        if _pending is None:
            _pending = signum
        return
    raise _exception(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt / Terminated here (or wait, inside
    deferred())."""
    global _installed, _raised
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; deferred() still records them for here
        return
    if _installed:
        _installed += 1
        try:
            yield
        finally:
            _installed -= 1
        return
    previous = {}
    for signum, default in _DEFAULTS.items():
        if signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, _handler)
    _installed = 1
    try:
        yield
    finally:
        _installed = 0
        _raised = False
        for signum, handler in previous.items():
            if signal.getsignal(signum) is _handler:  # not replaced meanwhile (ignore_further)
                signal.signal(signum, handler)


def ignore_further() -> None:
    """The process is exiting because of a signal: later SIGINTs and SIGTERMs are ignored, so
    they cannot turn a clean exit status into a death by signal."""
    if threading.current_thread() is threading.main_thread():
        for signum in _DEFAULTS:
            signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals wait for check_interrupted() or the block's end, then raise KeyboardInterrupt
    (SIGINT) or Terminated (SIGTERM). A pending signal wins over an error the block raised
    meanwhile: the user asked to stop."""
    global _deferring
    with handled():
        _deferring += 1
        try:
            yield
        except BaseException as e:
            signum = _leave()
            if isinstance(e, Interrupted):
                signum = e.signum
            if signum is None:
                raise
            raise _exception(signum) from None
        signum = _leave()
        if signum is not None:
            raise _exception(signum)


def _leave() -> int | None:
    """Leaves one deferred() level; the outermost takes the pending signal, if any."""
    global _deferring, _pending
    _deferring -= 1
    if _deferring:
        return None
    signum, _pending = _pending, None
    return signum


@contextlib.contextmanager
def command() -> Iterator[None]:
    """A CLI command's whole run: signals handled; SIGTERM ends it with "terminated" on stderr
    and exit status 143 (SIGINT: "interrupted" and 130, from phi3_jax.cli)."""
    try:
        with handled():
            yield
    except Terminated:
        print("terminated", file=sys.stderr)
        raise


def check_interrupted() -> None:
    """Raises Interrupted if a signal is pending; call between units of work (any thread)."""
    if _pending is not None:
        raise Interrupted(_pending)
