"""Batched generation with a static-shape KV cache: a jitted prefill, then a jitted decode loop.

Layout. Prompts are right-padded to a common bucketed length Tp (row b's tokens at slots
0..len_b-1), which lets the prefill use a causal kernel with per-row lengths (cuDNN's fused
attention on GPUs). Generated tokens go to shared slots: slot Tp + i holds the i-th generated
token of every row, so short rows leave empty slots (position -1) between prompt and output.
Each row keeps its own positions, which is all the attention mask and RoPE need.

Compilation. Batch size is rounded up to a power of two, prompt and cache lengths to quarter
octaves (`batch_shapes`), the model's graphdef is static (hashed once: api.StaticGraph) and the
parameters, cache and sampler numbers are traced, so a new prompt compiles nothing unless it
lands in a new bucket. `end_step` is traced too: one compiled loop serves the single
run-to-completion call and the chunked calls used for streaming.

Host syncs. Without streaming or stop strings the whole generation is one `lax.while_loop`
that ends when every row is done (or at max_new_tokens). Streaming syncs after every token and
stop strings every STOP_CHECK_EVERY tokens, since both need text on the host.

LongRoPE (spec section 2). Policy "per_sequence" (default) gives each row the factors
transformers gives that sequence alone: short while its length is <= original_max, long after.
When a row's length first reaches original_max + 1, the keys it cached with the short factors
are stale; transformers' `generate` then drops the cache and re-prefills everything. We
recompute the whole cache with the long factors at that step too (inside the loop, under
`lax.cond`, a rare event), but keep the result only for the rows that crossed, so no row's
numbers depend on the other rows. Policy "always_long" uses the long factors for every
position from the start, as current vLLM does: it never recomputes the cache, but short
prompts get different (usually slightly worse) outputs than transformers' for the same model.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi3_jax import attention, sharding
from phi3_jax.api import StaticGraph, bucket_length, check_token_ids
from phi3_jax.cache import KVCache
from phi3_jax.config import Phi3Config
from phi3_jax.sampling import Sampler, make_sampler

if TYPE_CHECKING:
    from phi3_jax.api import Phi3

ROPE_POLICIES = ("per_sequence", "always_long")
STOP_CHECK_EVERY = 8  # decode steps between host checks for stop strings
BUCKETS_PER_OCTAVE = 4  # prompt and cache lengths: at most 25% padding, 4 shapes per octave
DEFAULT_MAX_NEW_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class Completion:
    """One row's result. token_ids include a final eos token when the row stopped on one; text
    (None without a tokenizer) leaves it out, and ends before a stop string that ended the row."""

    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (eos token or stop string) or "length"


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """New output of one row: token ids and (with a tokenizer) the text they complete.
    finish_reason is set on the row's last chunk."""

    row: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingState:
    """Everything the decode loop carries; donated into each jitted call."""

    cache: KVCache
    tokens: jax.Array  # [B, S] int32: right-padded prompts, then generated tokens, per slot
    lengths: jax.Array  # [B] int32: real tokens so far (prompt + generated)
    limits: jax.Array  # [B] int32: the length at which a row stops (prompt + its budget)
    seen: jax.Array  # [B, V] bool: tokens present in the row (repetition penalty)
    done: jax.Array  # [B] bool
    logits: jax.Array  # [B, V] f32: the raw logits that chose the newest token
    step: jax.Array  # [] int32: tokens generated so far (the newest sits at slot cache.index)
    key: jax.Array  # PRNG key


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static part of a generation: shapes and policy flags (part of the jit cache key)."""

    cache_len: int
    always_long: bool
    reprefill: bool  # whether a row can cross original_max in this run (per_sequence only)
    mesh: jax.sharding.Mesh | None = None


def enable_compilation_cache(directory: str | os.PathLike) -> None:
    """Turns on JAX's persistent compilation cache in `directory`: later processes reuse the
    compiled prefill/decode programs instead of compiling them again."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # By default only programs that took > 1 s to compile are cached; ours are worth it at once.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ---------------------------------------------------------------------------------------------
# Jitted steps


