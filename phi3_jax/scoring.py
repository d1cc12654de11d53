"""Scoring text: continuation logprobs, rolling loglikelihoods and perplexity, batched.

Tokenization follows lm-evaluation-harness's Hugging Face backend, so scores are comparable
with published ones:
- a (context, continuation) pair is tokenized as one string and split after the context's
  tokens, so SentencePiece's word-initial "▁" lands where the whole string puts it; trailing
  spaces of the context move to the continuation first;
- an empty context is the prefix token (BOS, else EOS);
- no BOS is added otherwise (Phi checkpoints say add_bos_token: false);
- a row longer than the window keeps its last `window + 1` tokens;
- rolling loglikelihoods score disjoint windows, each conditioned on the tokens before it
  (lm-eval's get_rolling_token_windows with context_len 1).

The model runs right-padded rows as prompt prefills (phi3_jax.api.Phi3.logits' path: the fused
or blocked attention), and only each target token's logprob and whether it is the argmax leave
the device, never [B, T, V] logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from phi3_jax import sharding
from phi3_jax.compilation import StaticGraph, bucket_length
from phi3_jax.hooks import Hook

if TYPE_CHECKING:
    from phi3_jax.api import Phi3

Tokens = list[int]


@dataclasses.dataclass(frozen=True)
class Score:
    """A continuation's tokens, each one's logprob given everything before it, their sum, and
    whether every token is the model's argmax (greedy decoding would produce it)."""

    tokens: Tokens
    logprobs: list[float]
    total: float
    is_greedy: bool


@functools.partial(jax.jit, static_argnames="graph")
def _target_logprobs(graph: StaticGraph, params: nnx.State, tokens: jax.Array,
                     lengths: jax.Array, targets: jax.Array, hooks: dict[str, Hook] | None,
                     ) -> tuple[jax.Array, jax.Array]:
    """For right-padded rows tokens [B, T] (row b's first lengths[b] slots) and the token
    expected after each, targets [B, T]: (log p(target) [B, T] fp32, target is the argmax
    [B, T] bool)."""
    model = nnx.merge(graph.graphdef, params)
    T = tokens.shape[1]
    slots = jnp.arange(T)[None, :]
    positions = jnp.where(slots < lengths[:, None], slots, -1)
    x, _ = model.hidden_states(tokens, positions, prefill_lengths=lengths, hooks=hooks)
    # fp32 island, as lm-eval's log_softmax over the model's logits.
    logits = model.head.attend(x).astype(jnp.float32)  # [B, T, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[:, :, 0]
    return chosen, jnp.argmax(logits, axis=-1) == targets


def prefix_token(model: Phi3) -> int:
    """What an empty context stands for: BOS, else EOS (lm-eval's prefix_token_id)."""
    tok = _tokenizer(model)
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if prefix is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an "
                         "empty context")
    return prefix


def encode_pair(model: Phi3, context: str, continuation: str) -> tuple[Tokens, Tokens]:
    """(context ids, continuation ids), split from the whole string's tokens (module doc)."""
    tok = _tokenizer(model)
    if context == "":
        return [prefix_token(model)], tok.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tok.encode(context + continuation)
    n = len(tok.encode(context))
    return whole[:n], whole[n:]


def score(model: Phi3, contexts: Sequence[str] | str, continuations: Sequence[str] | str, *,
          batch_size: int = 16, progress: bool = False,
          hooks: dict[str, Hook] | None = None) -> list[Score]:
    """The Score of each continuation after its context (strings, tokenized as lm-eval does)."""
    if isinstance(contexts, str):
        contexts = [contexts]
    if isinstance(continuations, str):
        continuations = [continuations]
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    pairs = [encode_pair(model, c, k) for c, k in zip(contexts, continuations, strict=True)]
    return score_tokens(model, pairs, batch_size=batch_size, progress=progress, hooks=hooks)


