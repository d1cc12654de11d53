"""Requests and what they return: prompts as token ids, per-token logprobs, stream outputs,
the final completion, and the handle a caller holds while a request runs."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from phi3_jax.config import Phi3Config
from phi3_jax.engine.settings import GenerationSettings


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token, its logprob under the model's raw distribution (the log-softmax of the logits,
    before temperature or any filter), and the `top` most likely tokens there as (id, logprob)
    pairs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """New output of one request, as it arrives: the new token ids, the text they complete
    (None without a tokenizer; a stop string and what follows are never shown), their logprobs
    when asked for, and finish_reason on the last output ("stop": an eos or stop token or a stop
    string; "length": max_new_tokens or the end of the context; "cancelled"; "error").
    The first output carries the prompt's logprobs when asked for."""

    request_id: str
    token_ids: list[int]
    text: str | None
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    """One request's result. token_ids include a final eos token when the request stopped on
    one; text (None without a tokenizer) leaves it out, and ends before a stop string that ended
    the request. logprobs: one per token id, when asked for. prompt_logprobs: one per prompt
    token (None for the first, which has no context), when asked for."""

    token_ids: list[int]
    text: str | None
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    request_id: str = ""


class Request:
    """A submitted request: its prompt ids, resolved settings, and its outputs so far.

    Iterating over it blocks until each RequestOutput arrives (when the engine runs in its
    thread); `result()` waits for the whole Completion. `on_output`, if given to submit, is
    called from the engine's thread with every output instead of queueing it.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], settings: GenerationSettings,
                 stop_ids: tuple[int, ...], serial: int = 0, with_text: bool = True,
                 on_output: Callable[[RequestOutput], None] | None = None):
        self.request_id = request_id
        self.serial = serial  # submission order
        self.with_text = with_text  # the model has a tokenizer
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.stop_ids = stop_ids  # eos ids (unless ignore_eos) and stop_token_ids
        self._on_output = on_output
        self._queue: queue.Queue[RequestOutput] = queue.Queue()
        self._done = threading.Event()
        self.token_ids: list[int] = []
        self.text: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if settings.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.final_text: str | None = None  # the whole output decoded at once, at the end

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def _deliver(self, output: RequestOutput) -> None:
        """Records an output (engine side) and hands it to the caller."""
        self.token_ids += output.token_ids
        if output.text is not None:
            self.text = (self.text or "") + output.text
        if output.logprobs is not None and self.logprobs is not None:
            self.logprobs += output.logprobs
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason
            self.error = output.error
        if self._on_output is not None:
            self._on_output(output)
        else:
            self._queue.put(output)
        if output.finish_reason is not None:
            self._done.set()

    def __iter__(self) -> Iterator[RequestOutput]:
        """The outputs as they arrive, until the last one (needs the engine running in its
        thread, or another thread stepping it)."""
        while True:
            output = self._queue.get()
            yield output
            if output.finish_reason is not None:
                return

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Completion:
        """The Completion, once the request has finished (waits up to `timeout` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} has not finished")
        if self.finish_reason == "error":
            raise RuntimeError(f"request {self.request_id} failed: {self.error}")
        return self.completion()

    def completion(self) -> Completion:
        """The result so far; once finished, its text is the output decoded at once (which the
        streamed deltas join to)."""
        text = self.final_text if self.final_text is not None else self.text
        if text is None and self.with_text:
            text = ""
        return Completion(list(self.token_ids), text, self.finish_reason or "",
                          self.logprobs, self.prompt_logprobs, list(self.prompt_ids),
                          self.request_id)


# ---- prompts --------------------------------------------------------------------------------

def check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"token ids {sorted(set(bad.tolist()))[:8]} are outside the vocabulary "
                         f"[0, {vocab_size})")


def check_prompt_fits(config: Phi3Config, ids: Sequence[int], what: str = "the prompt",
                      max_len: int | None = None) -> None:
    """Raises ValueError unless `ids` is a non-empty prompt of valid token ids that leaves room
    for at least one new token in the context: the model's max_position_embeddings, or an
    engine's smaller max_len."""
    if len(ids) == 0:
        raise ValueError(f"{what} is empty")
    check_token_ids(np.asarray(ids), config.vocab_size)
    limit, name = config.max_position_embeddings, "the model's context (max_position_embeddings)"
    if max_len is not None and max_len < limit:
        limit, name = max_len, "the engine's context (max_len)"
    if len(ids) >= limit:
        raise ValueError(f"{what} has {len(ids)} tokens, which leaves no room in {name} of "
                         f"{limit} tokens")


def is_chat(prompt: Any) -> bool:
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
            and all(isinstance(m, Mapping) for m in prompt))


def is_ids(prompt: Any) -> bool:
    if isinstance(prompt, np.ndarray) or type(prompt).__module__.startswith("jax"):
        return getattr(prompt, "ndim", 0) == 1
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
            and all(isinstance(t, int | np.integer) and not isinstance(t, bool)
                    for t in prompt))


def as_prompt_list(prompts: Any) -> list[Any]:
    """A single prompt (string, token-id list, chat) or a list of them, as a list."""
    if isinstance(prompts, str) or is_ids(prompts) or is_chat(prompts):
        return [prompts]
    if getattr(prompts, "ndim", None) == 2:
        return list(np.asarray(prompts))
    if isinstance(prompts, Sequence) and len(prompts) > 0:
        return list(prompts)
    raise ValueError("prompts must be a string, a token-id list, a chat (list of messages), or a "
                     f"non-empty list of those; got {type(prompts).__name__} {prompts!r:.80}")


def encode_prompt(tokenizer: Any, prompt: Any, what: str = "the prompt") -> list[int]:
    """Token ids of a prompt: ids as given, a string encoded, a chat through the chat template
    (with the generation prompt)."""
    if is_ids(prompt):
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{what}: token ids must be integers, got {ids.dtype}")
        return ids.astype(np.int64).tolist()
    if not (isinstance(prompt, str) or is_chat(prompt)):
        raise ValueError(f"{what} must be a string, a non-empty token-id list or a chat (list "
                         f"of messages); got {type(prompt).__name__} {prompt!r:.80}")
    if tokenizer is None:
        raise ValueError("the model has no tokenizer (tokenizer.model or tokenizer.json), so "
                         "text prompts cannot be encoded; pass token ids")
    ids = (tokenizer.encode(prompt) if isinstance(prompt, str)
           else tokenizer.encode_chat(prompt, add_generation_prompt=True))
    if not ids:
        raise ValueError(f"{what} is empty")
    return ids
