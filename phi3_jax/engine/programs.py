"""The engine's compiled programs: a prompt chunk into one cache row, and decode steps over many.

Both take the parameters, the KV cache and the `seen` table (which tokens each row holds, for
the repetition penalty) explicitly, and donate the cache and the table, which they update in
place. Everything a request sets is a traced array indexed by row, so a new setting compiles
nothing; what is static (a chunk's length, how many rows a decode call runs, how much of the
cache attention reads, how many decode steps one call may run, how many logprobs alternatives)
is fixed by the engine's construction, which bounds the programs
(`phi3_jax.engine.scheduler.program_shapes`).

A prompt is prefilled alone, one row at a time, never batched with other prompts: a request's
numbers then depend on nothing but its own tokens, seed and positions, whatever else runs
(decode rows are batched, and from two rows up each row of a matmul is computed the same way
whichever rows run beside it: see the row buckets in phi3_jax.engine.scheduler).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from phi3_jax import sampling, sharding
from phi3_jax.cache import CacheUpdate, KVCache
from phi3_jax.compilation import StaticGraph
from phi3_jax.hooks import Hook
from phi3_jax.sampling import RowSampling


def _pytree(cls: type) -> type:
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_pytree
class DecodeInputs:
    """What each batch row [B] decodes from; the host sends it with every decode call."""

    rows: jax.Array  # int32: the cache row batch row b runs (distinct; b itself when B = R)
    tokens: jax.Array  # int32: the row's newest token, fed at `positions`
    positions: jax.Array  # int32
    running: jax.Array  # bool: the row decodes (a live request past its prefill)
    use_long: jax.Array  # bool: LongRoPE long factors
    halt_at: jax.Array  # int32: the row stops before feeding a token at this position
    remaining: jax.Array  # int32: tokens the row may still draw
    stop_ids: jax.Array  # [B, E] int32, -1 padded: ids that end the row
    seeds: jax.Array  # [B, 2] uint32
    sampling: RowSampling


@_pytree
class Drawn:
    """Tokens drawn, with their logprobs: [n, B] (and [n, B, top_n]) for n steps or prompt
    positions; -1 marks "nothing drawn here"."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def _draw(logits: jax.Array, seen: jax.Array, s: RowSampling, seeds: jax.Array,
          positions: jax.Array, top_n: int) -> Drawn:
    """Chooses each row's next token from logits [B, V]; `positions` [B] are the positions the
    new tokens will take (their random streams' index)."""
    token = sampling.choose(logits, seen, s, sampling.row_keys(seeds, positions))
    chosen, top_ids, top_lp = sampling.logprobs(logits, token, top_n)
    return Drawn(token, chosen, top_ids, top_lp)


def _constrain(cache: KVCache, mesh: Mesh | None) -> KVCache:
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, sharding.cache_shardings(cache, mesh))


@functools.partial(jax.jit, static_argnames=("graph", "read_len", "top_n", "prompt_top_n",
                                             "mesh"),
                   donate_argnames=("cache", "seen"))
