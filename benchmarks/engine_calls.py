"""The engine's compiled programs (phi3_jax.engine.programs) called directly, for benchmarks.

A benchmark that times a fixed batch of equal prompts wants the device work alone: the same
programs the engine runs, without its host-side bookkeeping (admission, per-token output,
stop strings). Here: a cache for B rows, each prompt prefilled into its row as the engine does
(one row per call), then greedy decode calls of a fixed number of steps over every row, with
eos and every other stop switched off so that each call runs all its steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from phi3_jax.cache import KVCache
from phi3_jax.engine import programs
from phi3_jax.engine.slots import MAX_STOP_IDS, NEVER
from phi3_jax.sampling import RowSampling

TOP_N = 0  # logprob alternatives the programs compute (the engine's default costs a top_k)


def greedy(B: int) -> RowSampling:
    return RowSampling(np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32),
                       np.zeros(B, np.float32), np.ones(B, np.float32))


def new_state(model, B: int, S: int) -> tuple[KVCache, jax.Array]:
    """(cache, seen) for B rows of S slots."""
    config = model.config
    return (KVCache.init(config, B, S, model.dtype),
            jnp.zeros((B, config.vocab_size), bool))


def prefill_args(model, cache, seen, row: int, tokens: np.ndarray | None, T: int, *,
                 start: int = 0, read_len: int = 0, use_long: bool = False,
                 top_n: int = TOP_N) -> tuple[tuple, dict]:
    """(args, kwargs) of programs.prefill for one prompt chunk `tokens` in a program of T slots
    (None: a full chunk of zeros, for lowering)."""
    count = T if tokens is None else len(tokens)
    padded = np.zeros((1, T), np.int32)
    if tokens is not None:
        padded[0, :count] = tokens
    args = (model.graph, model.params, cache, seen, np.int32(row), padded, np.int32(start),
            np.int32(count), np.bool_(use_long), np.full((1, T), -1, np.int32), greedy(1),
            np.zeros((1, 2), np.uint32))
    return args, dict(read_len=read_len, top_n=top_n, prompt_top_n=None, mesh=model.mesh)


def prefill_rows(model, cache, seen, prompts: np.ndarray, T: int | None = None,
                 use_long: bool = False) -> tuple[KVCache, jax.Array, np.ndarray]:
    """Prefills prompts [B, P] into rows 0..B-1 (one call per row, as the engine does), each
    in one chunk of T slots (default P). Returns the cache, seen and each row's first token."""
    B, P = prompts.shape
    first = []
    for row in range(B):
        args, kwargs = prefill_args(model, cache, seen, row, prompts[row], T or P,
                                    use_long=use_long)
        cache, seen, drawn, _ = programs.prefill(*args, **kwargs)
        first.append(drawn.tokens)
    return cache, seen, np.asarray(jnp.concatenate(first))


@dataclasses.dataclass
class DecodeRun:
    """Greedy decode over every row of a prefilled cache, reading read_len slots: the engine's
    decode program (up to max_steps steps per call) with nothing stopping early."""

    model: object
    cache: KVCache
    seen: jax.Array
    tokens: np.ndarray  # [B] each row's newest token
    position: int  # where the next token goes (all rows alike)
    read_len: int
    max_steps: int
    use_long: bool = False
    top_n: int = TOP_N  # logprob alternatives per step (the engine computes max_logprobs)
    drawn: int = 0  # tokens drawn per row so far

    def inputs(self) -> programs.DecodeInputs:
        B = len(self.tokens)
        return programs.DecodeInputs(
            rows=np.arange(B, dtype=np.int32), tokens=np.asarray(self.tokens, np.int32),
            positions=np.full(B, self.position, np.int32), running=np.ones(B, bool),
            use_long=np.full(B, self.use_long), halt_at=np.full(B, NEVER, np.int32),
            remaining=np.full(B, NEVER, np.int32),
            stop_ids=np.full((B, MAX_STOP_IDS), -1, np.int32),
            seeds=np.zeros((B, 2), np.uint32), sampling=greedy(B))

    def call_args(self, steps: int | None = None) -> tuple[tuple, dict]:
        """(args, kwargs) of programs.decode for a call of `steps` steps."""
        return ((self.model.graph, self.model.params, self.cache, self.seen, self.inputs(),
                 np.int32(steps or self.max_steps)),
                dict(read_len=self.read_len, max_steps=self.max_steps, top_n=self.top_n,
                     mesh=self.model.mesh))

    def lower(self):
        """The decode program, lowered (for its HLO or compiled memory)."""
        args, kwargs = self.call_args()
        return programs.decode.lower(*args, **kwargs)

    def __call__(self, steps: int | None = None) -> None:
        """One decode call of `steps` (default max_steps) steps; blocks until its tokens are
        on the host."""
        steps = steps or self.max_steps
        args, kwargs = self.call_args(steps)
        self.cache, self.seen, out = programs.decode(*args, **kwargs)
        tokens = np.asarray(out.tokens)[:steps]  # [steps, B]
        assert (tokens >= 0).all(), "a row stopped early"
        self.tokens = tokens[-1]
        self.position += steps
        self.drawn += steps


def abstract_state(model, B: int, S: int) -> tuple:
    """(cache, seen) as ShapeDtypeStructs: for lowering programs without allocating."""
    return jax.eval_shape(lambda: new_state(model, B, S))


def abstract_prefill(model, B: int, T: int, S: int, read_len: int = 0,
                     top_n: int = TOP_N) -> tuple[tuple, dict]:
    """(args, kwargs) of programs.prefill for one chunk of T tokens into a cache of B rows
    and S slots, allocating nothing (model.params may be abstract)."""
    cache, seen = abstract_state(model, B, S)
    return prefill_args(model, cache, seen, 0, None, T, read_len=read_len, top_n=top_n)


def abstract_decode(model, B: int, S: int, max_steps: int, read_len: int | None = None,
                    top_n: int = TOP_N) -> DecodeRun:
    """A DecodeRun on an abstract cache of B rows and S slots (for lowering only)."""
    cache, seen = abstract_state(model, B, S)
    return DecodeRun(model, cache, seen, np.zeros(B, np.int32), 0, read_len or S, max_steps,
                     top_n=top_n)
