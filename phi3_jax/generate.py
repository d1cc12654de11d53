"""`model.generate`: a list of prompts through the engine, returning their completions.

Each prompt is a request of its own (phi3_jax.engine): prompts of different lengths do not
wait for each other, and a request's output depends on its prompt, settings and seed, not on
its place in the list or on the other prompts (the engine's rows are computed independently;
across engines of different max_slots the numbers agree to rounding).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from phi3_jax.compilation import bucket_length
from phi3_jax.engine import Completion, Engine, GenerationSettings, TokenLogprob
from phi3_jax.engine.request import as_prompt_list, check_prompt_fits, encode_prompt

if TYPE_CHECKING:
    from phi3_jax.api import Phi3
    from phi3_jax.hooks import Hook

MAX_SLOTS = 16  # the engine generate() builds: at most this many rows decode together
DECODE_STEPS = 32  # decode steps per device call when nothing waits


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """New output of prompt `row` (its index in the list): token ids, the text they complete
    (None without a tokenizer), their logprobs when asked for; finish_reason on the last."""

    row: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


def generate(model: Phi3, prompts: Any, settings: GenerationSettings | None = None, *,
             stream: Callable[[StreamChunk], None] | None = None,
             max_slots: int | None = None,
             compilation_cache: str | os.PathLike | None = None,
             hooks: dict[str, Hook] | None = None,
             **kwargs: Any) -> list[Completion]:
    """Generates a continuation for each prompt; returns one Completion per prompt, in order.

    prompts: a string, a token-id list, a chat (list of {"role", "content"} dicts), or a list of
    those. Strings and chats need the model's tokenizer. Settings (a GenerationSettings, and/or
    its fields as keywords: max_new_tokens, temperature, top_k, top_p, min_p,
    repetition_penalty, seed, stop, stop_token_ids, ignore_eos, logprobs, prompt_logprobs,
    rope_policy) apply to every prompt; unset sampling fields come from the checkpoint's
    generation_config.json when it sets do_sample, else decoding is greedy. seed None draws a
    fresh seed per prompt.
    stream: called with each StreamChunk as tokens arrive.
    max_slots: rows decoding together (default: the number of prompts, at most MAX_SLOTS).
    hooks: phi3_jax.hooks at named points ({"layers.3.resid_post": add(v)}), applied at every
    prompt and generated token; new hook values compile nothing.
    """
    settings = GenerationSettings.from_kwargs(settings, **kwargs)
    resolved = settings.resolve(model.generation_config)
    ids = []
    for i, prompt in enumerate(as_prompt_list(prompts)):
        row = encode_prompt(model.tokenizer, prompt, f"prompt {i}")
        check_prompt_fits(model.config, row, f"prompt {i}")
        ids.append(row)
    context = model.config.max_position_embeddings
    longest = max(len(row) for row in ids) + resolved.max_new_tokens
    # A power of two: the cache's length is in every program's shapes, so calls of similar
    # lengths share their programs (at most twice the slots a call needs).
    max_len = min(bucket_length(longest), context)
    slots = max_slots or min(1 << (len(ids) - 1).bit_length(), MAX_SLOTS)
    if model.mesh is not None:  # the rows split over the data axis
        from phi3_jax import sharding

        data = sharding.axis_size(model.mesh, sharding.RULES["batch"])
        slots = -(-slots // data) * data
    # Every program computes max_logprobs alternatives per token (a top-k over the vocabulary
    # at each decode step): only as many as these requests ask for.
    top_n = max(settings.logprobs or 0, settings.prompt_logprobs or 0)
    # bucket_rows off: a row bucket would be one more program to build in a one-off call.
    engine = Engine(model, max_slots=slots, max_len=max_len, bucket_rows=False,
                    decode_steps=DECODE_STEPS if stream is None else 1, max_logprobs=top_n,
                    compilation_cache=compilation_cache, hooks=hooks)
    requests = [engine.submit(row, settings) for row in ids]
    index = {r.request_id: i for i, r in enumerate(requests)}
    while engine.has_work():
        for output in engine.step():
            if stream is not None:
                stream(StreamChunk(index[output.request_id], output.token_ids, output.text,
                                   output.finish_reason, output.logprobs))
    failed = [r for r in requests if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"generation failed: {failed[0].error}")
    return [r.completion() for r in requests]