def prefill(graph: StaticGraph, params: nnx.State, cache: KVCache, seen: jax.Array,
            row: jax.Array, tokens: jax.Array, start: jax.Array, count: jax.Array,
            use_long: jax.Array, next_ids: jax.Array, s: RowSampling, seeds: jax.Array,
            hooks: dict[str, Hook] | None = None, *, read_len: int, top_n: int,
            prompt_top_n: int | None, mesh: Mesh | None,
            ) -> tuple[KVCache, jax.Array, Drawn, Drawn | None]:
    """Runs one chunk of a prompt, tokens [1, T] at positions start .. start + count - 1, into
    cache row `row`, and draws the token after the chunk's last one (kept by the host only
    after a prompt's last chunk).

    read_len 0: the first chunk (start 0), whose tokens attend only to each other, through the
    prefill kernels (cuDNN's fused attention, or the blocked attention for long chunks). Else
    the chunk attends to the row's first read_len slots, which hold the earlier chunks.
    next_ids [1, T]: the prompt token after each position (-1 past the prompt); with
    prompt_top_n set, their logprobs (and prompt_top_n alternatives) come back too.
    hooks: the engine's phi3_jax.hooks (traced; None: none).
    """
    model = nnx.merge(graph.graphdef, params)
    T = tokens.shape[1]
    offsets = jnp.arange(T, dtype=jnp.int32)
    valid = offsets < count
    positions = jnp.where(valid, start + offsets, -1)[None]  # [1, T]
    update = CacheUpdate(starts=start[None], row=row, read_len=read_len)
    lengths = count[None] if read_len == 0 else None
    x, cache = model.hidden_states(tokens, positions, cache, update, use_long[None],
                                   prefill_lengths=lengths, hooks=hooks)  # [1, T, D]
    # The row's seen tokens: cleared by the first chunk, then every chunk's tokens added.
    V = seen.shape[1]
    current = jnp.where(start == 0, False, jax.lax.dynamic_index_in_dim(seen, row, 0))  # [1, V]
    current = current.at[0, jnp.where(valid, tokens[0], V)].set(True, mode="drop")
    seen = jax.lax.dynamic_update_index_in_dim(seen, current, row, 0)
    last = jnp.maximum(count - 1, 0)
    logits = model.head.attend(jax.lax.dynamic_slice_in_dim(x, last, 1, axis=1))[:, 0]
    drawn = _draw(logits, current, s, seeds, (start + count)[None], top_n)
    prompt = None
    if prompt_top_n is not None:
        logp = jax.nn.log_softmax(model.head.attend(x)[0].astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(logp, jnp.maximum(next_ids[0], 0)[:, None], axis=-1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(logp, prompt_top_n)
        prompt = Drawn(next_ids[0], chosen, top_ids.astype(jnp.int32), top_lp)
    return _constrain(cache, mesh), seen, drawn, prompt


@functools.partial(jax.jit, static_argnames=("graph", "read_len", "max_steps", "top_n", "mesh",
                                             "copy_window"),
                   donate_argnames=("cache", "seen"))
def decode(graph: StaticGraph, params: nnx.State, cache: KVCache, seen: jax.Array,
           inputs: DecodeInputs, steps: jax.Array, hooks: dict[str, Hook] | None = None, *,
           read_len: int, max_steps: int, top_n: int, mesh: Mesh | None,
           copy_window: bool | None = None) -> tuple[KVCache, jax.Array, Drawn]:
    """Up to `steps` (<= max_steps) decode steps over B rows of the cache, on device.

    A row feeds its newest token and draws the next while it is running, has tokens left to
    draw, has not drawn one of its stop ids and has not reached halt_at (a LongRoPE crossing,
    which the host re-prefills). Attention reads the first read_len slots of every row, which
    must cover every position fed. Returns what each step drew ([max_steps, B], -1 where a row
    drew nothing).

    B below the cache's R rows (a row bucket: phi3_jax.engine.scheduler): batch row b runs
    cache row inputs.rows[b], through a copy of the rows' first read_len slots made once per
    call or in place (`copy_window`, below).
    """
    model = nnx.merge(graph.graphdef, params)
    B = inputs.tokens.shape[0]
    V = seen.shape[1]
    # copy_window (default: on the CPU): a row bucket (B < R) works on a copy of its rows'
    # first read_len slots, gathered once per call and scattered back once, and so does a
    # full-width call reading fewer than max_len slots, since XLA:CPU copies a dot's sliced
    # operand at every step (0.07 ms of a 1.1 ms one-row step here). Off (elsewhere, where
    # the KV cache may fill the device's memory and a copy of half its rows would not fit),
    # each layer gathers its rows at every step and writes in place (not measured on a GPU
    # yet).
    if copy_window is None:
        copy_window = jax.default_backend() == "cpu"
    gathered = cache.rows > B
    copied = copy_window and (gathered or read_len < cache.max_len)
    rows = inputs.rows if gathered else slice(None)
    if copied:
        work = KVCache(k=tuple(c[rows, :read_len] for c in cache.k),
                       v=tuple(c[rows, :read_len] for c in cache.v))
    else:
        work = cache
    in_place_rows = inputs.rows if gathered and not copied else None
    work_seen = seen[rows] if gathered or copied else seen
    S = work.max_len
    none = jnp.full((max_steps, B), -1, jnp.int32)
    out = Drawn(none, jnp.zeros((max_steps, B), jnp.float32),
                jnp.zeros((max_steps, B, top_n), jnp.int32),
                jnp.zeros((max_steps, B, top_n), jnp.float32))

    def live(token, position, remaining, done):
        return (inputs.running & ~done & (remaining > 0) & (position < inputs.halt_at))

    def cond(carry):
        i, _, token, position, remaining, done, _ = carry
        return (i < steps) & jnp.any(live(token, position, remaining, done))

    def body(carry):
        i, cache_seen, token, position, remaining, done, out = carry
        cache, seen = cache_seen
        on = live(token, position, remaining, done)  # [B]
        # Rows that do not run feed position -1 (they see nothing) and write nowhere.
        fed = jnp.where(on, position, -1)
        update = CacheUpdate(starts=jnp.where(on, position, S), row=in_place_rows,
                             read_len=read_len)
        logits, cache = model(token[:, None], fed[:, None], cache, update, inputs.use_long,
                              hooks=hooks)
        # The fed token joins the row's seen set (a prompt chunk drew it without adding it).
        seen = seen.at[jnp.arange(B), jnp.where(on, token, V)].set(True, mode="drop")
        drawn = _draw(logits[:, 0], seen, inputs.sampling, inputs.seeds, position + 1, top_n)
        new = jnp.where(on, drawn.tokens, -1)
        out = Drawn(out.tokens.at[i].set(new), out.logprobs.at[i].set(drawn.logprobs),
                    out.top_ids.at[i].set(drawn.top_ids),
                    out.top_logprobs.at[i].set(drawn.top_logprobs))
        stopped = jnp.any(new[:, None] == inputs.stop_ids, axis=1) & on
        return (i + 1, (cache, seen), jnp.where(on, new, token), position + on,
                remaining - on, done | stopped, out)

    carry = (jnp.zeros((), jnp.int32), (work, work_seen), inputs.tokens, inputs.positions,
             inputs.remaining, jnp.zeros((B,), bool), out)
    _, (work, work_seen), _, _, _, _, out = jax.lax.while_loop(cond, body, carry)
    if copied:  # back in place: the cache and the table are donated
        def put(full: tuple[jax.Array, ...], part: tuple[jax.Array, ...]) -> tuple:
            return tuple(c.at[rows, :read_len].set(w) for c, w in zip(full, part, strict=True))

        cache = KVCache(k=put(cache.k, work.k), v=put(cache.v, work.v))
    else:
        cache = work
    seen = seen.at[rows].set(work_seen) if gathered or copied else work_seen
    return _constrain(cache, mesh), seen, out
