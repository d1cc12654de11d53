"""The host's view of the cache rows: which request holds each slot, where it stands, and the
per-row arrays a decode call takes.

A slot's sequence is its prompt followed by the tokens drawn so far. All of it but the newest
token is in the cache (slot p of the row holds position p); the newest is fed by the next
decode step. A slot is in one of three phases: "prefill" (its prompt is going in, chunk by
chunk), "decode", or "reprefill" (LongRoPE: the sequence grew past original_max and goes in
again with the long factors, also chunk by chunk).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from phi3_jax.engine.request import Request
from phi3_jax.engine.scheduler import Chunk
from phi3_jax.engine.streaming import TextStream

MAX_STOP_IDS = 16  # stop ids per request (eos ids plus stop_token_ids) the device checks
NEVER = np.iinfo(np.int32).max  # a halt_at no position reaches


@dataclasses.dataclass
class Slot:
    """One live request in its cache row."""

    request: Request
    index: int  # the cache row
    sequence: list[int]  # prompt + drawn tokens
    prompt_len: int
    budget: int  # tokens the request may draw in all (max_new_tokens within the context)
    use_long: bool  # LongRoPE long factors for this sequence
    halt_at: int  # decoding stops before feeding this position (a crossing), else NEVER
    seeds: np.ndarray  # [2] uint32
    text: TextStream | None
    phase: str = "prefill"
    chunks: list[Chunk] = dataclasses.field(default_factory=list)  # what is left to prefill
    prompt_logprobs: list[Any] = dataclasses.field(default_factory=list)

    @property
    def drawn(self) -> int:
        return len(self.sequence) - self.prompt_len

    @property
    def position(self) -> int:
        """The position of the newest token, which the next decode step feeds."""
        return len(self.sequence) - 1


class SlotTable:
    """The engine's cache rows and the requests in them."""

    def __init__(self, rows: int):
        self.rows = rows
        self.slots: list[Slot | None] = [None] * rows

    def free(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def live(self, phase: str | None = None) -> list[Slot]:
        """The occupied slots (in the given phase), oldest request first."""
        out = [s for s in self.slots if s is not None and (phase is None or s.phase == phase)]
        return sorted(out, key=lambda s: s.request.serial)

    def put(self, slot: Slot) -> None:
        assert self.slots[slot.index] is None
        self.slots[slot.index] = slot

    def release(self, slot: Slot) -> None:
        self.slots[slot.index] = None

    def decode_batch(self, size: int) -> list[int]:
        """The cache rows of a decode call of `size` batch rows: every decoding row (oldest
        request first), then distinct idle rows to fill the batch (they run nothing)."""
        decoding = [s.index for s in self.live("decode")]
        assert len(decoding) <= size <= self.rows
        if size == self.rows:
            return list(range(self.rows))  # batch row b is cache row b
        busy = set(decoding)
        idle = [i for i in range(self.rows) if i not in busy]
        return decoding + idle[:size - len(decoding)]

    def decode_arrays(self, settings_of, rows: list[int] | None = None) -> dict[str, np.ndarray]:
        """The host arrays of a decode call's inputs over cache rows `rows` (default: all, in
        order); batch rows not decoding have running False."""
        rows = list(range(self.rows)) if rows is None else rows
        B = len(rows)
        a = dict(rows=np.asarray(rows, np.int32), tokens=np.zeros(B, np.int32),
                 positions=np.zeros(B, np.int32),
                 running=np.zeros(B, bool), use_long=np.zeros(B, bool),
                 halt_at=np.full(B, NEVER, np.int32), remaining=np.zeros(B, np.int32),
                 stop_ids=np.full((B, MAX_STOP_IDS), -1, np.int32),
                 seeds=np.zeros((B, 2), np.uint32),
                 temperature=np.zeros(B, np.float32), top_k=np.zeros(B, np.int32),
                 top_p=np.ones(B, np.float32), min_p=np.zeros(B, np.float32),
                 repetition_penalty=np.ones(B, np.float32))
        batch_row = {r: b for b, r in enumerate(rows)}
        for s in self.live("decode"):
            i = batch_row[s.index]
            a["tokens"][i] = s.sequence[-1]
            a["positions"][i] = s.position
            a["running"][i] = True
            a["use_long"][i] = s.use_long
            a["halt_at"][i] = s.halt_at
            a["remaining"][i] = s.budget - s.drawn
            ids = s.request.stop_ids
            a["stop_ids"][i, :len(ids)] = ids
            a["seeds"][i] = s.seeds
            for name, value in settings_of(s).items():
                a[name][i] = value
        return a