def _record(state: SamplingState, sampler: Sampler, stop_ids: jax.Array, pad_id: jax.Array,
            logits: jax.Array, key: jax.Array) -> SamplingState:
    """Chooses each live row's next token from `logits` [B, V] and writes it at slot
    cache.index; finished rows get pad_id and stay finished."""
    B, V = state.seen.shape
    was_done = state.done
    sampled = sampler(logits, state.seen, key)  # [B]
    token = jnp.where(was_done, pad_id, sampled)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.cache.index))
    lengths = state.lengths + (~was_done).astype(jnp.int32)
    seen = state.seen.at[jnp.arange(B), jnp.where(was_done, V, token)].set(True, mode="drop")
    done = was_done | jnp.isin(token, stop_ids) | (lengths >= state.limits)
    return dataclasses.replace(state, tokens=tokens, lengths=lengths, seen=seen, done=done,
                               logits=logits.astype(jnp.float32), step=state.step + 1)


@functools.partial(jax.jit, static_argnames=("graph", "plan"))
def _prefill(graph: StaticGraph, params: nnx.State, tokens: jax.Array, positions: jax.Array,
             limits: jax.Array, sampler: Sampler, stop_ids: jax.Array, pad_id: jax.Array,
             seed: jax.Array, plan: _Plan) -> SamplingState:
    """Runs the right-padded prompts tokens/positions [B, Tp] and picks the first new token."""
    model = nnx.merge(graph.graphdef, params)
    config = model.config
    B, Tp = tokens.shape
    S = plan.cache_len
    cache = KVCache.init(config, B, S, model.model.embed_tokens.weight[...].dtype)
    if plan.mesh is not None:  # batch over `data`, KV heads over `model`, like the weights
        cache = jax.lax.with_sharding_constraint(cache, sharding.cache_shardings(cache, plan.mesh))
    use_long = jnp.ones((B,), bool) if plan.always_long else None
    real = positions >= 0  # [B, Tp]
    lengths = jnp.sum(real, axis=1, dtype=jnp.int32)
    x, cache = model.hidden_states(tokens, positions, cache, use_long,
                                   prefill_lengths=lengths)  # [B, Tp, D]
    last = jnp.maximum(lengths - 1, 0)[:, None, None]  # each row's last prompt token
    logits = model.head.attend(jnp.take_along_axis(x, last, axis=1))[:, 0]  # [B, V]
    V = config.vocab_size
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, Tp))
    seen = jnp.zeros((B, V), bool).at[rows, jnp.where(real, tokens, V)].set(True, mode="drop")
    all_tokens = jnp.zeros((B, S), jnp.int32).at[:, :Tp].set(tokens)
    key, sub = jax.random.split(jax.random.key(seed))
    state = SamplingState(cache=cache, tokens=all_tokens, lengths=lengths, limits=limits,
                          seen=seen, done=lengths == 0, logits=logits.astype(jnp.float32),
                          step=jnp.zeros((), jnp.int32), key=key)
    return _record(state, sampler, stop_ids, pad_id, logits, sub)


def _decode_step(model: Any, state: SamplingState, sampler: Sampler, stop_ids: jax.Array,
                 pad_id: jax.Array, plan: _Plan) -> SamplingState:
    """Feeds each row's newest token through the model and picks the next one."""
    B = state.tokens.shape[0]
    cache = state.cache
    slot = cache.index
    token = jax.lax.dynamic_slice_in_dim(state.tokens, slot, 1, axis=1)  # [B, 1]
    # Finished rows feed position -1: their slot stays invisible and nothing they do matters.
    position = jnp.where(state.done, -1, state.lengths - 1)[:, None]  # [B, 1]
    use_long = jnp.ones((B,), bool) if plan.always_long else None
    logits, cache = model(token, position, cache, use_long)  # [B, 1, V]
    logits = logits[:, 0]
    if plan.reprefill:
        original_max = model.config.original_max_position_embeddings
        crossing = position[:, 0] == original_max  # the row's length is now original_max + 1
        logits, cache = jax.lax.cond(
            jnp.any(crossing), functools.partial(_reprefill, model, state.tokens),
            lambda crossing, logits, cache: (logits, cache), crossing, logits, cache)
    key, sub = jax.random.split(state.key)
    state = dataclasses.replace(state, cache=cache, key=key)
    return _record(state, sampler, stop_ids, pad_id, logits, sub)


