"""Fine-tuning data: JSONL records -> token ids + labels -> fixed-shape batches.

One record per line, one of:
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a chat, rendered with the tokenizer's
  chat template; only the assistant turns (their text, end token and, for the last turn, the
  closing eos the template writes) are targets.
- `{"text": "..."}`: plain text plus the tokenizer's eos; every token is a target.
- `{"input_ids": [...]}`, optionally with `"labels": [...]` (-100 = not a target, transformers'
  convention, unshifted) or `"loss_mask": [0/1, ...]`.

Batches are [A, B, T] (A micro-batches of B rows, right-padded to T = --seq-len, padding at
position -1), so every step has one shape and compiles once. The order is a seeded permutation
per epoch, a pure function of (seed, examples consumed): the iterator's whole state is one
integer, saved in checkpoints, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from phi3_jax import jsonl
from phi3_jax.train.loss import IGNORE

OVERFLOW_POLICIES = ("truncate", "error")


class DataError(ValueError):
    """A training file or record that cannot be used; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # [n] int32
    labels: np.ndarray  # [n] int32, IGNORE where not a target
    line: int  # 1-based line in the JSONL file

    @property
    def num_targets(self) -> int:
        # labels[0] is never predicted (no token precedes it).
        return int(np.sum(self.labels[1:] != IGNORE))


@dataclasses.dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    truncated: int  # how many examples were cut to seq_len
    longest: int  # the longest example's length before truncation

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line; a bad line raises DataError."""
    return jsonl.read_jsonl(path, what="training data", error=DataError)


def encode_record(record: Mapping[str, Any], tokenizer: Any, vocab_size: int) -> Example:
    """Token ids and labels of one record (see the module docstring); raises ValueError."""
    if "messages" in record:
        ids, labels = _encode_chat(record["messages"], _need(tokenizer, "messages"))
    elif "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f"'text' must be a string, got {type(text).__name__}")
        tok = _need(tokenizer, "text")
        ids = tok.encode(text) + ([tok.eos_id] if tok.eos_id is not None else [])
        labels = list(ids)
    elif "input_ids" in record:
        ids = _int_list(record["input_ids"], "input_ids")
        if "labels" in record:
            labels = _int_list(record["labels"], "labels")
            _same_length(labels, ids, "labels")
            bad = [x for x in labels if x != IGNORE and not 0 <= x < vocab_size]
            if bad:
                raise ValueError(f"labels {bad[:5]} are neither {IGNORE} nor in the vocabulary "
                                 f"[0, {vocab_size})")
        elif "loss_mask" in record:
            mask = _int_list(record["loss_mask"], "loss_mask")
            _same_length(mask, ids, "loss_mask")
            if any(m not in (0, 1) for m in mask):
                raise ValueError("'loss_mask' must hold only 0 and 1")
            labels = [i if m else IGNORE for i, m in zip(ids, mask, strict=True)]
        else:
            labels = list(ids)
    else:
        raise ValueError(f"a record needs 'messages', 'text' or 'input_ids'; this one has "
                         f"{sorted(record) or 'no keys'}")
    if not ids:
        raise ValueError("the record encodes to no tokens")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return Example(np.asarray(ids, np.int32), np.asarray(labels, np.int32), line=0)


def load_dataset(path: str | os.PathLike, tokenizer: Any, vocab_size: int, seq_len: int,
                 overflow: str = "truncate") -> Dataset:
    """Every record of a JSONL file, encoded; records longer than seq_len are truncated or
    rejected (`overflow`). Raises DataError naming the file and line."""
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    path = os.fspath(path)
    examples, truncated, longest = [], 0, 0
    for number, record in read_jsonl(path):
        try:
            example = encode_record(record, tokenizer, vocab_size)
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path} line {number}: {e}") from e
        n = len(example.input_ids)
        longest = max(longest, n)
        if n > seq_len:
            if overflow == "error":
                raise DataError(f"{path} line {number}: {n} tokens, longer than --seq-len "
                                f"{seq_len} (raise --seq-len, or pass --overflow truncate)")
            truncated += 1
            example = Example(example.input_ids[:seq_len], example.labels[:seq_len], number)
        examples.append(dataclasses.replace(example, line=number))
    if not examples:
        raise DataError(f"{path} has no records (the file is empty or only blank lines)")
    if not any(e.num_targets for e in examples):
        raise DataError(f"{path}: no record has a target token (every label is masked"
                        f"{', after truncation to --seq-len' if truncated else ''})")
    return Dataset(examples, truncated, longest)


class Batches:
    """An endless, resumable stream of [A, B, T] batches over a dataset.

    `position` (examples consumed) is the whole state: epoch e visits the examples in the order
    permutation(seed, e), so batch k is the same whatever happened before it.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, *,
                 grad_accum: int = 1, seed: int = 0, position: int = 0):
        if batch_size < 1 or grad_accum < 1 or batch_size % grad_accum:
            raise ValueError(f"--batch-size ({batch_size}) must be a positive multiple of "
                             f"--grad-accum ({grad_accum})")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seq_len = seq_len
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._order = np.arange(0)

    def _example(self, k: int) -> Example:
        epoch, i = divmod(k, len(self.examples))
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._epoch = rng.permutation(len(self.examples)), epoch
        return self.examples[self._order[i]]

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        A, B, T = self.grad_accum, self.batch_size // self.grad_accum, self.seq_len
        ids = np.zeros((A * B, T), np.int32)
        labels = np.full((A * B, T), IGNORE, np.int32)
        positions = np.full((A * B, T), -1, np.int32)
        for row in range(A * B):
            example = self._example(self.position + row)
            n = len(example.input_ids)
            ids[row, :n] = example.input_ids
            labels[row, :n] = example.labels
            positions[row, :n] = np.arange(n)
        self.position += A * B
        return {"input_ids": ids.reshape(A, B, T), "labels": labels.reshape(A, B, T),
                "positions": positions.reshape(A, B, T)}


