"""Reading JSONL input (prompts for batch generation, fine-tuning data) with line-exact errors."""

from __future__ import annotations

import os
from collections.abc import Iterator

from phi3_jax import textio


def read_jsonl(path: str | os.PathLike, *, what: str = "input file",
               error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line. A line that is not UTF-8, not JSON, nested
    deeper than textio.MAX_JSON_DEPTH or not an object raises `error` naming the file and the
    line; a missing file raises FileNotFoundError.

    Lines end at "\\n" (JSON Lines; a "\\r" before it is whitespace to JSON), so a bad byte's
    offset in the file is exact; a UTF-8 BOM at the start is skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    with open(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            line = textio.decode_utf8(raw, path, error=error, first_line=number,
                                      base_offset=offset)
            offset += len(raw)
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            record = textio.parse_json(line, f"{path} line {number}", error=error)
            if not isinstance(record, dict):
                raise error(f"{path} line {number}: expected a JSON object, got "
                            f"{textio.json_type(record)}")
            yield number, record