def _reprefill(model: Any, tokens: jax.Array, crossing: jax.Array, logits: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Recomputes the cache over all slots (the rows' default factors: long for the rows whose
    length just passed original_max) and takes it, and the newest logits, for those rows.

    The cache has holes (empty slots between a short prompt and the shared output slots), so
    each row is first gathered into position order: a right-padded sequence, which the prompt
    prefill takes, fused causal kernel included. A plain pass over the slots would build
    [S, S] scores per head, which at a long-context bucket cannot fit."""
    B, S = tokens.shape
    positions = cache.positions  # [B, S]: each row's positions 0..len-1 in some slots, else -1
    order = jnp.argsort(jnp.where(positions >= 0, positions, S), axis=1)  # [B, S]
    lengths = jnp.sum(positions >= 0, axis=1, dtype=jnp.int32)  # [B]
    fresh = KVCache.init(model.config, B, S, cache.k[0].dtype)
    x, full = model.hidden_states(jnp.take_along_axis(tokens, order, axis=1),
                                  jnp.take_along_axis(positions, order, axis=1), fresh,
                                  prefill_lengths=lengths)  # [B, S, D], position order
    last = jnp.maximum(lengths - 1, 0)[:, None, None]  # the token just fed: the last position
    new_logits = model.head.attend(jnp.take_along_axis(x, last, axis=1))[:, 0]  # [B, V]
    back = jnp.argsort(order, axis=1)[:, :, None, None]  # position order -> slot order

    def take(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(crossing[:, None, None, None],
                         jnp.take_along_axis(new, back, axis=1), old)

    cache = dataclasses.replace(
        cache, k=tuple(take(new, old) for new, old in zip(full.k, cache.k, strict=True)),
        v=tuple(take(new, old) for new, old in zip(full.v, cache.v, strict=True)))
    return jnp.where(crossing[:, None], new_logits, logits), cache


@functools.partial(jax.jit, static_argnames=("graph", "plan"), donate_argnames=("state",))
def _decode(graph: StaticGraph, params: nnx.State, state: SamplingState, sampler: Sampler,
            stop_ids: jax.Array, pad_id: jax.Array, end_step: jax.Array,
            plan: _Plan) -> SamplingState:
    """Decodes until every row is done or `end_step` tokens have been generated."""
    model = nnx.merge(graph.graphdef, params)
    S = state.tokens.shape[1]
    split = plan.mesh is not None and sharding.heads_split(model.config, plan.mesh)

    def running(state: SamplingState) -> jax.Array:
        return ~jnp.all(state.done) & (state.step < end_step) & (state.cache.index + 1 < S)

    def body(state: SamplingState) -> SamplingState:
        return _decode_step(model, state, sampler, stop_ids, pad_id, plan)

    with attention.heads_split(split):
        return jax.lax.while_loop(running, body, state)


# ---------------------------------------------------------------------------------------------
# Host side


@dataclasses.dataclass
class _Request:
    prompts: list[list[int]]
    budgets: list[int]
    max_new_tokens: int
    sampler: Sampler
    stop_ids: np.ndarray
    pad_id: int
    seed: int
    rope_policy: str


def generate(model: Phi3, prompts: Any, *, max_new_tokens: int | None = None,
             temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, seed: int = 0,
             stop: str | Sequence[str] | None = None,
             stop_token_ids: Sequence[int] | None = None,
             rope_policy: str = "per_sequence",
             stream: Callable[[StreamChunk], None] | None = None,
             compilation_cache: str | os.PathLike | None = None) -> list[Completion]:
    """Generates a continuation for each prompt; returns one Completion per prompt, in order.

    prompts: a string, a token-id list, a chat (list of {"role", "content"} dicts), or a list of
    those. Strings and chats need the model's tokenizer. Sampling settings left as None come
    from the checkpoint's generation_config.json when it sets do_sample (as in transformers),
    else greedy decoding; temperature 0 is greedy. Rows stop on the eos ids of
    generation_config.json and config.json (plus `stop_token_ids`), on any of the `stop`
    strings, after max_new_tokens, or at the model's max_position_embeddings.
    rope_policy: "per_sequence" (transformers' factors, with a re-prefill when a row crosses
    original_max) or "always_long" (vLLM's; no re-prefill). See the module docstring.
    stream: called with each StreamChunk as tokens arrive (one host sync per token).
    """
    request = _prepare(model, prompts, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed,
                              stop_token_ids=stop_token_ids, rope_policy=rope_policy,
                              compilation_cache=compilation_cache)
    stops = _stop_strings(stop, model.tokenizer)
    if stream is None and not stops:
        return _collect_fast(model, request)
    chunk = 1 if stream is not None else STOP_CHECK_EVERY
    ids: list[list[int]] = [[] for _ in request.prompts]
    reasons: list[str] = ["length"] * len(request.prompts)
    for event in _stream(model, request, stops, chunk):
        ids[event.row] += event.token_ids
        if event.finish_reason is not None:
            reasons[event.row] = event.finish_reason
        if stream is not None:
            stream(event)
    return [Completion(row, _final_text(model.tokenizer, row, request.stop_ids, stops), reason)
            for row, reason in zip(ids, reasons, strict=True)]


def warmup(model: Phi3, shapes: Iterable[tuple[int, int]], *, threads: int | None = None,
           **settings: Any) -> int:
    """Builds, ahead of the first request, the programs generate() runs for a batch of `rows`
    prompts of `length` tokens, for each (rows, length) in `shapes`, under the generate()
    `settings` the requests will use (max_new_tokens, sampling, stop_token_ids, rope_policy,
    compilation_cache): each is compiled, or loaded from the persistent compilation cache, and
    run once on dummy prompts (the prefill, and the decode loop for zero steps). A request that
    lands in the same buckets (batch_shapes) with the same settings then compiles nothing; with
    LongRoPE, also the same answer to whether a row can cross original_max (a prompt of
    `length` tokens and max_new_tokens decides it here). Returns the number of distinct
    program pairs built.

    The pairs are built in `threads` worker threads (default: one per pair, up to the CPU
    count). XLA compiles without holding Python's lock, so compiles overlap: on a 2-core CPU a
    32-layer model's 10 programs took 59 s of compile in 36 s of wall time (48.8 -> 42.2 s for
    the whole cold start, benchmarks/RESULTS.md); more cores overlap more.
    """
    shapes = list(shapes)
    if not shapes:
        raise ValueError("warmup needs at least one (rows, length) shape")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    # generate()'s own settings that build no program of their own, so the same keyword
    # arguments serve both calls.
    settings = {k: v for k, v in settings.items() if k not in ("stop", "stream")}
    requests = {}
    for shape in shapes:
        pair = tuple(shape) if isinstance(shape, Sequence) else ()
        if len(pair) != 2 or any(isinstance(x, bool) or not isinstance(x, int | np.integer)
                                 or x < 1 for x in pair):
            raise ValueError(f"a warmup shape is (rows, prompt length), two positive integers; "
                             f"got {shape!r}")
        rows, length = pair
        request = _prepare(model, [[0] * int(length)] * int(rows), **settings)
        requests.setdefault(_shapes_and_plan(model, request), request)

    def build(request: _Request) -> None:
        state, decode, _, _ = _launch(model, request)
        jax.block_until_ready(decode(state, 0))

    workers = threads or min(len(requests), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(build, r) for r in requests.values()]:
            future.result()  # re-raises a worker's error
    return len(requests)


def generate_stream(model: Phi3, prompts: Any, *, stop: str | Sequence[str] | None = None,
                    **kwargs: Any) -> Iterator[StreamChunk]:
    """Like `generate`, as an iterator of StreamChunks (one host sync per token)."""
    request = _prepare(model, prompts, **kwargs)
    yield from _stream(model, request, _stop_strings(stop, model.tokenizer), 1)


def _prepare(model: Phi3, prompts: Any, *, max_new_tokens: int | None = None,
             temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, seed: int = 0,
             stop_token_ids: Sequence[int] | None = None, rope_policy: str = "per_sequence",
             compilation_cache: str | os.PathLike | None = None) -> _Request:
    if compilation_cache is not None:
        enable_compilation_cache(compilation_cache)
    if rope_policy not in ROPE_POLICIES:
        raise ValueError(f"rope_policy must be one of {ROPE_POLICIES}, got {rope_policy!r}")
    gen = model.generation_config
    if max_new_tokens is None:
        max_new_tokens = int(gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    sampler = _sampler_from(gen, temperature, top_k, top_p, min_p, repetition_penalty)
    ids = [_encode(model, p, i) for i, p in enumerate(_as_prompt_list(prompts))]
    config = model.config
    budgets = []
    for i, row in enumerate(ids):
        check_prompt_fits(config, row, f"prompt {i}")
        budgets.append(min(max_new_tokens, config.max_position_embeddings - len(row)))
    eos = set(_as_ids(gen.get("eos_token_id"))) | set(config.eos_token_id)
    eos |= set(stop_token_ids or ())
    pad = gen.get("pad_token_id", config.pad_token_id)
    if pad is None:
        pad = min(eos) if eos else 0
    # Padded to a multiple of 8 with -1 (never sampled), so a few more ids do not recompile.
    stop_ids = np.full(max(8, -(-len(eos) // 8) * 8), -1, np.int32)
    stop_ids[:len(eos)] = sorted(eos)
    return _Request(ids, budgets, max_new_tokens, sampler, stop_ids, int(pad), int(seed),
                    rope_policy)


def check_prompt_fits(config: Phi3Config, ids: Sequence[int], what: str = "the prompt") -> None:
    """Raises ValueError unless `ids` is a non-empty prompt of valid token ids that leaves room
    for at least one new token in the model's context (max_position_embeddings)."""
    if len(ids) == 0:
        raise ValueError(f"{what} is empty")
    check_token_ids(np.asarray(ids), config.vocab_size)
    if len(ids) >= config.max_position_embeddings:
        raise ValueError(
            f"{what} has {len(ids)} tokens, which leaves no room in the model's context of "
            f"{config.max_position_embeddings} tokens (max_position_embeddings)")


def _sampler_from(gen: Mapping[str, Any], temperature, top_k, top_p, min_p,
                  repetition_penalty) -> Sampler:
    """Arguments first; for those left None, the checkpoint's sampling defaults when its
    generation_config asks for sampling (do_sample), as transformers' generate does."""
    if temperature is None:
        temperature = float(gen.get("temperature") or 1.0) if gen.get("do_sample") else 0.0
    if temperature > 0 and gen.get("do_sample"):
        top_k = gen.get("top_k") if top_k is None else top_k
        top_p = gen.get("top_p") if top_p is None else top_p
        min_p = gen.get("min_p") if min_p is None else min_p
    if repetition_penalty is None:
        repetition_penalty = gen.get("repetition_penalty")
    return make_sampler(temperature, top_k, top_p, min_p, repetition_penalty)


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _is_chat(prompt: Any) -> bool:
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
            and all(isinstance(m, Mapping) for m in prompt))


