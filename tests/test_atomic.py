"""Output folders that never destroy data: overlap with inputs, signals, stale temporary folders.

Real signals (os.kill on this process, or on a child) and real processes (a live writer in a
child, a dead one by its pid) are the references; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phi3_jax import atomic, interrupts
from phi3_jax.atomic import atomic_directory, check_destination, overlaps


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- overlap: by any path -------------------------------------------------------------------


def test_overlap_through_links_and_nesting(tmp_path):
    real = tmp_path / "real"
    (real / "model" / "sub").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(real)
    (tmp_path / "model_link").symlink_to(real / "model")
    model = real / "model"
    assert overlaps(model, model)
    assert overlaps(tmp_path / "alias" / "model", model)  # symlinked parent
    assert overlaps(tmp_path / "model_link", model)  # the folder itself is a link
    assert overlaps(model / "sub", model) and overlaps(model, model / "sub")
    assert overlaps(tmp_path / "alias" / "model" / "new" / "out", model)  # not there yet
    assert overlaps(real, tmp_path / "model_link")  # output contains the input, via a link
    assert not overlaps(real / "other", model)
    assert not overlaps(real / "model2", model)  # a name prefix is not containment
    with pytest.raises(ValueError, match="overlaps its input"):
        check_destination(tmp_path / "alias" / "model", True, sources=[model])
    assert (model / "sub").is_dir()


# --- signals ---------------------------------------------------------------------------------


def test_sigterm_is_deferred_then_raised_with_status_143(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err, atomic_directory(out) as tmp:
        Path(tmp, "a").write_text("x")
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not raised: we are mid-write
        os.kill(os.getpid(), signal.SIGINT)  # a second signal is ignored
        Path(tmp, "b").write_text("y")  # still running
        interrupts.check_interrupted()
        raise AssertionError("not reached")
    assert isinstance(err.value, interrupts.Terminated) and err.value.code == 143
    assert entries(tmp_path) == []  # temporary folder gone, nothing renamed into place
    # The handlers are restored afterwards.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_at_the_end_of_the_block_discards_the_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_directory(out) as tmp:
        Path(tmp, "a").write_text("x")
        os.kill(os.getpid(), signal.SIGINT)
    assert entries(tmp_path) == []


def test_handled_turns_sigterm_into_terminated_and_leaves_ignored_signals_alone():
    with pytest.raises(interrupts.Terminated), interrupts.handled():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs first
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job
    try:
        with interrupts.handled():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_signal_cannot_cut_the_first_ones_cleanup_short():
    cleaned = []
    with pytest.raises(KeyboardInterrupt), interrupts.handled():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs first
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while unwinding: ignored
            time.sleep(0.01)
            cleaned.append(True)
    assert cleaned == [True]
    # Once the block is over, Ctrl-C is Ctrl-C again.
    with pytest.raises(KeyboardInterrupt), interrupts.handled():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


# --- stale temporary folders -----------------------------------------------------------------


def fake_leftover(parent: Path, kind: str, pid: int, owner: bool = True, age_s: float = 0,
                  suffix: str = "abcd_123", inner: str = "payload") -> Path:
    folder = parent / f".out.{kind}-{pid}-{suffix}"
    (folder / inner).mkdir(parents=True)
    (folder / inner / "data.bin").write_bytes(b"\0" * 100)
    if owner:
        (folder / atomic.OWNER).write_text(json.dumps({"pid": pid, "host": "x"}))
    if age_s:
        past = time.time() - age_s
        os.utime(folder, (past, past))
    return folder


def test_next_run_removes_leftovers_of_dead_writers_only(tmp_path):
    dead = dead_pid()
    gone = fake_leftover(tmp_path, "tmp", dead)  # unlocked lock file: owner gone
    gone_unlocked = fake_leftover(tmp_path, "tmp", dead, owner=False, age_s=120,
                                  suffix="efgh_456")
    young = fake_leftover(tmp_path, "tmp", dead, owner=False, suffix="ijkl_789")  # just made
    alive = fake_leftover(tmp_path, "tmp", os.getpid(), owner=False, age_s=120,
                          suffix="mnop_012")  # this (live) process, no lock file
    legacy = tmp_path / ".out.tmp-k2j3h4g5"  # older phi3-jax: no pid, left alone
    legacy.mkdir()
    other = fake_leftover(tmp_path / "elsewhere", "tmp", dead)  # another output's parent
    with atomic_directory(tmp_path / "out") as tmp:
        Path(tmp, "result").write_text("new")
    assert not gone.exists() and not gone_unlocked.exists()
    assert young.exists() and alive.exists() and legacy.exists() and other.exists()
    assert Path(tmp_path / "out" / "result").read_text() == "new"


def test_live_writer_in_another_process_is_never_touched(tmp_path):
    out = tmp_path / "out"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from phi3_jax.atomic import atomic_directory\n"
         "with atomic_directory(sys.argv[1]) as tmp:\n"
         "    print(tmp, flush=True)\n"
         "    time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        live = Path(writer.stdout.readline().strip()).parent
        assert live.is_dir() and live.name.startswith(f".out.tmp-{writer.pid}-")
        past = time.time() - 3600  # old, too: only the lock tells it is alive
        os.utime(live, (past, past))
        assert atomic.remove_stale(str(out)) == []
        assert live.is_dir()
        writer.kill()  # SIGKILL: no cleanup of its own
        writer.wait(timeout=30)
        assert live.is_dir()
        assert atomic.remove_stale(str(out)) == [live.name]
        assert not live.exists()
    finally:
        writer.kill()
        writer.wait(timeout=30)


def test_interrupted_replacement_restores_the_previous_output(tmp_path):
    # Killed between moving the old output aside and renaming the new one into place.
    old = fake_leftover(tmp_path, "old", dead_pid(), owner=False, age_s=120, inner="previous")
    check_destination(tmp_path / "out", force=True)
    assert (tmp_path / "out" / "data.bin").stat().st_size == 100 and not old.exists()
    # With the new output in place, the leftover is just deleted.
    (tmp_path / "out" / "data.bin").write_bytes(b"new")
    old = fake_leftover(tmp_path, "old", dead_pid(), owner=False, age_s=120, inner="previous")
    check_destination(tmp_path / "out", force=True)
    assert not old.exists() and (tmp_path / "out" / "data.bin").read_bytes() == b"new"
