"""What decides compilation: the model's graph as a jit key, length buckets, and the persistent
compilation cache."""

from __future__ import annotations

import os

import jax
from flax import nnx


class StaticGraph:
    """A model's graphdef as a jit static argument, hashed once.

    jit hashes its static arguments on every call, and a GraphDef rehashes its whole node tree
    each time: 2 ms for Phi-3-mini's 32 layers on a 2-core CPU, per dispatch, which a streamed
    generation pays per token. Equal graphdefs still make equal keys, so two loads of one
    architecture share their compiled programs.
    """

    __slots__ = ("_hash", "graphdef")

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, StaticGraph) and self._hash == other._hash
                                 and self.graphdef == other.graphdef)


def bucket_length(n: int, minimum: int = 16, per_octave: int = 1) -> int:
    """The smallest bucket >= n (at least `minimum`). Buckets split each octave (2^k, 2^(k+1)]
    into `per_octave` equal steps: 1 gives powers of two; 4 wastes at most 25% of a length for
    4 compiled shapes per octave. Either way recompiles stay logarithmic in the range."""
    if n <= minimum:
        return minimum
    top = 1 << (n - 1).bit_length()  # the power of two >= n
    step = max(1, top // (2 * per_octave))
    return -(-n // step) * step


def buckets_up_to(limit: int, minimum: int = 16, per_octave: int = 1) -> list[int]:
    """Every bucket_length value from `minimum` up to the first one >= limit, in order."""
    out = [bucket_length(1, minimum, per_octave)]
    while out[-1] < limit:
        out.append(bucket_length(out[-1] + 1, minimum, per_octave))
    return out


def enable_compilation_cache(directory: str | os.PathLike) -> None:
    """Turns on JAX's persistent compilation cache in `directory`: later processes reuse the
    compiled programs instead of compiling them again."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # By default only programs that took > 1 s to compile are cached; ours are worth it at once.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
