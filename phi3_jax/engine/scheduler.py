"""What runs in each engine iteration, and the fixed set of program shapes it can ask for.

Per iteration: waiting requests take free slots; prompts are prefilled in chunks of at most
`prefill_chunk` tokens, one chunk per iteration while other rows decode (so a decoding row
waits at most one chunk for its next token), several while none does; then one decode call
over the decoding rows (below) runs up to `decode_steps` steps on device (one step while a
prompt is still prefilling or a request waits for a free slot, so that it is not kept waiting).

Shapes. A first chunk's length is bucketed (`buckets_per_octave` per octave, from 16 up to
prefill_chunk); later chunks always have prefill_chunk slots. How much of the cache attention
reads is bucketed the same way, up to max_len. So the programs are fixed by the engine's
construction and `program_shapes` lists them all: warm-up builds exactly these.

Rows. A decode call runs the rows that decode, gathered into the smallest row bucket that holds
them (powers of two from 2, then max_slots), not every row of the cache: on a CPU, a decode
step over 16 rows costs about six times one over a single row, and an idle row costs as much as
a busy one. The smallest bucket is 2, not 1: a one-row matmul is a matrix-vector product, whose
sums XLA rounds differently, and a request's tokens would then depend on how many others
decode beside it (from two rows up, each row's result is the same bit for bit).
"""

from __future__ import annotations

import dataclasses

from phi3_jax.compilation import bucket_length, buckets_up_to

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One prefill call: `count` tokens from `start`, in a program of T slots reading read_len
    cache slots (0: the first chunk)."""

    start: int
    count: int
    T: int
    read_len: int


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The static choices an engine is built with; they decide every program it compiles."""

    max_slots: int
    max_len: int
    prefill_chunk: int
    decode_steps: int
    top_n: int
    buckets_per_octave: int = 2
    bucket_rows: bool = True

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_len", "prefill_chunk", "decode_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        chunk = self.prefill_chunk
        if chunk < MIN_BUCKET or chunk & (chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two >= {MIN_BUCKET}, got {chunk}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {self.max_len}")

    def chunk_lengths(self) -> list[int]:
        """The T a first chunk can have (its prompt leaves room for a token: < max_len)."""
        top = bucket_length(min(self.prefill_chunk, self.max_len - 1), MIN_BUCKET,
                            self.buckets_per_octave)
        return [t for t in buckets_up_to(top, MIN_BUCKET, self.buckets_per_octave) if t <= top]

    def read_lengths(self) -> list[int]:
        """The read_len a later chunk or a decode call can have: buckets below max_len, then
        max_len itself."""
        below = [n for n in buckets_up_to(self.max_len, MIN_BUCKET, self.buckets_per_octave)
                 if n < self.max_len]
        return [*below, self.max_len]

    def read_len(self, needed: int) -> int:
        """The smallest read length that covers `needed` slots."""
        for n in self.read_lengths():
            if n >= needed:
                return n
        raise ValueError(f"{needed} slots exceed the engine's max_len ({self.max_len})")

    def row_counts(self) -> list[int]:
        """The batch sizes a decode call can have (the module's "Rows")."""
        if not self.bucket_rows:
            return [self.max_slots]
        below = []
        n = 2
        while n < self.max_slots:
            below.append(n)
            n *= 2
        return [*below, self.max_slots]

    def decode_rows(self, decoding: int) -> int:
        """The batch size of a decode call over `decoding` rows."""
        return next(n for n in self.row_counts() if n >= decoding)

    def chunks(self, total: int) -> list[Chunk]:
        """How a sequence of `total` tokens is prefilled."""
        C = self.prefill_chunk
        first = min(total, C)
        T = bucket_length(first, MIN_BUCKET, self.buckets_per_octave)
        out = [Chunk(0, first, min(T, C), 0)]
        for start in range(C, total, C):
            out.append(Chunk(start, min(C, total - start), C,
                             self.read_len(min(start + C, self.max_len))))
        return out

    def later_chunk_read_lengths(self) -> list[int]:
        """The read_len of every later chunk a sequence of up to max_len tokens can have."""
        C = self.prefill_chunk
        return sorted({self.read_len(min(start + C, self.max_len))
                       for start in range(C, self.max_len, C)})

    def program_shapes(self) -> list[tuple]:
        """Every program the engine can run: ("prefill", T, read_len) and ("decode", rows,
        read_len)."""
        shapes: list[tuple] = [("prefill", T, 0) for T in self.chunk_lengths()]
        shapes += [("prefill", self.prefill_chunk, n) for n in self.later_chunk_read_lengths()]
        shapes += [("decode", rows, n) for rows in self.row_counts()
                   for n in self.read_lengths()]
        return shapes


def decode_steps(shapes: Shapes, *, prefilling: bool, waiting: bool) -> int:
    """Steps for this iteration's decode call: one when a prompt is prefilling or a request
    waits for a slot (so it is not kept waiting), else shapes.decode_steps."""
    return 1 if prefilling or waiting else shapes.decode_steps


def prefill_budget(shapes: Shapes, *, decoding: bool) -> int:
    """Prompt tokens this iteration may prefill: one chunk while rows decode, else four."""
    return shapes.prefill_chunk * (1 if decoding else 4)
