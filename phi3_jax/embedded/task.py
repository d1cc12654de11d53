"""The embedded model's task: solve a linear equation a·x + b = c for an integer x.

Problems are (a, b, x) with a in 1..9, b in 0..9 and x in 0..9 (c = a·x + b), asked in one of
a few phrasings; the answer is always "x = <x>". A fixed, seeded tenth of the (a, b, x) triples
is held out of training in every phrasing, so accuracy on them measures solving, not recall.
"""

from __future__ import annotations

import dataclasses
import random

A_RANGE = range(1, 10)
B_RANGE = range(0, 10)
X_RANGE = range(0, 10)
FORMATS = (
    "Solve {eq}.",
    "Solve for x: {eq}",
    "{eq}. What is x?",
    "Find x if {eq}.",
)
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int
    x: int
    form: int = 0  # index into FORMATS

    @property
    def c(self) -> int:
        return self.a * self.x + self.b

    @property
    def equation(self) -> str:
        lhs = ("" if self.a == 1 else str(self.a)) + "x"
        if self.b:
            lhs += f" {'+' if self.b > 0 else '-'} {abs(self.b)}"
        return f"{lhs} = {self.c}"

    @property
    def prompt(self) -> str:
        return FORMATS[self.form].format(eq=self.equation)

    @property
    def answer(self) -> str:
        return f"x = {self.x}"

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        chat = [{"role": "user", "content": self.prompt}]
        if with_answer:
            chat.append({"role": "assistant", "content": self.answer})
        return chat


def split() -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(training triples, held-out triples), the same on every run."""
    triples = [(a, b, x) for a in A_RANGE for b in B_RANGE for x in X_RANGE]
    random.Random(SPLIT_SEED).shuffle(triples)
    n = round(HELD_OUT_FRACTION * len(triples))
    return sorted(triples[n:]), sorted(triples[:n])


def held_out_problems(count: int | None = None, seed: int = 0) -> list[Problem]:
    """Held-out problems, each in a seeded random phrasing (all of them without `count`)."""
    rng = random.Random(seed)
    triples = split()[1]
    if count is not None:
        triples = rng.sample(triples, count)
    return [Problem(a, b, x, rng.randrange(len(FORMATS))) for a, b, x in triples]


def parse_answer(text: str) -> int | None:
    """x from a reply "x = <int>" (surrounding whitespace allowed), else None."""
    text = text.strip()
    if not text.startswith("x = "):
        return None
    try:
        return int(text[4:])
    except ValueError:
        return None