# ---- record encoders ----

def _need(tokenizer: Any, kind: str) -> Any:
    if tokenizer is None:
        raise ValueError(f"'{kind}' records need a tokenizer, and the model folder has none "
                         f"(use pre-tokenized 'input_ids' records, or add tokenizer files)")
    return tokenizer


def _int_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ValueError(f"'{name}' must be a list of integers")
    return value


def _same_length(values: list, ids: list, name: str) -> None:
    if len(values) != len(ids):
        raise ValueError(f"'{name}' has {len(values)} entries but 'input_ids' has {len(ids)}")


def _encode_chat(messages: Any, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Ids of the whole conversation; labels keep the assistant turns only.

    An assistant turn starts where the conversation before it, rendered with the generation
    prompt, ends, and ends where the conversation up to it, rendered without one, stops
    agreeing with the whole. Both are found on token ids: the chat tokens (<|assistant|>,
    <|end|>) are added tokens, which split the text before the subword model runs, so a prefix
    ending at one tokenizes to a prefix of the whole.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    full = tokenizer.encode_chat(messages, add_generation_prompt=False)
    labels = [IGNORE] * len(full)
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") != "assistant":
            continue
        if i == 0:
            raise ValueError("messages[0] is an assistant turn; a conversation starts with a "
                             "system or user message")
        start = len(prompt := tokenizer.encode_chat(messages[:i], add_generation_prompt=True))
        if full[:start] != prompt:
            raise ValueError(f"the chat template does not render messages[:{i}] + generation "
                             f"prompt as a prefix of the conversation; cannot locate turn {i}")
        upto = tokenizer.encode_chat(messages[: i + 1], add_generation_prompt=False)
        end = start
        while end < min(len(upto), len(full)) and upto[end] == full[end]:
            end += 1
        labels[start:end] = full[start:end]
    return full, labels
