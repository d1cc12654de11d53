"""Reading JSONL input (prompts for batch generation, fine-tuning data) with line-exact errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator


def read_jsonl(path: str | os.PathLike, *, what: str = "input file",
               error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line. A line that is not a JSON object raises
    `error` naming the file and the line; a missing file raises FileNotFoundError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path} line {number}: not valid JSON ({e.msg}, column "
                            f"{e.colno})") from None
            if not isinstance(record, dict):
                raise error(f"{path} line {number}: expected a JSON object, got "
                            f"{type(record).__name__}")
            yield number, record
