"""Training checkpoints (Orbax): the TrainState plus what it takes to resume exactly.

Each checkpoint `OUT/checkpoints/<step>/` holds
- `state`: the TrainState pytree (step, fp32 trainable params, optimizer state, RNG key), restored
  straight into the current run's shardings (so a run may resume on another mesh);
- `meta`: JSON with the data iterator's position and the run's fingerprint (the settings that
  shape the loss curve), checked on resume so a mismatched run fails instead of drifting.

A LoRA run's frozen base is not saved: it is the --model folder, reloaded. Orbax writes into a
temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from phi3_jax.train.step import TrainState

CHECKPOINT_DIR = "checkpoints"


class ResumeError(ValueError):
    """A checkpoint that does not belong to this run's settings."""


class Checkpointer:
    def __init__(self, out_dir: str | os.PathLike, max_to_keep: int = 2):
        self.directory = os.path.join(os.path.abspath(os.fspath(out_dir)), CHECKPOINT_DIR)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                 create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, position: int, fingerprint: dict[str, Any]) -> None:
        step = int(state.step)
        meta = {"step": step, "data_position": position, "fingerprint": fingerprint}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, abstract: TrainState, fingerprint: dict[str, Any],
                step: int | None = None) -> tuple[TrainState, int]:
        """(state, data position) of `step` (default: the latest), in `abstract`'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ResumeError(f"no checkpoint in {self.directory}")
        self.wait()
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        saved = meta["fingerprint"]
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in fingerprint.items()
                 if saved.get(k) != v]
        if diffs:
            raise ResumeError(f"{self.directory} holds a run with other settings ("
                              + "; ".join(diffs) + "): resume with the same settings, or "
                              "choose another --out")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
        return restored.state, int(meta["data_position"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(state_shapes: TrainState, shardings: TrainState | None) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings (or the default device's)."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            state_shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        state_shapes, shardings)