def _is_ids(prompt: Any) -> bool:
    if isinstance(prompt, np.ndarray | jax.Array):
        return prompt.ndim == 1
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
            and all(isinstance(t, int | np.integer) for t in prompt))


def _as_prompt_list(prompts: Any) -> list[Any]:
    if isinstance(prompts, str) or _is_ids(prompts) or _is_chat(prompts):
        return [prompts]
    if isinstance(prompts, np.ndarray | jax.Array) and prompts.ndim == 2:
        return list(np.asarray(prompts))
    if isinstance(prompts, Sequence) and len(prompts) > 0:
        return list(prompts)
    raise ValueError("prompts must be a string, a token-id list, a chat (list of messages), or a "
                     f"non-empty list of those; got {type(prompts).__name__} {prompts!r:.80}")


def _encode(model: Phi3, prompt: Any, index: int) -> list[int]:
    if _is_ids(prompt):
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {index}: token ids must be integers, got {ids.dtype}")
        return ids.astype(np.int64).tolist()
    if not (isinstance(prompt, str) or _is_chat(prompt)):
        raise ValueError(f"prompt {index} must be a string, a non-empty token-id list or a chat "
                         f"(list of messages); got {type(prompt).__name__} {prompt!r:.80}")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(f"the model at {model.path} has no tokenizer (tokenizer.model or "
                         f"tokenizer.json), so text prompts cannot be encoded; pass token ids")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else tokenizer.encode_chat(prompt)
    if not ids:
        raise ValueError(f"prompt {index} is empty")
    return ids


