"""Training checkpoints (Orbax): the TrainState plus what it takes to resume exactly.

Each checkpoint `OUT/checkpoints/<step>/` holds
- `state`: the TrainState pytree (step, fp32 trainable params, optimizer state, RNG key), restored
  straight into the current run's shardings (so a run may resume on another mesh);
- `meta`: JSON with the data iterator's position and the run's fingerprint (the settings that
  shape the loss curve), checked on resume so a mismatched run fails instead of drifting;
- `phi3_jax_checksums.json`: the size and sha256 of every file above (phi3_jax.checksums),
  written by Orbax's post-finalization callback, in the background thread that writes the
  checkpoint, into its temporary folder: it is part of the atomic rename that commits it.

A LoRA run's frozen base is not saved: it is the --model folder, reloaded. Orbax writes into a
temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint as the latest; the next run removes the leftover (only one run may write to an OUT at
a time: the checkpoints folder is locked).

On resume, the newest checkpoint is verified against its checksums before anything is restored,
and its values must be finite. One that fails is reported by name and moved to
`OUT/checkpoints-corrupt/`, and the run falls back to the newest intact one. A checkpoint
without checksums (written by an older phi3-jax) is restored unverified, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from phi3_jax import checksums
from phi3_jax.orbax_checkpoint import storage_error
from phi3_jax.train.step import TrainState, all_finite

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints-corrupt"
CHECKSUMS = "phi3_jax_checksums.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # an uncommitted checkpoint: <step>.orbax-checkpoint-tmp*
# Orbax rewrites these when it commits the folder, after the checksums are taken; they hold
# its bookkeeping (commit times), not the state.
_UNSEALED = ("_CHECKPOINT_METADATA", "commit_success.txt")


class ResumeError(ValueError):
    """A checkpoint that does not belong to this run's settings, or none that is intact."""


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files do not match their checksums, or that cannot be read."""


class Checkpointer:
    """OUT/checkpoints. A `writer` (the training run) holds a lock on it until close(), so that
    no two runs write one OUT, and so may remove what an interrupted save left behind."""

    def __init__(self, out_dir: str | os.PathLike, max_to_keep: int = 2, writer: bool = False):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.directory = os.path.join(self.out_dir, CHECKPOINT_DIR)
        os.makedirs(self.directory, exist_ok=True)
        self._lock = None
        if writer:
            self._lock = _lock(self.directory, self.out_dir)
            _remove_unfinished(self.directory)
        self._saving: int | None = None
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._seal)))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, position: int, fingerprint: dict[str, Any]) -> None:
        step = int(state.step)
        meta = {"step": step, "data_position": position, "fingerprint": fingerprint,
                "checksums": CHECKSUMS}
        self._manager.wait_until_finished()  # one save in flight: _seal knows which
        self._saving = step
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def _seal(self) -> None:
        """Records the checksums of the checkpoint just written, before Orbax commits it."""
        if self._saving is None or jax.process_index() != 0:
            return
        step, self._saving = self._saving, None
        final = os.path.join(self.directory, str(step))
        # Orbax commits by renaming this temporary folder right after this callback; where
        # its commit works otherwise (or comes first), the checksums go into the final folder.
        pending = [os.path.join(self.directory, name) for name in os.listdir(self.directory)
                   if name.startswith(f"{step}{TMP_SUFFIX}")]
        folder = max(pending, key=os.path.getmtime) if pending else final
        record = checksums.record(
            folder, skip=lambda rel: rel in _UNSEALED or rel.endswith("/commit_success.txt"))
        draft = os.path.join(folder, CHECKSUMS + ".new")
        with open(draft, "w") as f:
            json.dump(record, f)
        os.replace(draft, os.path.join(folder, CHECKSUMS))

    def restore(self, abstract: TrainState, fingerprint: dict[str, Any],
                ) -> tuple[TrainState, int]:
        """(state, data position) of the newest intact checkpoint, in `abstract`'s shardings.

        Corrupt ones, newest first, are reported and moved to OUT/checkpoints-corrupt."""
        self.wait()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise ResumeError(f"no checkpoint in {self.directory}")
        for step in steps:
            try:
                meta, verified = self._meta(step)
                _check_fingerprint(self.directory, meta["fingerprint"], fingerprint)
                state = self._state(step, abstract, verified)
            except CorruptCheckpoint as e:
                log.warning("%s; moved it to %s", e, self._set_aside(step))
                continue
            if step != steps[0]:
                log.warning("resuming from step %d, the newest intact checkpoint", step)
            return state, int(meta["data_position"])
        raise ResumeError(f"no intact checkpoint in {self.directory} (the corrupt ones are in "
                          f"{os.path.join(self.out_dir, CORRUPT_DIR)}); run again to start "
                          f"from step 0")

    def _meta(self, step: int) -> tuple[dict, bool]:
        """The checkpoint's meta record, once its files are verified; and whether they were."""
        folder = os.path.join(self.directory, str(step))
        name = f"checkpoint {folder}"
        record = None
        if os.path.isfile(os.path.join(folder, CHECKSUMS)):
            try:
                with open(os.path.join(folder, CHECKSUMS)) as f:
                    record = json.load(f)
            except (OSError, ValueError) as e:
                raise CorruptCheckpoint(f"{name} is corrupt: {CHECKSUMS}: {e}") from None
            try:
                checksums.verify(folder, record, name)
            except checksums.ChecksumError as e:
                raise CorruptCheckpoint(str(e)) from None
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CorruptCheckpoint(f"{name} is corrupt: its meta record cannot be read "
                                    f"({_first_line(e)})") from None
        if not isinstance(meta, dict) or not {"fingerprint", "data_position"} <= meta.keys():
            raise CorruptCheckpoint(f"{name} is corrupt: its meta record is incomplete")
        if record is None:
            if "checksums" in meta:
                raise CorruptCheckpoint(f"{name} is corrupt: {CHECKSUMS} is missing")
            log.warning("%s has no checksums (written by an older phi3-jax): restoring it "
                        "unverified", name)
        return meta, record is not None

    def _state(self, step: int, abstract: TrainState, verified: bool) -> TrainState:
        folder = os.path.join(self.directory, str(step))
        try:
            state = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract))).state
        except Exception as e:
            unreadable = storage_error(e)
            if verified or unreadable is None:
                raise  # intact files: a mismatch with this run's model, not damage
            raise CorruptCheckpoint(f"checkpoint {folder} cannot be read (a file is damaged or "
                                    f"truncated): {unreadable}") from None
        if not bool(jax.jit(all_finite)(state)):
            raise CorruptCheckpoint(f"checkpoint {folder} holds NaN or infinite values")
        return state

    def _set_aside(self, step: int) -> str:
        """Moves a corrupt checkpoint out of Orbax's sight (kept for inspection)."""
        target = os.path.join(self.out_dir, CORRUPT_DIR, str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            suffix = 1
            while os.path.lexists(target):
                target = os.path.join(self.out_dir, CORRUPT_DIR, f"{step}.{suffix}")
                suffix += 1
            shutil.move(os.path.join(self.directory, str(step)), target)
        self._manager.reload()
        return target

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._manager.close()
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None


def _check_fingerprint(directory: str, saved: dict[str, Any],
                       fingerprint: dict[str, Any]) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in fingerprint.items()
             if saved.get(k) != v]
    if diffs:
        raise ResumeError(f"{directory} holds a run with other settings ("
                          + "; ".join(diffs) + "): resume with the same settings, or "
                          "choose another --out")


