"""phi3-jax Orbax checkpoints (placeholder until the converter lands: detection only)."""

from __future__ import annotations

import os

MARKER = "phi3_jax.json"


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def load(path, dtype="float32", mesh=None):
    raise NotImplementedError("Orbax checkpoints are not supported yet")