def score_tokens(model: Phi3, pairs: Sequence[tuple[Tokens, Tokens]], *,
                 window: int | None = None, batch_size: int = 16, progress: bool = False,
                 hooks: dict[str, Hook] | None = None) -> list[Score]:
    """The Score of each (context ids, continuation ids) pair; rows longer than `window`
    (default: the model's context) + 1 keep their last window + 1 tokens. Longest rows go
    first, so a batch's rows have similar lengths (and an out-of-memory shows at once)."""
    window = window or model.config.max_position_embeddings
    rows = []
    for i, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ValueError(f"pair {i}: the continuation has no tokens")
        if not context:
            raise ValueError(f"pair {i}: the context has no tokens (use the prefix token)")
        if len(continuation) > window:
            raise ValueError(f"pair {i}: a continuation of {len(continuation)} tokens does not "
                             f"fit the window of {window}")
        whole = (list(context) + list(continuation))[-(window + 1):]
        rows.append((whole[:-1], whole[1:], len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[Score | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc="scoring", disable=not progress)
    for batch in _batches(order, batch_size):
        lp, greedy = _run(model, [rows[i] for i in batch], hooks)
        for j, i in enumerate(batch):
            inputs, targets, n = rows[i]
            start = len(inputs) - n
            tokens = targets[start:]
            lps = [float(x) for x in lp[j, start:len(inputs)]]
            out[i] = Score(tokens, lps, math.fsum(lps), bool(np.all(greedy[j, start:len(inputs)])))
        bar.update(len(batch))
    bar.close()
    return out


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), size):
        yield order[i:i + size]


def _run(model: Phi3, rows: list[tuple[Tokens, Tokens, int]],
         hooks: dict[str, Hook] | None) -> tuple[np.ndarray, np.ndarray]:
    B = len(rows)
    if model.mesh is not None:  # empty rows fill the batch to a multiple of the data axis
        data = sharding.axis_size(model.mesh, sharding.RULES["batch"])
        B = -(-B // data) * data
    T = bucket_length(max(len(r[0]) for r in rows))
    tokens = np.zeros((B, T), np.int32)
    targets = np.zeros((B, T), np.int32)
    lengths = np.zeros((B,), np.int32)
    for b, (inputs, expected, _) in enumerate(rows):
        tokens[b, :len(inputs)] = inputs
        targets[b, :len(inputs)] = expected
        lengths[b] = len(inputs)
    arrays = [sharding.put_batch(a, model.mesh) for a in (tokens, lengths, targets)]
    lp, greedy = _target_logprobs(model.graph, model.params, *arrays, hooks)
    return sharding.to_host(lp), sharding.to_host(greedy)


def rolling_windows(tokens: Tokens, prefix: int, window: int) -> list[tuple[Tokens, Tokens]]:
    """Disjoint (context, continuation) windows covering every token of `tokens` once: the first
    conditioned on the prefix token, each later one on up to window - len(continuation) tokens
    before it (lm-eval's get_rolling_token_windows + make_disjoint_window, context_len 1)."""
    out = []
    first = min(window, len(tokens))
    if tokens:
        out.append(([prefix], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, window)
        end = done + n
        context = tokens[max(0, end - window - 1):end - 1]
        out.append((context[:len(context) - (n - 1)], tokens[done:end]))
        done = end
    return out


def loglikelihood_rolling(model: Phi3, texts: Sequence[str] | str, *,
                          window: int | None = None, batch_size: int = 16,
                          progress: bool = False, hooks: dict[str, Hook] | None = None,
                          ) -> list[float]:
    """Each text's total logprob (every token, the first conditioned on the prefix token),
    scored in disjoint windows of at most `window` tokens (default: the model's context)."""
    totals, _ = _rolling(model, texts, window, batch_size, progress, hooks)
    return totals


def perplexity(model: Phi3, texts: Sequence[str] | str, *, window: int | None = None,
               batch_size: int = 16, progress: bool = False,
               hooks: dict[str, Hook] | None = None) -> float:
    """exp(-(sum of the texts' token logprobs) / (their token count))."""
    totals, counts = _rolling(model, texts, window, batch_size, progress, hooks)
    if sum(counts) == 0:
        raise ValueError("perplexity of no tokens")
    return math.exp(-math.fsum(totals) / sum(counts))


def _rolling(model, texts, window, batch_size, progress, hooks):
    if isinstance(texts, str):
        texts = [texts]
    window = window or model.config.max_position_embeddings
    tok, prefix = _tokenizer(model), prefix_token(model)
    per_text = [rolling_windows(tok.encode(t), prefix, window) for t in texts]
    flat = [pair for windows in per_text for pair in windows]
    scores = score_tokens(model, flat, window=window, batch_size=batch_size,
                          progress=progress, hooks=hooks)
    totals, counts, i = [], [], 0
    for windows in per_text:
        got = scores[i:i + len(windows)]
        i += len(windows)
        totals.append(math.fsum(s.total for s in got))
        counts.append(sum(len(s.tokens) for s in got))
    return totals, counts


def _tokenizer(model: Phi3):
    if model.tokenizer is None:
        raise ValueError("scoring text needs the model's tokenizer; this checkpoint has none "
                         "(score token ids with phi3_jax.scoring.score_tokens)")
    return model.tokenizer