def _lock(directory: str, out_dir: str) -> int | None:
    """An exclusive lock on the checkpoints folder for this process's lifetime (it dies with
    it), so that two runs never write one OUT; None on other processes of a multi-host run
    and where the filesystem has no locks."""
    if jax.process_index() != 0:
        return None
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ResumeError(f"another run is writing to {out_dir} (its {CHECKPOINT_DIR} folder "
                          f"is locked): wait for it to finish, or choose another --out") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL):
            raise
        return None
    return fd


def _remove_unfinished(directory: str) -> None:
    """Removes what saves cut short (SIGKILL, power loss) left: Orbax's uncommitted temporary
    folders. Only a writer calls this, holding the lock: no save of another run is in flight.
    (Orbax's own cleanup_tmp_directories runs in the background, racing the first save.)"""
    for name in os.listdir(directory):
        if TMP_SUFFIX in name and os.path.isdir(os.path.join(directory, name)):
            log.warning("removing %s, an unfinished checkpoint of an interrupted run",
                        os.path.join(directory, name))
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _first_line(error: BaseException) -> str:
    line = (str(error).splitlines() or [type(error).__name__])[0]
    return line if len(line) <= 200 else line[:197] + "..."


def abstract_like(state_shapes: TrainState, shardings: TrainState | None) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings (or the default device's)."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            state_shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        state_shapes, shardings)