def _stop_strings(stop: str | Sequence[str] | None, tokenizer: Any) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
    if stops and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the output; the model has none")
    return stops


def batch_shapes(rows: int, prompt_len: int, budget: int,
                 mesh: jax.sharding.Mesh | None = None) -> tuple[int, int, int]:
    """(B, Tp, S): the compiled batch, prompt and cache lengths for `rows` prompts of at most
    `prompt_len` tokens and at most `budget` new tokens each.

    B is a power of two (a multiple of the data axis on a mesh). Tp and S are quarter-octave
    buckets: at most 25% padding for 4 compiled shapes per octave. Prefill compute grows with
    Tp and decode reads all S slots every step (on the H100 the empty half of a power-of-two
    cache cost 46% more time per step at batch 16), and a power-of-two Tp would turn a
    100k-token prompt into 131,072 tokens and a 163,840-slot cache (64 GB at Phi-3-mini's
    384 KiB per token, more than an 80 GB GPU holds beside the weights); here 114,688 and
    131,072.
    """
    B = 1 << (rows - 1).bit_length()
    if mesh is not None:  # the batch must split evenly over the data axis
        data = sharding.axis_size(mesh, sharding.RULES["batch"])
        B = -(-B // data) * data
    Tp = bucket_length(prompt_len, per_octave=BUCKETS_PER_OCTAVE)
    S = bucket_length(Tp + budget, per_octave=BUCKETS_PER_OCTAVE)
    return B, Tp, S


def _shapes_and_plan(model: Phi3, request: _Request) -> tuple[int, int, _Plan]:
    """(B, Tp, plan): what the request compiles (S is plan.cache_len), with equal values for
    equal programs."""
    rs = model.config.rope_scaling
    B, Tp, S = batch_shapes(len(request.prompts), max(len(p) for p in request.prompts),
                            max(request.budgets), model.mesh)
    always_long = request.rope_policy == "always_long" and rs is not None
    # Only a row that starts at or below original_max and may grow past it can cross. Without
    # one, the decode loop has no re-prefill branch: none to compile, and no lax.cond per step.
    # At most two compiled decode variants per bucket.
    reprefill = not always_long and rs is not None and any(
        len(row) <= rs.original_max_position_embeddings < len(row) + budget
        for row, budget in zip(request.prompts, request.budgets, strict=True))
    return B, Tp, _Plan(cache_len=S, always_long=always_long, reprefill=reprefill,
                           mesh=model.mesh)


def _launch(model: Phi3, request: _Request) -> tuple[SamplingState, Callable, int, int]:
    """Pads and buckets the batch, runs the prefill; returns the state, a `decode(state,
    end_step)` closure, the bucketed prompt length Tp and the real batch size."""
    mesh = model.mesh
    n = len(request.prompts)
    B, Tp, plan = _shapes_and_plan(model, request)
    tokens = np.zeros((B, Tp), np.int32)
    positions = np.full((B, Tp), -1, np.int32)
    limits = np.zeros((B,), np.int32)
    for i, (row, budget) in enumerate(zip(request.prompts, request.budgets, strict=True)):
        tokens[i, :len(row)] = row
        positions[i, :len(row)] = np.arange(len(row))
        limits[i] = len(row) + budget
    stop_ids = jax.device_put(request.stop_ids)
    # Host scalars go in as numpy values: jnp.asarray would compile a conversion program.
    pad_id = np.int32(request.pad_id)
    tokens, positions, limits = (sharding.put_batch(a, mesh) for a in (tokens, positions, limits))
    state = _prefill(model.graph, model.params, tokens, positions, limits, request.sampler,
                     stop_ids, pad_id, np.uint32(request.seed % 2**32), plan=plan)

    def decode(state: SamplingState, end_step: int) -> SamplingState:
        return _decode(model.graph, model.params, state, request.sampler, stop_ids, pad_id,
                       np.int32(end_step), plan=plan)

    return state, decode, Tp, n


def _collect_fast(model: Phi3, request: _Request) -> list[Completion]:
    state, decode, Tp, _ = _launch(model, request)
    state = decode(state, request.max_new_tokens)
    tokens, lengths = sharding.to_host(state.tokens), sharding.to_host(state.lengths)
    out = []
    for i, prompt in enumerate(request.prompts):
        ids = tokens[i, Tp:Tp + lengths[i] - len(prompt)].tolist()
        reason = "stop" if ids and ids[-1] in request.stop_ids else "length"
        out.append(Completion(ids, _final_text(model.tokenizer, ids, request.stop_ids, ()),
                              reason))
    return out


def _final_text(tokenizer: Any, ids: list[int], stop_ids: np.ndarray,
                stops: tuple[str, ...]) -> str | None:
    """The completion's text: its ids decoded at once (less a final eos), cut before the first
    stop string. Streamed deltas join to the same text except where an invalid byte sequence
    (a byte-fallback run that is not UTF-8) turns earlier, already shown bytes into U+FFFD."""
    if tokenizer is None:
        return None
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text


class _RowText:
    """Host-side text of one row: streamed decoding, stop-string search, held-back tail."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stops = stops
        self.text = ""
        self.emitted = 0
        # A suffix this long may be the start of a stop string: held back until it is not.
        self.hold = max((len(s) for s in stops), default=1) - 1

    def put(self, token: int) -> bool:
        """Adds a token's text; True when the text now contains a stop string (and is cut)."""
        self.text += self.decoder.put(token)
        return self._cut()

    def finish(self) -> None:
        self.text += self.decoder.flush()
        self._cut()
        self.hold = 0

    def _cut(self) -> bool:
        found = [i for i in (self.text.find(s, max(0, self.emitted - len(s)))
                             for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.hold = 0
        return bool(found)

    def take(self) -> str:
        end = max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


def _stream(model: Phi3, request: _Request, stops: tuple[str, ...],
            chunk: int) -> Iterator[StreamChunk]:
    """Runs the generation in chunks of `chunk` tokens, yielding each row's new output."""
    state, decode, Tp, n = _launch(model, request)
    tokenizer = model.tokenizer
    stop_ids = set(request.stop_ids.tolist())
    texts = [_RowText(tokenizer, stops) if tokenizer is not None else None for _ in range(n)]
    taken = [0] * n  # generated tokens already handled per row
    finished = [False] * n
    while True:
        tokens, lengths = sharding.to_host(state.tokens), sharding.to_host(state.lengths)
        done = sharding.to_host(state.done).copy()
        for i in range(n):
            if finished[i]:
                continue
            new = tokens[i, Tp + taken[i]:Tp + lengths[i] - len(request.prompts[i])].tolist()
            ids, reason = [], None
            for token in new:
                ids.append(token)
                if token in stop_ids:
                    reason = "stop"
                    break
                if texts[i] is not None and texts[i].put(token):
                    reason = "stop"
                    break
            taken[i] += len(ids)
            if reason is None and done[i]:
                reason = "length"
            if reason is not None:
                finished[i] = done[i] = True
                if texts[i] is not None:
                    texts[i].finish()
            text = texts[i].take() if texts[i] is not None else None
            if ids or reason is not None:
                yield StreamChunk(i, ids, text, reason)
        if all(finished):
            return
        # Rows ended by a stop string are marked done on the device too.
        state = dataclasses.replace(state, done=sharding.put_batch(done, model.mesh))
        state = decode(state, int(sharding.to_host(state.step)) + chunk)
